"""Tiny offline Qwen-VL checkpoints: random Qwen2-VL, Qwen2.5-VL and Qwen3-VL of the real transformers classes.

Nothing here touches the network. Each folder holds what a released checkpoint holds (config.json,
generation_config.json, model.safetensors, a Qwen2Tokenizer with the real special tokens, the chat template and
the processor files), only with tiny dimensions, so `from_pretrained`, `AutoProcessor` and lmms-eval's built-in
`qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` classes load it offline and run in seconds on a CPU.

The vision geometry is the real one (patch 14 for Qwen2/2.5-VL, 16 for Qwen3-VL, 2x2 merge, temporal patch 2),
so `qwen_vl_utils` and the processors resize exactly as they do for the released models; only the processor's
default pixel limits are small (16..64 image tokens), which lmms-eval's classes override with their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The special tokens of the released tokenizers, in their order (they follow the BPE vocabulary).
VISION_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Added (not special) tokens of Qwen2.5-VL and Qwen3-VL: tool calls and code infilling; Qwen3-VL adds thinking.
QWEN25_EXTRA_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN3_EXTRA_TOKENS = QWEN25_EXTRA_TOKENS + ["<tool_response>", "</tool_response>", "<think>", "</think>"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL and Qwen2.5-VL: a default system turn when the conversation has none; images and videos become
# `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad), `add_vision_id` numbers them.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL (Instruct): no default system turn; a system turn renders its text only; the same vision markers.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render(content, with_media) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if with_media and (part['type'] == 'image' or 'image' in part or 'image_url' in part) %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif with_media and (part['type'] == 'video' or 'video' in part) %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part %}{{- part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if loop.first %}{{- '<|im_start|>system\\n' + render(message['content'], false) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content'], true) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyQwenShape:
    """Dimensions of a tiny Qwen-VL. Head dim 16 in the LLM (M-RoPE sections of 8 frequencies), ViT width 32.

    `min_image_tokens` / `max_image_tokens` set the processor's default pixel limits in merged tokens
    (a 64x64 image gives 16 tokens and a 128x96 one 20, in every family)."""

    text_hidden: int = 64
    text_layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_depth: int = 4
    vision_heads: int = 2
    vocab_target: int = 400
    min_image_tokens: int = 16
    max_image_tokens: int = 64
    # Qwen2.5-VL: 56 px windows (2x2 merged tokens) so small images get several windows; blocks 1 and 3 full.
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    # Qwen3-VL: the outputs of ViT blocks 1 and 2 are added after decoder layers 0 and 1.
    deepstack_visual_indexes: tuple[int, ...] = (1, 2)

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.heads


# the offline fixtures' shape (`python -m lmms_simignore fixtures DIR --qwen ...`): 8 decoder layers, so that
# three-stage schedules given as fractions of the depth (PyramidDrop's 2/7/14 of 28) run as written
FIXTURE_SHAPE = TinyQwenShape(text_layers=8)


def patch_size_of(family: str) -> int:
    """The ViT patch size of a family: 14 for Qwen2/2.5-VL, 16 for Qwen3-VL."""
    _check_family(family)
    return 16 if family == "qwen3_vl" else 14


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; expected one of {FAMILIES}")


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: chat roles, the default system prompt and question words."""
    lines = [DEFAULT_SYSTEM_PROMPT, "system user assistant", "Picture Video 1: 2: 3:"]
    lines += ["What is in the image? Describe this image. Answer with the option's letter from the given choices."]
    lines += ["Which colour is the shape? How many objects are there? Is there a red circle? yes no"]
    lines += ["red green blue yellow purple orange black white circle square triangle star left right top bottom"]
    lines += ["A. B. C. D. (A) (B) (C) (D) 0 1 2 3 4 5 6 7 8 9 Question: Options: Context: Answer:"]
    return lines * 4


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merge list trained on the corpus (every byte is in the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in model["merges"]]
    return model["vocab"], merges


def build_qwen_tokenizer(family: str, vocab_size: int = 400):
    """A `Qwen2Tokenizer` (the class all three families use) over a tiny trained BPE, with the released special
    tokens after the vocabulary, eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and the family's chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    _check_family(family)
    vocab, merges = _train_bpe(vocab_size)
    extras = {"qwen2_vl": [], "qwen2_5_vl": QWEN25_EXTRA_TOKENS, "qwen3_vl": QWEN3_EXTRA_TOKENS}[family]
    for token in VISION_SPECIALS + extras:  # ids in the released order, right after the BPE vocabulary
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in VISION_SPECIALS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in extras])
    tokenizer.model_max_length = 32768
    tokenizer.chat_template = chat_template_of(family)
    return tokenizer


def chat_template_of(family: str) -> str:
    """The chat template of a family: Qwen2-VL's (default system prompt) for Qwen2/2.5-VL, Qwen3-VL's otherwise."""
    _check_family(family)
    return QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE


def special_token_ids(tokenizer) -> dict[str, int]:
    """The token ids a Qwen-VL config names, read from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }


