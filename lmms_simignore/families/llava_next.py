"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: a processed batch as the LLM sees it, each image in tiles with newline
separators.

The processor writes one `<image>` placeholder per slot of the image's packed features, which the model builds
(`get_image_features` -> `pack_image_features`): the base view's grid of tokens (24 x 24 on LLaVA-1.6, 27 x 27 on
OneVision), then the rows of the unpadded high-resolution grid of its tiles (OneVision shrinks a grid larger than about 9
tiles bilinearly first; a prompt with several images gets each as its base view alone), each row followed by one
`image_newline` embedding (LLaVA-1.6: up to 576 + 48 x 48 + 48 = 2928 placeholders of which 2880 are image tokens). The newline slots are the model's own
separators: this adapter places every slot as the model does, and gives the engine only the image tokens, so a
reduction never drops or counts a newline, and every budget is per image over all its tiles. Positions are the 1-D ones
of the whole sequence (a dropped token leaves a gap, as on LLaVA-1.5).
"""

from __future__ import annotations

import math

import torch

from lmms_simignore.engine.families import check_plan_support
from lmms_simignore.engine.prompt import PromptEmbeddings, default_position_ids, image_tokens_per_image, place_image_features
from lmms_simignore.settings import Plan, ReductionSettings

MODEL_TYPES = ("llava_next", "llava_onevision")


def image_layout(features: torch.Tensor, newline: torch.Tensor, base_tokens: int) -> tuple[int, int]:
    """(rows, cols) of the high-resolution grid of one image's packed features (L, D), found from where the model put
    its `newline` (D,) embedding: after each of the `rows` rows of `cols` tokens that follow the `base_tokens` of the
    base view. Raises when the newlines do not stand there."""
    at = (features == newline.to(features.dtype)).all(dim=-1).nonzero().flatten().tolist()
    rows = len(at)
    cols = (features.shape[0] - base_tokens) // max(rows, 1) - 1
    if not rows or cols < 0 or at != [base_tokens + row * (cols + 1) + cols for row in range(rows)]:
        raise ValueError(f"an image's {features.shape[0]} packed features do not hold {base_tokens} base tokens and rows "
                         f"each followed by the image_newline embedding (found it at {at[:8]}...)")
    return rows, cols


@torch.inference_mode()
def embed_prompt(model, inputs) -> PromptEmbeddings:
    """Embed a processed batch (`input_ids`, `attention_mask`, `pixel_values` (B, tiles, 3, H, W), `image_sizes` (I, 2)).

    Every placeholder gets what the model puts there (image tokens and newlines); the prompt's images are their image
    tokens only: base + rows x cols of each image (images of different sizes give different numbers, `image_lengths`).
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    placeholders = input_ids == model.config.image_token_id  # (B, L)
    is_image = placeholders.clone()
    image_features = []
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[0]:
        extra = {key: inputs[key] for key in ("batch_num_images",) if key in inputs}  # OneVision: images per prompt
        packed = [features.to(inputs_embeds.dtype) for features in
                  model.model.get_image_features(pixel_values, inputs["image_sizes"], return_dict=True, **extra).pooler_output]
        if int(placeholders.sum()) != sum(len(features) for features in packed):
            raise ValueError(f"input_ids hold {placeholders.sum(dim=1).tolist()} image placeholders per row but the images "
                             f"pack into {[len(features) for features in packed]} features")
        inputs_embeds = inputs_embeds.masked_scatter(placeholders[..., None], torch.cat(packed))  # as the model places them
        base_tokens = image_tokens_per_image(model.config)
        separators = []
        for features in packed:
            rows, cols = image_layout(features, model.model.image_newline, base_tokens)
            slot = torch.arange(len(features), device=features.device)
            newline = (slot >= base_tokens) & ((slot - base_tokens) % (cols + 1) == cols)  # (L_i,)
            separators.append(newline)
            image_features.append(features[~newline])
        is_image[placeholders] = ~torch.cat(separators)
    return place_image_features(inputs_embeds, is_image, image_features, attention_mask, default_position_ids(attention_mask),
                                separated=True)


def largest_image_tokens(config) -> int:
    """Image tokens of the largest image a model of `config` takes: the base view and the grid of its largest pinpoint
    (an image of that pinpoint's aspect needs no padding): 576 + 48 x 48 = 2880 on LLaVA-1.6. OneVision's
    `anyres_max_N` shrinks a grid of more than about N tiles to N tiles' worth of tokens (its `pack_image_features`)."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size  # tokens along a tile's side (384 // 14 = 27 on OneVision)
    largest_tiles = getattr(config, "vision_aspect_ratio", None)
    grids = []
    for height, width in config.image_grid_pinpoints:
        rows, cols = height // tile * side, width // tile * side
        if largest_tiles is not None:
            ratio = math.sqrt(rows * cols / (int(largest_tiles.removeprefix("anyres_max_")) * side**2))
            rows, cols = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
        grids.append(rows * cols)
    return image_tokens_per_image(config) + max(grids)


def nominal_plan(config, settings: ReductionSettings) -> Plan:
    """The settings' stages for the largest image a model of `config` takes, so that bad budgets, layers and methods
    fail before any weights load; each batch's images are then planned for their own sizes (`engine.image_plans`)."""
    tokens = largest_image_tokens(config)
    try:
        plan = settings.plan(tokens, config.text_config.num_hidden_layers, None)
    except ValueError as error:
        raise ValueError(f"the largest image of this {config.model_type} checkpoint has {tokens} image tokens: {error}") from error
    check_tiled_plan(config, plan)
    return plan


def check_tiled_plan(config, plan: Plan) -> None:
    """Refuse, naming the method, what is not defined on tiled images here yet: a stage in the tower (the CLS-attention
    methods select per view, before the packing and unpadding) and a shorter image (each tile's grid shortened and the
    newlines placed anew)."""
    check_plan_support(config, plan)
    if plan.vision is not None:
        raise ValueError(f"{plan.vision.method} shortens each image inside the vision tower; on {config.model_type}'s tiles "
                         f"(a base view and the unpadded grid of its crops) that is not supported yet")
    if plan.pre_llm is not None and plan.pre_llm.replaces:
        raise ValueError(f"{plan.pre_llm.method} replaces each image by a shorter one; on {config.model_type}'s tiles, with "
                         f"newline separators after each row, that is not supported yet")
