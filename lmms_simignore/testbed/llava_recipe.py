"""The testbed's LLaVA-1.5 recipe, scaled down: a language model, then feature alignment, then instruction tuning.

    python -m lmms_simignore pretrain-tower   --out tower/             # CLIP-like tower (tower_pretraining)
    python -m lmms_simignore pretrain-lm      --out lm/                # a language model of scene text
    python -m lmms_simignore align-projector  --tower tower/ --lm lm/ --out stage1/   # stage 1
    python -m lmms_simignore tune-instructions --init-from stage1/ --out model/       # stage 2

- `pretrain-lm`: a small Llama (input and output embeddings tied) trained as a language model on text
  about scenes: the objects listed in random order, the caption, and two questions with their answers in
  words. It is a language model before it sees an image, as Vicuna is for LLaVA.
- `align-projector` (LLaVA stage 1, feature alignment): the llava-hf classes assembled from the tower and
  the language model with a fresh two-layer projector; tower and language model frozen, the projector
  trained on captioning (`<image>` tokens, then the caption; the loss on the caption).
- `tune-instructions` (LLaVA stage 2): projector and language model trained on the shapes QA mix in the
  ScienceQA-IMG prompt format (tower frozen), loss on the answer letter and end-of-answer token.

Every batch is drawn fresh from seeds at or above `TRAINING_SEEDS_FROM`; the held-out questions (seed
10000) and scenes used for measurements lie below it. Each stage writes safetensors and `training.json`
(its command, settings, wall time and measurements, the earlier stages' records under `previous_stages`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from lmms_simignore.tasks.scienceqa_utils import LLAVA_CHAT_TEMPLATE as CHAT_TEMPLATE
from lmms_simignore.tasks.scienceqa_utils import LLAVA_SYSTEM_PROMPT as SYSTEM_PROMPT
from lmms_simignore.tasks.scienceqa_utils import POST_PROMPT
from lmms_simignore.testbed import scenes, shapes
from lmms_simignore.testbed.tower_pretraining import (TRAINING_SEEDS_FROM, CosineAdamW, captions_of, check_folder, check_positive,
                                                      command_line, scene_batch, scene_objects, shapes_image_processor)

ALIGNMENT_SEED = shapes.HELD_OUT_SEED + 2  # held-out scenes for the alignment measurement
CAPTION_SEED = shapes.HELD_OUT_SEED + 3  # held-out scenes for the stage-1 caption loss
COVERED_PIXELS = scenes.PATCH * scenes.PATCH // 2  # a patch "holds" an object from half its pixels


def shapes_corpus() -> list[str]:
    """Text the tokenizer is trained on: the shapes prompts, the template words and the answer letters."""
    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:", POST_PROMPT.strip(), "A. B. C. D. E. F. A B C D E F"]
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            lines += [f"What colour is the {shape}? What shape is the {colour} object? Is there a {colour} {shape}?",
                      f"Is the {colour} {shape} left of the {colour} {shape}? How many objects are there?"]
    lines += [" ".join(shapes.COLOURS), " ".join(shapes.SHAPES), " ".join(shapes.COUNTS), "yes no"]
    return lines * 4


def prompt_text(record: dict) -> str:
    options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(record["choices"]))
    return f"{record['question']}\n{options}{POST_PROMPT}"


def encode(processor, records: list[dict], with_answers: bool) -> dict:
    """Left-padded batch; with answers, `labels` mark the answer letter and the end-of-answer token."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{prompt_text(r)}"}], chat_template=CHAT_TEMPLATE, tokenize=False,
            add_generation_prompt=True,
        )
        for r in records
    ]
    if not with_answers:
        return processor(images=[r["image"] for r in records], text=prompts, return_tensors="pt", padding=True)
    answers = [f"{chr(ord('A') + r['answer'])}{tokenizer.eos_token}" for r in records]
    batch = processor(images=[r["image"] for r in records], text=[p + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True)
    # left padding puts every answer at the end of its row: label its last tokens
    answer_lengths = [len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers]
    labels = torch.full_like(batch["input_ids"], -100)
    for row, answer_length in enumerate(answer_lengths):
        labels[row, -answer_length:] = batch["input_ids"][row, -answer_length:]
    batch["labels"] = labels
    return batch


def evaluate(model, processor, records: list[dict], device, batch_size: int = 256) -> dict:
    """Greedy first answer token vs the target letter: accuracy overall, per question type and per object count."""
    model.eval()
    correct = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = encode(processor, chunk, with_answers=False).to(device)
        logits = model(**batch).logits[:, -1]
        predicted = processor.tokenizer.batch_decode(logits.argmax(-1)[:, None])
        correct += [p.strip() == chr(ord("A") + r["answer"]) for p, r in zip(predicted, chunk)]
    model.train()
    report = {"overall": sum(correct) / len(correct), "per_type": {}, "per_count": {}, "chance": {}}
    for key, field in (("per_type", "question_type"), ("per_count", "num_objects")):
        for value in sorted({r[field] for r in records}):
            hits = [c for c, r in zip(correct, records) if r[field] == value]
            report[key][str(value)] = sum(hits) / len(hits)
    for question_type in shapes.QUESTION_TYPES:
        report["chance"][question_type] = 1 / len(shapes.OPTIONS[question_type])
    types = [r["question_type"] for r in records]
    report["chance"]["overall"] = sum(1 / len(shapes.OPTIONS[t]) for t in types) / len(types)
    return report


def describe(objects: list[scenes.PlacedObject], rng: random.Random) -> str:
    """The scene in words: the objects listed in random order, then the caption."""
    listing = [scenes.phrase(obj) for obj in objects]
    rng.shuffle(listing)
    return f"{', '.join(listing)}. {scenes.caption(objects)}."


def scene_text(record: dict, rng: random.Random, questions: int = 2) -> str:
    """Language-model pre-training text about one scene: its description (`describe`) and `questions`
    questions of different types answered in words.

    'small red circle, large blue square. a large blue square at the top left, ... What colour is the circle? red.'
    """
    objects = scene_objects(record)
    asked = [shapes.ask(rng, objects, question_type) for question_type in shapes.QUESTION_TYPES]
    answered = [f"{question} {answer}." for question, answer in (pair for pair in asked if pair is not None)]
    rng.shuffle(answered)
    return f"{describe(objects, rng)} " + " ".join(answered[:questions])


def scene_dialogue(record: dict, rng: random.Random, tokenizer) -> str:
    """A stage-2-shaped conversation in text only: the scene's description where stage 2 has the image, then
    a shapes question of a random type in the ScienceQA-IMG format, answered with the option's letter."""
    objects = scene_objects(record)
    for question_type in rng.sample(shapes.QUESTION_TYPES, len(shapes.QUESTION_TYPES)):
        asked = shapes.ask(rng, objects, question_type)
        if asked is not None:
            break
    question, answer = asked  # a count question always exists
    options = list(shapes.OPTIONS[question_type])
    prompt = prompt_text({"question": question, "choices": options})
    conversation = [{"role": "user", "content": f"{describe(objects, rng)}\n{prompt}"}]
    text = tokenizer.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return text + "ABCDEF"[options.index(answer)]


def recipe_tokenizer(seed: int = 0):
    """One byte-level BPE tokenizer for every stage: the shapes prompts plus scene text from `seed`."""
    from lmms_simignore.testbed.tiny import build_tokenizer
    rng = random.Random(seed)
    return build_tokenizer(vocab_size=600, corpus=shapes_corpus() + [scene_text(r, rng) for r in scene_batch(2000, seed=seed, draw=False)])


def language_model_texts(records: list[dict], rng: random.Random, tokenizer) -> list[str]:
    """Pre-training texts: `scene_text` for even records, `scene_dialogue` for odd ones."""
    return [scene_dialogue(r, rng, tokenizer) if index % 2 else scene_text(r, rng) for index, r in enumerate(records)]


def build_language_model(tokenizer, seed: int = 0):
    """A fresh Llama of the testbed's width: 4 layers, hidden 128, 4 heads (2 KV heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.05,
        tie_word_embeddings=True,
    ))


def _text_batch(tokenizer, texts: list[str]) -> tuple[dict, torch.Tensor]:
    tokenizer.padding_side = "right"
    batch = tokenizer([text + tokenizer.eos_token for text in texts], padding=True, return_tensors="pt")
    return batch, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def pretrain_language_model(output_dir: str | Path, steps: int = 1000, batch_size: int = 64, lr: float = 1e-3,
                            seed: int = 0, eval_every: int = 250, device: str = "cpu", log=print) -> dict:
    """Train `build_language_model` on `scene_text`; save it with its tokenizer and training.json."""
    check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every)
    output_dir = Path(output_dir)
    tokenizer = recipe_tokenizer(seed)
    model = build_language_model(tokenizer, seed).to(device).train()
    optimisation = CosineAdamW(model.parameters(), lr, steps, clip_norm=1.0)
    held_out_rng = random.Random(seed)
    held_out = [part.to(device) for part in _text_batch(tokenizer, language_model_texts(scene_batch(256, seed=CAPTION_SEED, draw=False), held_out_rng, tokenizer))]
    rng, started, history = random.Random(seed), time.time(), []
    for step in range(1, steps + 1):
        texts = language_model_texts(scene_batch(batch_size, seed=rng.randrange(TRAINING_SEEDS_FROM, 2**31), draw=False), rng, tokenizer)
        batch, labels = _text_batch(tokenizer, texts)
        loss = model(**batch.to(device), labels=labels.to(device)).loss
        optimisation.update(loss)
        if step % eval_every == 0 or step == steps:
            with torch.inference_mode():
                held_out_loss = model(**held_out[0], labels=held_out[1]).loss.item()
            history.append({"step": step, "loss": round(loss.item(), 4), "held_out_loss": round(held_out_loss, 4)})
            log(f"step {step}: loss {loss.item():.3f}, held-out loss {held_out_loss:.3f}, {time.time() - started:.0f}s")
    model.to("cpu").eval().save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    summary = {
        "command": command_line("pretrain-lm"),
        "stage": "language model pre-training on scene text: descriptions with questions answered in words, and "
                 "stage-2-shaped conversations with the description in place of the image",
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "device": str(device),
        "wall_time_s": round(time.time() - started, 1), "parameters": sum(p.numel() for p in model.parameters()),
        "data": f"language_model_texts of fresh scenes every step (seeds >= {TRAINING_SEEDS_FROM}); held-out: 256 scenes, seed {CAPTION_SEED}",
        "held_out_loss": history[-1]["held_out_loss"], "history": history,
    }
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def assemble_llava(tower_dir: str | Path, language_model_dir: str | Path, seed: int = 0):
    """The llava-hf classes from a pre-trained tower (`tower_dir/vision`) and language model, with a fresh
    projector; LLaVA-1.5's feature choice (the tower's second-to-last layer, CLS dropped). Returns (model, processor)."""
    from transformers import (AutoTokenizer, CLIPVisionModel, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tower = CLIPVisionModel.from_pretrained(Path(tower_dir) / "vision", use_safetensors=True)
    language_model = LlamaForCausalLM.from_pretrained(language_model_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(language_model_dir)
    config = LlavaConfig(
        vision_config=tower.config, text_config=language_model.config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=scenes.PATCHES_PER_SIDE**2,
        tie_word_embeddings=language_model.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=shapes_image_processor(scenes.IMAGE_SIZE), tokenizer=tokenizer, patch_size=scenes.PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def caption_batch(processor, records: list[dict]) -> dict:
    """Stage-1 inputs: '<image>' tokens, a newline, the caption; `labels` on the caption and end token only."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    prefix = "<image>\n"
    texts = [prefix + caption + tokenizer.eos_token for caption in captions_of(records)]
    batch = processor(images=[r["image"] for r in records], text=texts, return_tensors="pt", padding=True)
    prefix_length = processor(images=[records[0]["image"]], text=[prefix], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :prefix_length] = -100
    batch["labels"] = labels
    return batch