def _text_config(family: str, shape: TinyQwenShape, vocab_size: int, token_ids: dict[str, int]) -> dict:
    """LLM settings: grouped kv heads, M-RoPE with the released section ratios scaled to head dim 16."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": shape.text_hidden,
        "intermediate_size": shape.text_hidden * 2,
        "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": 4096,
        "initializer_range": 0.2,
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
    }
    half = shape.head_dim // 2
    if family == "qwen3_vl":
        # Released: [24, 20, 20] of 64 frequencies, interleaved; here the same split of `half`.
        height = width = half * 20 // 64
        sections = [half - height - width, height, width]
        rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": sections, "mrope_interleaved": True}
        return {**common, "head_dim": shape.head_dim, "rms_norm_eps": 1e-6, "rope_parameters": rope}
    # Released: [16, 24, 24] of 64 frequencies (temporal, height, width).
    height = width = half * 24 // 64
    sections = [half - height - width, height, width]
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": sections}
    return {**common, "rms_norm_eps": 1e-6, "rope_parameters": rope}


def _vision_config(family: str, shape: TinyQwenShape) -> dict:
    """ViT settings with the released geometry (patch, 2x2 merge, temporal patch 2) at width 32."""
    common = {
        "depth": shape.vision_depth,
        "num_heads": shape.vision_heads,
        "in_channels": 3,
        "patch_size": patch_size_of(family),
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": 0.02,
    }
    if family == "qwen2_vl":
        return {**common, "embed_dim": shape.vision_hidden, "hidden_size": shape.text_hidden, "mlp_ratio": 2}
    if family == "qwen2_5_vl":
        return {
            **common,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_hidden * 2,
            "out_hidden_size": shape.text_hidden,
            "window_size": shape.window_size,
            "fullatt_block_indexes": list(shape.fullatt_block_indexes),
            "tokens_per_second": 2,
        }
    return {
        **common,
        "hidden_size": shape.vision_hidden,
        "intermediate_size": shape.vision_hidden * 2,
        "out_hidden_size": shape.text_hidden,
        "num_position_embeddings": 256,  # a learned 16x16 grid, interpolated to each image's grid
        "deepstack_visual_indexes": list(shape.deepstack_visual_indexes),
    }


def build_config(family: str, tokenizer, shape: TinyQwenShape = TinyQwenShape()):
    """The family's real config class with tiny sizes and the tokenizer's token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    _check_family(family)
    token_ids = special_token_ids(tokenizer)
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[family]
    vision_ids = {key: token_ids[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")}
    return config_class(
        text_config=_text_config(family, shape, len(tokenizer), token_ids),
        vision_config=_vision_config(family, shape),
        tie_word_embeddings=False,
        **vision_ids,
    )


def model_class_of(family: str):
    """The `...ForConditionalGeneration` class of a family."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    _check_family(family)
    return {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
    }[family]


def pixel_limits(family: str, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) of `min_tokens` .. `max_tokens` merged tokens of (patch x 2)^2 pixels."""
    unit = (patch_size_of(family) * 2) ** 2
    return min_tokens * unit, max_tokens * unit


def build_processor(family: str, tokenizer, shape: TinyQwenShape = TinyQwenShape()):
    """The family's real processor with the real (torchvision) image and video processors: Qwen2/2.5-VL with
    CLIP mean/std and patch 14, Qwen3-VL with mean/std 0.5 and patch 16; pixel limits from `shape`."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    _check_family(family)
    min_pixels, max_pixels = pixel_limits(family, shape.min_image_tokens, shape.max_image_tokens)
    geometry = {"patch_size": patch_size_of(family), "temporal_patch_size": 2, "merge_size": 2}
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if family == "qwen3_vl":
        half = [0.5, 0.5, 0.5]
        image_processor = Qwen2VLImageProcessor(size=size, image_mean=half, image_std=half, **geometry)
        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 8}, image_mean=half, image_std=half,
            fps=2, **geometry,
        )
        return Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=chat_template_of(family))
    image_processor = Qwen2VLImageProcessor(size=size, **geometry)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 8},
                                            **geometry)
    processor_class = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_class(image_processor, tokenizer, video_processor, chat_template=chat_template_of(family))


def build_tiny_qwen(
    folder: str | Path, family: str, seed: int = 0, shape: TinyQwenShape = TinyQwenShape(),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random tiny checkpoint of `family` ("qwen2_vl", "qwen2_5_vl" or "qwen3_vl") to `folder`.

    Loadable offline with the family's `...ForConditionalGeneration.from_pretrained(folder)` and
    `AutoProcessor.from_pretrained(folder)` (the real processor class); weights in safetensors only.
    `dtype` is the saved (and config) dtype: the released checkpoints say bfloat16, which is what
    `dtype="auto"` (lmms-eval's `qwen2_vl`) then loads.
    """
    _check_family(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(family, shape.vocab_target)
    config = build_config(family, tokenizer, shape)

    torch.manual_seed(seed)
    model = model_class_of(family)(config).eval().to(dtype)
    token_ids = special_token_ids(tokenizer)
    generation = model.generation_config
    generation.bos_token_id = token_ids["bos_token_id"]
    generation.pad_token_id = token_ids["pad_token_id"]
    generation.eos_token_id = [token_ids["eos_token_id"], token_ids["bos_token_id"]]  # <|im_end|>, <|endoftext|>
    model.save_pretrained(folder, safe_serialization=True)

    build_processor(family, tokenizer, shape).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

