"""Train a small LLaVA (the llava-hf classes) from scratch on the shapes benchmark.

    python -m lmms_simignore train-shapes --out DIR [--steps 6000] [--device cuda]

Design for learnability: one image token per grid cell (patch size = cell size), options in a fixed
order per question type, the loss on the answer letter and the end-of-answer token only, a curriculum
from one object upward, and a larger initializer range. Writes safetensors weights, the processor,
`training.json` (command, seed, data, wall time, held-out accuracy per type and per object count).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from lmms_simignore import shapes
from lmms_simignore.fixtures import CHAT_TEMPLATE, SYSTEM_PROMPT, build_tokenizer
from lmms_simignore.tasks.scienceqa_utils import POST_PROMPT


def shapes_corpus() -> list[str]:
    """Text the tokenizer is trained on: the shapes prompts, the template words and the answer letters."""
    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:", POST_PROMPT.strip(), "A. B. C. D. E. F. A B C D E F"]
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            lines += [f"What colour is the {shape}? What shape is the {colour} object? Is there a {colour} {shape}?",
                      f"Is the {colour} {shape} left of the {colour} {shape}? How many objects are there?"]
    lines += [" ".join(shapes.COLOURS), " ".join(shapes.SHAPES), " ".join(shapes.COUNTS), "yes no"]
    return lines * 4


def shapes_image_processor(image_size: int = shapes.IMAGE_SIZE):
    """`image_size` px in and out (no resize or crop effect), CLIP's normalisation: what the testbed models read."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_shapes_llava(seed: int = 0):
    """A fresh (untrained) model and processor for the shapes geometry: 64 px images, 16 px patches = 16 tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(vocab_size=600, corpus=shapes_corpus())
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=shapes.IMAGE_SIZE, patch_size=shapes.CELL, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(shapes.IMAGE_SIZE // shapes.CELL) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = shapes_image_processor()
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=shapes.CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


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


@torch.inference_mode()
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


def train(output_dir: str | Path, steps: int = 6000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
          device: str = "cpu", eval_every: int = 500, mix: tuple[str, ...] = shapes.QUESTION_TYPES, held_out_size: int = 1000,
          curriculum: float = 0.4, init_from: str | Path | None = None, log=print) -> dict:
    """Train from scratch (or go on from the model in `init_from`); save the model, processor and training.json.

    `curriculum`: fraction of the steps over which the largest object count grows from 1 to MAX_OBJECTS
    (0: every batch has 1..MAX_OBJECTS objects from the start, as a second stage wants).
    """
    if not 0 <= curriculum <= 1:
        raise ValueError(f"curriculum must be a fraction of the steps in [0, 1], got {curriculum}")
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    device = torch.device(device)
    if init_from is None:
        model, processor = build_shapes_llava(seed=seed)
        previous = None
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init_from, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(init_from)
        previous_record = Path(init_from) / "training.json"
        previous = json.loads(previous_record.read_text()) if previous_record.is_file() else None
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    held_out = shapes.shapes_records(held_out_size, seed=shapes.HELD_OUT_SEED)
    rng = random.Random(seed)
    started, history = time.time(), []
    for step in range(1, steps + 1):
        # curriculum: the largest object count grows from 1 to MAX_OBJECTS over the first `curriculum` of the steps
        max_objects = shapes.MAX_OBJECTS if curriculum == 0 else min(shapes.MAX_OBJECTS, 1 + int(shapes.MAX_OBJECTS * step / (curriculum * steps)))
        records = shapes.shapes_records(batch_size, seed=rng.randrange(2**31), max_objects=max_objects, question_types=mix)
        batch = encode(processor, records, with_answers=True).to(device)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            report = evaluate(model, processor, held_out, device)
            history.append({"step": step, "loss": loss.item(), "held_out": report["overall"], "max_objects": max_objects})
            log(f"step {step}: loss {loss.item():.3f}, held-out accuracy {report['overall']:.3f} "
                f"({', '.join(f'{k} {v:.2f}' for k, v in report['per_type'].items())}), {time.time() - started:.0f}s")
    report = evaluate(model, processor, held_out, device)
    model.to("cpu").eval()
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    summary = {
        "command": " ".join(["python -m lmms_simignore train-shapes"] + sys.argv[2:]),
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "device": str(device), "mix": list(mix),
        "wall_time_s": round(time.time() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "curriculum": curriculum, "init_from": None if init_from is None else str(init_from),
        "data": f"shapes.shapes_records: fresh questions every step (seeded); held-out: {held_out_size} questions, seed {shapes.HELD_OUT_SEED}",
        "held_out": report, "history": history,
    }
    if previous is not None:
        summary["previous_stages"] = previous.get("previous_stages", []) + [{k: v for k, v in previous.items() if k != "previous_stages"}]
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
