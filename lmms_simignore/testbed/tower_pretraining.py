"""The testbed recipe's first stage: CLIP-like contrastive pre-training of a tiny vision tower on scene captions.

    python -m lmms_simignore pretrain-tower --out DIR [--steps 1500] [--batch-size 128] [--lr 1e-3] [--seed 0] [--region-weight 5]
    python -m lmms_simignore probe-tower --tower DIR [--layer -2]

LLaVA-1.5's image tokens are aligned with text because CLIP's tower was trained contrastively on captions.
Scaled down: a CLIPVisionModel reading 64 px scenes of the free layout as 8 x 8 patches (`scenes`), and a
small CLIPTextModel reading their captions (`scenes.caption`: size, colour, shape and position of each
object), each followed by a linear projection, trained with CLIP's symmetric InfoNCE loss over the batch.
The text side pools the mean of its last hidden states over the caption's tokens (CLIPTextModel's own
pooling picks the end token by a rule tied to particular token ids).

A second, region-level term (`region_weight`; after RegionCLIP, Zhong et al. 2022, and GLIP's region-word
alignment) matches each object's patch tokens with its phrase: the mean of the object's patch states at the
layer LLaVA reads (`REGION_LAYER`, vision_feature_layer -2), projected, against the text encoder's embeddings
of all `OBJECT_PHRASES` ("large red circle", ...), cross-entropy over the phrases. Without it the scene
loss is met by colours and positions alone and the patch tokens hardly tell shapes apart (a linear probe reads
an object's shape from its patch states for 0.56 of held-out objects, chance 0.33; with the term: 0.94, see
`probe_object_attributes`); real CLIP patch tokens do carry such semantics. Fresh scenes every step from seeds
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

from lmms_simignore.testbed import scenes, shapes

HELD_OUT_SCENES_SEED = shapes.HELD_OUT_SEED + 1


def shapes_image_processor(image_size: int = scenes.IMAGE_SIZE):
    """`image_size` px in and out (no resize or crop effect), CLIP's normalisation: what the testbed models read."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
REGION_LAYER = -2  # the tower hidden state that LLaVA's projector reads (vision_feature_layer)
OBJECT_KINDS = tuple((size, colour, shape) for size in scenes.SIZES for colour in scenes.COLOURS for shape in scenes.SHAPES)
OBJECT_PHRASES = tuple(scenes.phrase(scenes.PlacedObject(colour, shape, size, 0, 0)) for size, colour, shape in OBJECT_KINDS)
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


def object_regions(records: list[dict]) -> tuple[list[tuple[int, list[int]]], torch.Tensor]:
    """Every object of `records`: (record index, the patches it covers) and the index of its phrase in OBJECT_PHRASES."""
    regions, phrases = [], []
    for index, record in enumerate(records):
        for obj in scene_objects(record):
            regions.append((index, scenes.covered_patches(obj)))
            phrases.append(OBJECT_KINDS.index((obj.size, obj.colour, obj.shape)))
    return regions, torch.tensor(phrases)


def region_states(hidden: torch.Tensor, regions: list[tuple[int, list[int]]]) -> torch.Tensor:
    """(B, 1 + N, D) tower states (CLS first) -> (O, D): each region's mean over its patch tokens."""
    return torch.stack([hidden[index, [1 + patch for patch in patches]].mean(dim=0) for index, patches in regions])


def phrase_loss(region_embeddings: torch.Tensor, phrase_embeddings: torch.Tensor, phrases: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """(O, P) region and (K, P) phrase embeddings, L2-normalised; (O,) index of each region's phrase: cross-entropy
    of each region over all K phrases (CLIP's zero-shot classifier, trained)."""
    return torch.nn.functional.cross_entropy(region_embeddings @ phrase_embeddings.T * logit_scale.exp(), phrases)


def check_positive(**values: int) -> None:
    """Refuse a setting below 1, naming it."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def check_folder(argument: str, folder: str | Path, command: str) -> None:
    """Refuse a folder that `command` did not write (it has no config.json), naming the argument."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{argument}={str(folder)!r} is not a folder written by `{command}` (no config.json in it)")


def command_line(command: str) -> str:
    """The command that is running, as a training record states it."""
    return " ".join([f"python -m lmms_simignore {command}"] + sys.argv[2:])