@torch.inference_mode()
def caption_losses(model, processor, records: list[dict]) -> dict:
    """Held-out caption loss with each scene's own image and with another scene's image (images rolled by one)."""
    batch = caption_batch(processor, records).to(model.device)
    matched = model(**batch).loss.item()
    shuffled = model(**{**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}).loss.item()
    return {"matched_images": round(matched, 4), "shuffled_images": round(shuffled, 4)}


@torch.inference_mode()
def word_alignment(model, processor, records: list[dict]) -> dict:
    """How text-like the projected image tokens are, the quantity Simignore relies on.

    For each patch holding an object (at least half its pixels), rank the object's colour word among the
    colour words (and its shape word among the shape words) by cosine similarity between the patch's image
    token and the words' input embeddings; report the top-1 rates (chance 1/4 and 1/3). For every patch,
    its best cosine to any colour word: mean over object patches and over background patches (no object pixel).
    """
    pixels = processor.image_processor(images=[r["image"] for r in records], return_tensors="pt")["pixel_values"].to(model.device)
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    image_tokens = torch.nn.functional.normalize(torch.stack(list(features)).float().cpu(), dim=-1)  # (B, N, D)
    embedding = model.get_input_embeddings().weight.float().cpu()

    def word_vectors(words) -> torch.Tensor:  # (W, D), a word split into pieces averages them
        pieces = [processor.tokenizer(" " + word, add_special_tokens=False).input_ids for word in words]
        return torch.nn.functional.normalize(torch.stack([embedding[ids].mean(0) for ids in pieces]), dim=-1)

    # (row, object, patches it holds at least half of), and which patches no object touches
    held = [(row, obj, scenes.covered_patches(obj, min_pixels=COVERED_PIXELS))
            for row, record in enumerate(records) for obj in scene_objects(record)]
    is_object = torch.zeros(image_tokens.shape[:2], dtype=torch.bool)  # (B, N)
    is_background = torch.ones(image_tokens.shape[:2], dtype=torch.bool)  # (B, N)
    for row, obj, patches in held:
        is_object[row, patches] = True
        is_background[row, scenes.covered_patches(obj)] = False
    report, similarities, total = {}, {}, sum(len(patches) for _, _, patches in held)
    for attribute, words in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES)):
        similarities[attribute] = similarity = image_tokens @ word_vectors(words).T  # (B, N, W)
        hits = sum(int((similarity[row, patches].argmax(dim=-1) == words.index(getattr(obj, attribute))).sum())
                   for row, obj, patches in held)
        report[f"{attribute}_top1"] = round(hits / total, 4)
        report[f"{attribute}_chance"] = round(1 / len(words), 4)
    report["object_patches"] = total
    best_colour = similarities["colour"].amax(dim=-1)  # (B, N)
    report["best_colour_cosine_object"] = round(best_colour[is_object].mean().item(), 4)
    report["best_colour_cosine_background"] = round(best_colour[is_background].mean().item(), 4)
    report["background_patches"] = int(is_background.sum())
    return report


