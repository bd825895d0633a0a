"""InternVL3: a processed batch as the LLM sees it, each image as the tokens of its tiles.

The processor cuts an image into 1..max_patches tiles (row-major, plus a thumbnail last when there are several) and
writes `<img>` + `<IMG_CONTEXT>` x 256 per tile + `</img>`: one run of context tokens per image, no separator between its
tiles. The model's `get_image_features` gives 256 tokens per tile (InternViT, its CLS dropped, pixel-shuffled 2 x 2 and
projected), which go to the context tokens in order. So an image is its tiles' tokens, 256 x tiles (`image_tiles`: a
16 x 16 grid each, which pooling pools on its own), and every budget is per image over all of them (budget_per=tile:
per tile); positions are the 1-D ones of the sequence (a dropped token leaves a gap).
"""

from __future__ import annotations

import math

import torch

from lmms_simignore.engine.prompt import PromptEmbeddings, default_position_ids, place_image_features
from lmms_simignore.settings import Plan, ReductionSettings

MODEL_TYPES = ("internvl",)


def image_runs(is_image: torch.Tensor) -> list[int]:
    """Lengths of the runs of image tokens of (B, L) bool, in row-major order (one run per image)."""
    runs = []
    for row in is_image.tolist():
        length = 0
        for flag in row + [False]:
            if flag:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


@torch.inference_mode()
def embed_prompt(model, inputs) -> PromptEmbeddings:
    """Embed a processed batch (`input_ids`, `attention_mask`, `pixel_values` (tiles of all images, 3, S, S)): each image
    the tokens of its tiles, at its run of `<IMG_CONTEXT>` tokens."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == model.config.image_token_id  # (B, L)
    image_features = []
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[0]:
        tiles = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output  # (T, n, D)
        runs = image_runs(is_image)
        if sum(runs) != tiles.shape[0] * tiles.shape[1] or any(run % tiles.shape[1] for run in runs):
            raise ValueError(f"input_ids hold runs of {runs} image tokens but pixel_values give {tiles.shape[0]} tiles of "
                             f"{tiles.shape[1]} tokens")
        image_features = list(tiles.flatten(0, 1).split(runs))  # one (tiles_i * n, D) per image
    prompt = place_image_features(inputs_embeds, is_image, image_features, attention_mask, default_position_ids(attention_mask))
    if image_features:
        side = math.isqrt(tiles.shape[1])
        counts = [run // tiles.shape[1] for run in runs]
        prompt.image_tiles = tuple(((side, side),) * count for count in counts)  # each tile its own grid
        prompt.image_views = torch.tensor(counts, device=attention_mask.device)
    return prompt


def largest_image_tokens(config, max_patches: int) -> int:
    """Image tokens of the largest image: `max_patches` tiles and the thumbnail, 256 each (3328 at 12 tiles)."""
    return config.image_seq_length * (max_patches + 1)


def nominal_plan(config, settings: ReductionSettings, max_patches: int) -> Plan:
    """The settings' stages for the largest image (`max_patches` tiles + thumbnail), so that bad budgets, layers and
    methods fail before any weights load; each batch's images are then planned for their own sizes."""
    tokens = largest_image_tokens(config, max_patches)
    side = math.isqrt(config.image_seq_length)
    try:
        plan = settings.plan(tokens, config.text_config.num_hidden_layers, None, ((side, side),) * (max_patches + 1),
                             max_patches + 1)
    except ValueError as error:
        raise ValueError(f"an image of {max_patches} tiles and its thumbnail has {tokens} image tokens: {error}") from error
    if plan.vision is not None:
        raise ValueError(f"{plan.vision.method} shortens each image inside the vision tower, defined here for the CLIP "
                         f"and SigLIP towers of LLaVA-style models; "
                         f"its authors' code has no InternVL version, and InternViT's tiles are pixel-shuffled after it: "
                         f"refused on {config.model_type}")
    return plan
