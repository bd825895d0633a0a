"""The testbed recipe's first stage: CLIP-like contrastive pre-training of a tiny vision tower on scene captions.

    python -m lmms_simignore pretrain-tower --out DIR [--steps 1500] [--batch-size 128] [--lr 1e-3] [--seed 0]

LLaVA-1.5's image tokens are aligned with text because CLIP's tower was trained contrastively on captions.
Scaled down: a CLIPVisionModel reading 64 px scenes of the free layout as 8 x 8 patches (`scenes`), and a
small CLIPTextModel reading their captions (`scenes.caption`: size, colour, shape and position of each
object), each followed by a linear projection, trained with CLIP's symmetric InfoNCE loss over the batch.
The text side pools the mean of its last hidden states over the caption's tokens (CLIPTextModel's own
pooling picks the end token by a rule tied to particular token ids). Fresh scenes every step from seeds
at or above `TRAINING_SEEDS_FROM`; the held-out scenes (and the shapes held-out questions) use seeds below it.

Writes `vision/` and `text/` (safetensors, loadable with `CLIPVisionModel` / `CLIPTextModel`), the
caption tokenizer, the image processor, the projections and `training.json` (command, settings, wall
time, held-out image->caption retrieval).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from lmms_simignore import scenes, shapes

HELD_OUT_SCENES_SEED = shapes.HELD_OUT_SEED + 1
TRAINING_SEEDS_FROM = 2**20  # every training batch draws its scenes from a seed >= this; evaluation seeds are below
PROJECTION_DIM = 64


def scene_batch(num_scenes: int, seed: int, draw: bool = True) -> list[dict]:
    """`num_scenes` scenes (one record each) with 1..MAX_OBJECTS objects; `draw=False` leaves out
    the images (the same scenes, for text-only uses)."""
    return shapes.shapes_records(num_scenes, seed=seed, question_types=("count",), draw=draw)


def scene_objects(record: dict) -> list[scenes.PlacedObject]:
    return [scenes.PlacedObject(**obj) for obj in record["objects"]]


def captions_of(records: list[dict]) -> list[str]:
    return [scenes.caption(scene_objects(record)) for record in records]


def check_positive(**values: int) -> None:
    """Refuse a setting below 1, naming it."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def command_line(command: str) -> str:
    """The command that is running, as a training record states it."""
    return " ".join([f"python -m lmms_simignore {command}"] + sys.argv[2:])


def build_caption_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer trained on captions of scenes drawn from `seed`."""
    from lmms_simignore.fixtures import build_tokenizer

    return build_tokenizer(vocab_size=300, corpus=captions_of(scene_batch(2000, seed=seed, draw=False)))


def info_nce(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: (B, P) L2-normalised embeddings, pair i = (image i, text i)."""
    logits = image_embeddings @ text_embeddings.T * logit_scale.exp()  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2


class CosineAdamW:
    """The testbed stages' optimisation: AdamW, a linear warm-up over 2% of `steps`, then cosine decay to zero;
    `update(loss)` does one step (gradients clipped to `clip_norm` when given)."""

    def __init__(self, parameters, lr: float, steps: int, weight_decay: float = 0.01, clip_norm: float | None = None):
        self.parameters = [parameter for parameter in parameters if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 50)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
        self.clip_norm = clip_norm

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_norm)
        self.optimizer.step()
        self.schedule.step()


class ContrastivePair(torch.nn.Module):
    """A vision tower and a caption encoder with their projections into one embedding space."""

    def __init__(self, tokenizer):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

        super().__init__()
        self.vision = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH, projection_dim=PROJECTION_DIM,
        ))
        self.text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=160, projection_dim=PROJECTION_DIM, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ))
        self.vision_projection = torch.nn.Linear(64, PROJECTION_DIM, bias=False)
        self.text_projection = torch.nn.Linear(64, PROJECTION_DIM, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) -> (B, P), L2-normalised, from the tower's pooled CLS state."""
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # (B, 64)
        return torch.nn.functional.normalize(self.vision_projection(pooled), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, P), L2-normalised, from the mean of the caption's token states."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, 64)
        weights = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)  # (B, 64)
        return torch.nn.functional.normalize(self.text_projection(pooled), dim=-1)


