"""Tiny offline fixtures: a random LLaVA of the real transformers classes, and ScienceQA-IMG-shaped data.

Nothing here touches the network. The model uses the same classes as the llava-hf checkpoints
(`LlavaForConditionalGeneration` = CLIP vision tower + projector + Llama decoder, `LlavaProcessor`),
only with tiny dimensions, so every real code path runs on it in seconds on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_simignore.local_data import write_local_task
from lmms_simignore.tasks.scienceqa_utils import LLAVA_CHAT_TEMPLATE as CHAT_TEMPLATE
from lmms_simignore.tasks.scienceqa_utils import LLAVA_SYSTEM_PROMPT as SYSTEM_PROMPT, POST_PROMPT

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
OBJECTS = ["circle", "square", "triangle", "star", "cross", "ring"]
SUBJECTS = ["natural science", "social science", "language science"]


@dataclass(frozen=True)
class TinyLlavaShape:
    """Dimensions of the tiny model. 30 px images in 6 px patches give 25 image tokens (+ CLS, dropped)."""

    image_size: int = 30
    patch_size: int = 6
    vision_hidden: int = 32
    text_hidden: int = 64
    text_layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vocab_target: int = 400
    # no token for the control bytes text files and spreadsheets refuse (a random model emits any token it has; some
    # tasks' own scorers write the replies into an .xlsx)
    printable_vocabulary: bool = False

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# LLaVA-1.5's token geometry at toy width: 48 px images in 2 px patches give 576 image tokens, and 6 decoder
# layers leave room for FastV at layer 5, so the paper's budgets (ignore 124, keep 144 at layer 5) run as is.
PAPER_SHAPED = TinyLlavaShape(image_size=48, patch_size=2, vision_hidden=16, text_hidden=32, text_layers=6,
                              printable_vocabulary=True)
CONTROL_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 32)])  # what openpyxl refuses in a cell


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt vocabulary of the fixtures and ScienceQA."""
    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:", POST_PROMPT.strip()]
    lines += ["Context: Question: Options: The answer is A. B. C. D. E. (A) (B) (C) (D)"]
    lines += [f"Which {o} is {c}? What colour is the {o}? Is there a {c} {o}?" for o in OBJECTS for c in COLOURS]
    lines += [" ".join(COLOURS), " ".join(OBJECTS), " ".join(SUBJECTS), "0 1 2 3 4 5 6 7 8 9 yes no left right top bottom"]
    return lines * 4


def build_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None, printable: bool = False):
    """A byte-level BPE tokenizer with Llama-style specials (`<s>` prepended) and an `<image>` token,
    trained on `corpus` (default: the fixtures' prompt vocabulary); `printable`: no token for `CONTROL_BYTES`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if printable:  # each byte's symbol, as the byte-level pre-tokenizer writes it
        control = {backend.pre_tokenizer.pre_tokenize_str(chr(byte))[0][0] for byte in CONTROL_BYTES}
        alphabet = [symbol for symbol in alphabet if symbol not in control]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    backend.train_from_iterator(corpus if corpus is not None else _corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return tokenizer


def build_tiny_llava(output_dir: str | Path, seed: int = 0, shape: TinyLlavaShape = TinyLlavaShape()) -> Path:
    """Write a random tiny llava-hf-style checkpoint (safetensors + processor) to `output_dir`.

    Loadable with `LlavaForConditionalGeneration.from_pretrained(output_dir)` and
    `AutoProcessor.from_pretrained(output_dir)`, offline.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_target, printable=shape.printable_vocabulary)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision_config, text_config = tiny_clip_and_llama(shape, tokenizer)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=shape.image_tokens,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)

    build_processor(tokenizer, shape.image_size, shape.patch_size).save_pretrained(output_dir)
    return output_dir


def tiny_clip_and_llama(shape: TinyLlavaShape, tokenizer):
    """The tiny CLIP tower's and Llama decoder's configs of `shape` (2 tower layers), with `tokenizer`'s ids."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision_config = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_hidden * 2,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    return vision_config, text_config


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A `LlavaProcessor` as the llava-hf checkpoints have it: shortest edge resized to `image_size`, centre crop,
    CLS + (image_size / patch_size)^2 patch features of which the CLS is dropped, and the vicuna chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _draw_scene(rng: random.Random, size: int, colour: str, shape_name: str):
    from PIL import Image, ImageDraw

    palette = {
        "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
        "purple": (140, 50, 170), "orange": (240, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250),
    }
    image = Image.new("RGB", (size, size), (255, 255, 255) if colour != "white" else (90, 90, 90))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
    x1, y1 = x0 + rng.randint(size // 4, size // 2), y0 + rng.randint(size // 4, size // 2)
    if shape_name in ("circle", "ring"):
        draw.ellipse((x0, y0, x1, y1), fill=palette[colour])
    elif shape_name == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=palette[colour])
    else:
        draw.rectangle((x0, y0, x1, y1), fill=palette[colour])
    return image


def scienceqa_like_records(num_docs: int = 12, seed: int = 0, image_size: int = 48, with_text_only: int = 1) -> list[dict]:
    """Rows with the ScienceQA-IMG schema; the last `with_text_only` rows have no image."""
    rng = random.Random(seed)
    records = []
    for index in range(num_docs):
        colour, shape_name = rng.choice(COLOURS), rng.choice(OBJECTS)
        num_choices = rng.choice([2, 3, 4])
        choices = rng.sample([c for c in COLOURS if c != colour], num_choices - 1) + [colour]
        rng.shuffle(choices)
        has_image = index < num_docs - with_text_only
        records.append(
            {
                "image": _draw_scene(rng, image_size, colour, shape_name) if has_image else None,
                "question": f"What colour is the {shape_name}?",
                "choices": choices,
                "answer": choices.index(colour),
                "hint": "" if index % 3 else f"The {shape_name} is on a white page.",
                "task": "closed choice",
                "grade": f"grade{rng.randint(1, 12)}",
                "subject": rng.choice(SUBJECTS),
                "topic": "colours",
                "category": "Identify colours",
                "skill": "Identify colours",
                "lecture": "",
                "solution": f"The {shape_name} is {colour}.",
            }
        )
    return records


def write_scienceqa_like_parquet(path: str | Path, num_docs: int = 12, seed: int = 0) -> Path:
    """Write ScienceQA-IMG-shaped rows (image stored as an encoded PNG) to one parquet file."""
    from datasets import Dataset, Features, Image, Sequence, Value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text_columns = ["question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution"]
    features = Features(
        {
            "image": Image(),
            "choices": Sequence(Value("string")),
            "answer": Value("int64"),
            **{name: Value("string") for name in text_columns},
        }
    )
    records = scienceqa_like_records(num_docs=num_docs, seed=seed)
    dataset = Dataset.from_list(records, features=features)
    dataset.to_parquet(str(path))
    return path


def build_offline_testbed(
    root: str | Path, num_docs: int = 12, seed: int = 0, shape: TinyLlavaShape = TinyLlavaShape()
) -> dict[str, Path]:
    """Model, data and task YAML for an offline run under `root`; returns their paths."""
    root = Path(root)
    model_dir = build_tiny_llava(root / "tiny-llava", seed=seed, shape=shape)
    parquet = write_scienceqa_like_parquet(root / "data" / "scienceqa_img_local.parquet", num_docs=num_docs, seed=seed)
    task_yaml = write_local_task(root / "tasks", parquet)
    return {"model": model_dir, "data": parquet, "tasks": task_yaml.parent}