def build_caption_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer trained on captions of scenes drawn from `seed`."""
    from lmms_simignore.testbed.tiny import build_tokenizer

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
        return self.embed_images_and_regions(pixel_values)[0]

    def embed_images_and_regions(self, pixel_values: torch.Tensor, regions: list[tuple[int, list[int]]] | None = None):
        """(B, 3, 64, 64) -> (B, P) image embeddings and, for `regions` (`object_regions`), (O, P) region
        embeddings from the mean patch states at REGION_LAYER; both L2-normalised and in the same projection."""
        output = self.vision(pixel_values=pixel_values, output_hidden_states=regions is not None)
        images = torch.nn.functional.normalize(self.vision_projection(output.pooler_output), dim=-1)
        if regions is None:
            return images, None
        patches = region_states(output.hidden_states[REGION_LAYER], regions)  # (O, 64)
        return images, torch.nn.functional.normalize(self.vision_projection(patches), dim=-1)

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
def phrase_accuracy(model: ContrastivePair, pixel_values: torch.Tensor, regions: tuple[list, torch.Tensor], phrase_ids: dict) -> dict:
    """For every object: is its most similar phrase among OBJECT_PHRASES its own ('phrase'), and does that phrase
    name its size, colour and shape? (chance: 1/36, 1/3, 1/4, 1/3)."""
    boxes, truth = regions
    _, embeddings = model.embed_images_and_regions(pixel_values, boxes)
    best = (embeddings @ model.embed_texts(phrase_ids["input_ids"], phrase_ids["attention_mask"]).T).argmax(dim=1).cpu()
    accuracy = {"phrase": (best == truth).float().mean().item()}
    for position, name in enumerate(("size", "colour", "shape")):  # the order of OBJECT_KINDS
        accuracy[name] = sum(OBJECT_KINDS[b][position] == OBJECT_KINDS[t][position] for b, t in zip(best.tolist(), truth.tolist())) / len(truth)
    return accuracy


PROBE_SCENES_SEED = HELD_OUT_SCENES_SEED + 10  # held-out scenes of the linear probe (training scenes: seeds >= TRAINING_SEEDS_FROM)
ATTRIBUTES = {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "size": tuple(scenes.SIZES), "column": tuple(range(scenes.PATCHES_PER_SIDE))}


def _attribute(obj: scenes.PlacedObject, name: str):
    """The object's colour, shape or size, or the patch column (0-7) of its centre."""
    return min(scenes.PATCHES_PER_SIDE - 1, int(obj.centre_x // scenes.PATCH)) if name == "column" else getattr(obj, name)


def _object_features(vision, image_processor, records: list[dict], layer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(O, D) mean patch states of every object at hidden state `layer`, and each attribute's (O,) labels."""
    pixels = image_processor(images=[record["image"] for record in records], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        hidden = vision(pixel_values=pixels.to(vision.device), output_hidden_states=True).hidden_states[layer].float().cpu()
    regions, _ = object_regions(records)
    objects = [obj for record in records for obj in scene_objects(record)]
    labels = {name: torch.tensor([values.index(_attribute(obj, name)) for obj in objects]) for name, values in ATTRIBUTES.items()}
    return region_states(hidden, regions), labels


def probe_object_attributes(vision, image_processor, layer: int = REGION_LAYER, train_scenes: int = 800, test_scenes: int = 300,
                            seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear probe (softmax regression on standardised features) that reads each object's
    colour, shape, size and column (of its centre, 0-7) from the mean of its patch states at `layer`: what the
    tower's patch tokens carry. Chance: 1/4, 1/3, 1/3, 1/8."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_labels = _object_features(vision, image_processor, scene_batch(train_scenes, seed=TRAINING_SEEDS_FROM + seed), layer)
    test_x, test_labels = _object_features(vision, image_processor, scene_batch(test_scenes, seed=PROBE_SCENES_SEED), layer)
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    accuracy = {}
    for name, values in ATTRIBUTES.items():
        weights = torch.zeros(train_x.shape[1], len(values)).normal_(0, 0.01, generator=generator).requires_grad_()
        bias = torch.zeros(len(values), requires_grad=True)
        optimizer = torch.optim.Adam([weights, bias], lr=1e-2)
        for _ in range(400):
            loss = torch.nn.functional.cross_entropy(train_x @ weights + bias, train_labels[name])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy[name] = round(((test_x @ weights + bias).argmax(dim=1) == test_labels[name]).float().mean().item(), 4)
    return accuracy


def probe_tower(tower_dir: str | Path, layer: int = REGION_LAYER) -> dict:
    """`probe_object_attributes` of a pretrain-tower folder's saved vision tower."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    folder = Path(tower_dir) / "vision"
    check_folder("tower_dir", folder, "pretrain-tower")
    vision = CLIPVisionModel.from_pretrained(folder).eval()
    return {"layer": layer, "object_probe": probe_object_attributes(vision, CLIPImageProcessorPil.from_pretrained(folder), layer)}


@torch.inference_mode()
def retrieval_top1(model: ContrastivePair, batch: dict) -> float:
    """Share of images whose most similar caption in the batch is their own (chance: 1 / batch size)."""
    similarity = model.embed_images(batch["pixel_values"]) @ model.embed_texts(batch["input_ids"], batch["attention_mask"]).T
    return (similarity.argmax(dim=1) == torch.arange(similarity.shape[0], device=similarity.device)).float().mean().item()


def pretrain_tower(output_dir: str | Path, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                   eval_every: int = 250, held_out_size: int = 256, region_weight: float = 5.0, device: str = "cpu", log=print) -> dict:
    """Train the pair on fresh scenes every step (scene loss + `region_weight` x region-phrase loss; 0 = CLIP's
    loss alone); save both encoders, projections, tokenizer, processor, training.json."""
    check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every, held_out_size=held_out_size)
    if region_weight < 0:
        raise ValueError(f"region_weight must be >= 0 (0: the scene loss alone), got {region_weight}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a contrastive batch needs negatives), got {batch_size}")
    output_dir = Path(output_dir)
    torch.manual_seed(seed)

    tokenizer, image_processor = build_caption_tokenizer(seed), shapes_image_processor(scenes.IMAGE_SIZE)
    model = ContrastivePair(tokenizer).to(device).train()
    optimisation = CosineAdamW(model.parameters(), lr, steps)
    held_out_records = scene_batch(held_out_size, seed=HELD_OUT_SCENES_SEED)
    held_out = {key: value.to(device) for key, value in encode_batch(held_out_records, tokenizer, image_processor).items()}
    held_out_regions = object_regions(held_out_records)
    phrase_ids = {key: value.to(device) for key, value in tokenizer(list(OBJECT_PHRASES), padding=True, return_tensors="pt").items()}
    rng, started, history = random.Random(seed), time.time(), []
    for step in range(1, steps + 1):
        records = scene_batch(batch_size, seed=rng.randrange(TRAINING_SEEDS_FROM, 2**31))
        batch = {key: value.to(device) for key, value in encode_batch(records, tokenizer, image_processor).items()}
        regions, phrases = object_regions(records) if region_weight else (None, None)
        images, region_embeddings = model.embed_images_and_regions(batch["pixel_values"], regions)
        scene_loss = info_nce(images, model.embed_texts(batch["input_ids"], batch["attention_mask"]), model.logit_scale)
        loss = scene_loss
        if region_weight:
            region_loss = phrase_loss(region_embeddings, model.embed_texts(phrase_ids["input_ids"], phrase_ids["attention_mask"]),
                                      phrases.to(device), model.logit_scale)
            loss = scene_loss + region_weight * region_loss
        optimisation.update(loss)
        if step % eval_every == 0 or step == steps:
            model.eval()
            top1, phrase_top1 = retrieval_top1(model, held_out), phrase_accuracy(model, held_out["pixel_values"], held_out_regions, phrase_ids)
            model.train()
            history.append({"step": step, "scene_loss": round(scene_loss.item(), 4), "held_out_top1": top1, "held_out_phrase": phrase_top1})
            log(f"step {step}: scene loss {scene_loss.item():.3f}, held-out image->caption top-1 of {held_out_size}: {top1:.3f}, "
                f"object->phrase: " + ", ".join(f"{name} {value:.3f}" for name, value in phrase_top1.items()) + f", {time.time() - started:.0f}s")
    model.to("cpu").eval()
    probe = probe_object_attributes(model.vision, image_processor)
    log(f"linear probe of each held-out object's mean patch state (layer {REGION_LAYER}): "
        + ", ".join(f"{name} {value:.3f}" for name, value in probe.items()))
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
        "region_weight": region_weight, "region_layer": REGION_LAYER,
        "wall_time_s": round(time.time() - started, 1),
        "data": f"scenes (free layout): fresh scenes every step (seeded); held-out: {held_out_size} scenes, seed {HELD_OUT_SCENES_SEED}",
        "held_out_top1": history[-1]["held_out_top1"], "chance": 1 / held_out_size,
        "held_out_object_phrase": history[-1]["held_out_phrase"],
        "object_probe": {"layer": REGION_LAYER, **probe, "chance": {name: round(1 / len(values), 4) for name, values in ATTRIBUTES.items()}},
        "history": history,
    }
    (output_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