def cls_attention_on_objects(model, processor, records: list[dict], keeps: tuple[int, ...] = (8, 16, 32)) -> dict:
    """What VisionZip would keep: per vision encoder layer, the share of object patches (at least half covered)
    among the `keep` patches with the highest CLS attention (summed over heads), against the object share of all
    patches (what a random choice gets). Recomputed from each layer's own norm and projections."""
    from lmms_simignore import engine
    from lmms_simignore.methods.selection import select_top_k

    pixels = processor.image_processor(images=[r["image"] for r in records], return_tensors="pt")["pixel_values"].to(model.device)
    states = engine.vision_tower_states(model, pixels)
    is_object = torch.zeros(len(records), states[0].shape[1] - 1, dtype=torch.bool)  # (B, patches)
    for row, record in enumerate(records):
        for obj in scene_objects(record):
            is_object[row, scenes.covered_patches(obj, min_pixels=COVERED_PIXELS)] = True
    layers = model.model.vision_tower.encoder.layers
    report = {"object_share_of_patches": round(is_object.float().mean().item(), 4),
              "feature_layer": model.config.vision_feature_layer % len(states) - 1, "layers": {}}
    for index, layer in enumerate(layers):
        attention, _ = engine.vision_layer_attention(layer, states[index])  # (B, H, T)
        patches = attention.sum(dim=1)[:, 1:].float().cpu()  # (B, patches), the CLS token's row
        report["layers"][str(index)] = {f"top_{keep}": round(is_object.gather(1, select_top_k(patches, keep)).float().mean().item(), 4)
                                        for keep in keeps}
    return report