def encode_batch(records: list[dict], tokenizer, image_processor) -> dict:
    texts = tokenizer(captions_of(records), padding=True, return_tensors="pt")
    pixels = image_processor(images=[record["image"] for record in records], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"]}


@torch.inference_mode()
def retrieval_top1(model: ContrastivePair, batch: dict) -> float:
    """Share of images whose most similar caption in the batch is their own (chance: 1 / batch size)."""
    similarity = model.embed_images(batch["pixel_values"]) @ model.embed_texts(batch["input_ids"], batch["attention_mask"]).T
    return (similarity.argmax(dim=1) == torch.arange(similarity.shape[0], device=similarity.device)).float().mean().item()


def pretrain_tower(output_dir: str | Path, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                   eval_every: int = 250, held_out_size: int = 256, device: str = "cpu", log=print) -> dict:
    """Train the pair on fresh scenes every step; save both encoders, projections, tokenizer, processor, training.json."""
    check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every, held_out_size=held_out_size)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a contrastive batch needs negatives), got {batch_size}")
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    from lmms_simignore.llava_recipe import shapes_image_processor

    tokenizer, image_processor = build_caption_tokenizer(seed), shapes_image_processor(scenes.IMAGE_SIZE)
    model = ContrastivePair(tokenizer).to(device).train()
    optimisation = CosineAdamW(model.parameters(), lr, steps)
    held_out = {key: value.to(device) for key, value in
                encode_batch(scene_batch(held_out_size, seed=HELD_OUT_SCENES_SEED), tokenizer, image_processor).items()}
    rng, started, history = random.Random(seed), time.time(), []
    for step in range(1, steps + 1):
        batch = encode_batch(scene_batch(batch_size, seed=rng.randrange(TRAINING_SEEDS_FROM, 2**31)), tokenizer, image_processor)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = info_nce(model.embed_images(batch["pixel_values"]), model.embed_texts(batch["input_ids"], batch["attention_mask"]),
                        model.logit_scale)
        optimisation.update(loss)
        if step % eval_every == 0 or step == steps:
            model.eval()
            top1 = retrieval_top1(model, held_out)
            model.train()
            history.append({"step": step, "loss": round(loss.item(), 4), "held_out_top1": top1})
            log(f"step {step}: loss {loss.item():.3f}, held-out image->caption top-1 of {held_out_size}: {top1:.3f}, "
                f"{time.time() - started:.0f}s")
    model.to("cpu").eval()
    model.vision.save_pretrained(output_dir / "vision", safe_serialization=True)
    model.text.save_pretrained(output_dir / "text", safe_serialization=True)
    tokenizer.save_pretrained(output_dir / "text")
    image_processor.save_pretrained(output_dir / "vision")
    from safetensors.torch import save_file

    save_file({"vision_projection": model.vision_projection.weight.detach().contiguous(),
               "text_projection": model.text_projection.weight.detach().contiguous(),
               "logit_scale": model.logit_scale.detach().reshape(1)}, str(output_dir / "projections.safetensors"))
    summary = {
        "command": command_line("pretrain-tower"),
        "stage": "contrastive pre-training of the vision tower (CLIP-like) on scene captions",
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "device": str(device),
        "wall_time_s": round(time.time() - started, 1),
        "data": f"scenes (free layout): fresh scenes every step (seeded); held-out: {held_out_size} scenes, seed {HELD_OUT_SCENES_SEED}",
        "held_out_top1": history[-1]["held_out_top1"], "chance": 1 / held_out_size, "history": history,
    }
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