UNTRAINED_SEEDS = tuple(range(100, 105))


def untrained_alignment(tower_dir: str | Path, language_model_dir: str | Path, records: list[dict]) -> dict:
    """`word_alignment` of freshly initialised projectors (the baseline a trained one is compared with):
    the mean over `UNTRAINED_SEEDS`, and each seed's rates."""
    runs = [word_alignment(*assemble_llava(tower_dir, language_model_dir, seed), records) for seed in UNTRAINED_SEEDS]
    report = {key: round(sum(run[key] for run in runs) / len(runs), 4) for key in ("colour_top1", "shape_top1",
              "best_colour_cosine_object", "best_colour_cosine_background")}
    report["colour_top1_per_seed"] = [run["colour_top1"] for run in runs]
    report["shape_top1_per_seed"] = [run["shape_top1"] for run in runs]
    report["seeds"] = list(UNTRAINED_SEEDS)
    return report


def _freeze(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def align_projector(output_dir: str | Path, tower_dir: str | Path, language_model_dir: str | Path, steps: int = 1000,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, eval_every: int = 250, device: str = "cpu",
                    log=print) -> dict:
    """LLaVA stage 1: tower and language model frozen, the projector trained on captioning; saves the model."""
    check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every)
    check_folder("tower_dir", Path(tower_dir) / "vision", "pretrain-tower")
    check_folder("language_model_dir", language_model_dir, "pretrain-lm")
    output_dir = Path(output_dir)
    model, processor = assemble_llava(tower_dir, language_model_dir, seed)
    _freeze(model.model.vision_tower)
    _freeze(model.model.language_model)
    _freeze(model.lm_head)
    projector = model.model.multi_modal_projector
    model.to(device).train()
    optimisation = CosineAdamW(projector.parameters(), lr, steps, weight_decay=0.0)
    held_out = scene_batch(256, seed=CAPTION_SEED)
    alignment_scenes = scene_batch(200, seed=ALIGNMENT_SEED)
    untrained = untrained_alignment(tower_dir, language_model_dir, alignment_scenes)
    log(f"before training, fresh projectors (seeds {UNTRAINED_SEEDS[0]}-{UNTRAINED_SEEDS[-1]}): colour-word top-1 "
        f"{untrained['colour_top1']:.3f}, shape-word top-1 {untrained['shape_top1']:.3f}")
    rng, started, history = random.Random(seed), time.time(), []
    for step in range(1, steps + 1):
        batch = caption_batch(processor, scene_batch(batch_size, seed=rng.randrange(TRAINING_SEEDS_FROM, 2**31)))
        loss = model(**batch.to(device)).loss
        optimisation.update(loss)
        if step % eval_every == 0 or step == steps:
            model.eval()
            losses = caption_losses(model, processor, held_out)
            model.train()
            history.append({"step": step, "loss": round(loss.item(), 4), "held_out_caption_loss": losses})
            log(f"step {step}: caption loss {loss.item():.3f}, held-out {losses['matched_images']:.3f} "
                f"(another scene's image: {losses['shuffled_images']:.3f}), {time.time() - started:.0f}s")
    model.eval()
    alignment = word_alignment(model, processor, alignment_scenes)
    log(f"alignment: colour-word top-1 {alignment['colour_top1']:.3f} (chance 0.25), "
        f"shape-word top-1 {alignment['shape_top1']:.3f} (chance 0.333)")
    model.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    previous = [_record(Path(tower_dir)), _record(Path(language_model_dir))]
    summary = {
        "command": command_line("align-projector"),
        "stage": "LLaVA stage 1, feature alignment: projector trained on captioning, tower and language model frozen",
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "device": str(device), "wall_time_s": round(time.time() - started, 1),
        "data": f"captions of fresh free-layout scenes every step (seeds >= {TRAINING_SEEDS_FROM}); held-out: 256 scenes, seed {CAPTION_SEED}",
        "held_out_caption_loss": history[-1]["held_out_caption_loss"],
        "alignment": {**alignment, "scenes": f"200 scenes, seed {ALIGNMENT_SEED}"},
        "alignment_untrained_projector": untrained,
        "history": history,
        "previous_stages": [record for record in previous if record is not None],
    }
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def _record(folder: Path) -> dict | None:
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None


def held_out_questions(num_questions: int = 1000, draw: bool = True) -> list[dict]:
    """The testbed's held-out split: shapes questions on free-layout scenes, seed 10000."""
    return shapes.shapes_records(num_questions, seed=shapes.HELD_OUT_SEED, draw=draw)


def tune_instructions(output_dir: str | Path, init_from: str | Path, steps: int = 3000, batch_size: int = 64,
                      lr: float = 1e-3, seed: int = 1, eval_every: int = 250, mix: tuple[str, ...] = shapes.QUESTION_TYPES,
                      curriculum: float = 0.3, held_out_size: int = 1000, train_tower: bool = False, device: str = "cpu",
                      log=print) -> dict:
    """LLaVA stage 2: projector and language model trained on the shapes QA mix (tower frozen); saves the model.

    `train_tower`: train the vision tower too (LLaVA-1.5 keeps it frozen; later LLaVA variants tune it).

    `curriculum`: the fraction of the steps over which the largest object count grows from 1 to MAX_OBJECTS
    (0: 1..MAX_OBJECTS objects from the first step).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every, held_out_size=held_out_size)
    if not 0 <= curriculum <= 1:
        raise ValueError(f"curriculum must be a fraction of the steps in [0, 1], got {curriculum}")
    for question_type in mix:
        if question_type not in shapes.QUESTION_TYPES:
            raise ValueError(f"mix must list question types among {', '.join(shapes.QUESTION_TYPES)}; got {question_type!r}")
    check_folder("init_from", init_from, "align-projector")
    init_from, output_dir = Path(init_from), Path(output_dir)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(init_from, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(init_from)
    if not train_tower:
        _freeze(model.model.vision_tower)
    model.to(device).train()
    optimisation = CosineAdamW(model.parameters(), lr, steps, clip_norm=1.0)  # frozen parameters are left out
    held_out = held_out_questions(held_out_size)
    rng, started, history = random.Random(seed), time.time(), []
    for step in range(1, steps + 1):
        growing = shapes.MAX_OBJECTS if curriculum == 0 else 1 + int(shapes.MAX_OBJECTS * step / (curriculum * steps))
        records = shapes.shapes_records(batch_size, seed=rng.randrange(TRAINING_SEEDS_FROM, 2**31), question_types=mix,
                                        max_objects=min(shapes.MAX_OBJECTS, growing))
        loss = model(**encode(processor, records, with_answers=True).to(device)).loss
        optimisation.update(loss)
        if step % eval_every == 0 or step == steps:
            report = evaluate(model, processor, held_out, device)
            history.append({"step": step, "loss": round(loss.item(), 4), "held_out": report["overall"]})
            log(f"step {step}: loss {loss.item():.3f}, held-out accuracy {report['overall']:.3f} "
                f"({', '.join(f'{k} {v:.2f}' for k, v in report['per_type'].items())}), {time.time() - started:.0f}s")
    model.eval()
    report = evaluate(model, processor, held_out, device)
    alignment = word_alignment(model, processor, scene_batch(200, seed=ALIGNMENT_SEED))
    model.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    previous = _record(init_from) or {}
    summary = {
        "command": command_line("tune-instructions"),
        "stage": "LLaVA stage 2, instruction tuning: projector and language model on the shapes QA mix, tower "
                 + ("trained too (unlike LLaVA-1.5)" if train_tower else "frozen"),
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "mix": list(mix), "curriculum": curriculum,
        "train_tower": train_tower,
        "device": str(device),
        "wall_time_s": round(time.time() - started, 1), "parameters": sum(p.numel() for p in model.parameters()),
        "data": f"shapes questions on fresh free-layout scenes every step (seeds >= {TRAINING_SEEDS_FROM}); "
                f"held-out: {held_out_size} questions, seed {shapes.HELD_OUT_SEED}",
        "held_out": report, "alignment": {**alignment, "scenes": f"200 scenes, seed {ALIGNMENT_SEED}"}, "history": history,
        "previous_stages": previous.get("previous_stages", []) + [{k: v for k, v in previous.items() if k != "previous_stages"}],
    }
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
