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
from functools import partial

import torch

from lmms_simignore.engine.families import check_plan_support
from lmms_simignore.engine.prompt import PromptEmbeddings, default_position_ids, image_tokens_per_image, place_image_features
from lmms_simignore.engine.views import TiledImage, TowerView
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
def embed_prompt(model, inputs, keep_tower: bool = False) -> PromptEmbeddings:
    """Embed a processed batch (`input_ids`, `attention_mask`, `pixel_values` (B, tiles, 3, H, W), `image_sizes` (I, 2)).

    Every placeholder gets what the model puts there (image tokens and newlines); the prompt's images are their image
    tokens only: base + rows x cols of each image (images of different sizes give different numbers, `image_lengths`),
    on two grids (`image_tiles`: the base view's, then the unpadded grid of its crops; the base view's alone for an
    image the model gives no crops) from the tower's views (`image_views`: the base view and the crops). keep_tower:
    keep the tower's states of every view (`prompt.tower`) for a stage in the tower.
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    placeholders = input_ids == model.config.image_token_id  # (B, L)
    is_image = placeholders.clone()
    image_features, tiles, views, tiling, tower, block_ends = [], [], [], [], None, None
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[0]:
        extra = {key: inputs[key] for key in ("batch_num_images",) if key in inputs}  # OneVision: images per prompt
        output = model.model.get_image_features(pixel_values, inputs["image_sizes"], return_dict=True,
                                                output_hidden_states=keep_tower, **extra)
        packed = [features.to(inputs_embeds.dtype) for features in output.pooler_output]
        if int(placeholders.sum()) != sum(len(features) for features in packed):
            raise ValueError(f"input_ids hold {placeholders.sum(dim=1).tolist()} image placeholders per row but the images "
                             f"pack into {[len(features) for features in packed]} features")
        inputs_embeds = inputs_embeds.masked_scatter(placeholders[..., None], torch.cat(packed))  # as the model places them
        base_tokens = image_tokens_per_image(model.config)
        base_side = math.isqrt(base_tokens)
        separators = []
        for features, image_size in zip(packed, inputs["image_sizes"].tolist()):
            rows, cols = image_layout(features, model.model.image_newline, base_tokens)
            slot = torch.arange(len(features), device=features.device)
            newline = (slot >= base_tokens) & ((slot - base_tokens) % (cols + 1) == cols)  # (L_i,)
            separators.append(newline)
            image_features.append(features[~newline])
            tiles.append(((base_side, base_side), (rows, cols)) if cols else ((base_side, base_side),))
            crops = crop_grid(model.config, image_size) if cols else (0, 0)
            start = sum(views)
            views.append(1 + crops[0] * crops[1])
            sources = token_views(base_side, crops, image_size, (rows, cols), features.device)
            tiling.append(TiledImage(slice(start, start + views[-1]), *crops, sources))
        is_image[placeholders] = ~torch.cat(separators)
        block_ends = placeholders.nonzero()[torch.tensor([len(features) for features in packed]).cumsum(0) - 1, 1]  # (I,)
        if keep_tower:
            vision = model.model.vision_tower
            tower = TowerView.of(model.config, output.hidden_states,
                                 vision.encoder.layers if hasattr(vision, "encoder") else vision.vision_model.encoder.layers,
                                 tuple(tiling))
    prompt = place_image_features(inputs_embeds, is_image, image_features, attention_mask,
                                  default_position_ids(attention_mask), separated=True)
    prompt.image_tiles = tuple(tiles) if tiles else None
    prompt.image_views = torch.tensor(views, device=attention_mask.device) if views else None
    prompt.lay_out = partial(lay_out, model.model.image_newline.detach())
    prompt.tower = tower
    prompt.image_block_ends = block_ends if image_features else None  # each image's last newline
    return prompt


def crop_grid(config, image_size: list[int]) -> tuple[int, int]:
    """(rows, cols) of the crops the model cuts an image of `image_size` (height, width) into (transformers' own rule)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return tuple(get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size))


def token_views(side: int, crops: tuple[int, int], image_size: list[int], grid: tuple[int, int],
                device) -> torch.Tensor | None:
    """(N,) where each of an image's tokens comes from among its views' patches (V x side², flattened): the base view's,
    then the stitched grid of its `crops` (rows, cols) unpadded for its `image_size` (height, width) by the model's own
    `unpad_image`, row-major; None where that is not the packed `grid` (rows, cols) (OneVision shrinks a large grid)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    patches = side * side
    base = torch.arange(patches, device=device)
    if not crops[0] * crops[1]:
        return base
    view = 1 + torch.arange(crops[0] * crops[1], device=device).view(crops[0], 1, crops[1], 1)  # (rows, 1, cols, 1)
    patch = torch.arange(patches, device=device).view(1, side, 1, side)  # (1, side, 1, side)
    stitched = (view * patches + patch).reshape(1, crops[0] * side, crops[1] * side)
    unpadded = unpad_image(stitched, image_size)[0]
    return torch.cat([base, unpadded.flatten()]) if tuple(unpadded.shape) == tuple(grid) else None


def lay_out(newline: torch.Tensor, features: torch.Tensor, tiles: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's block as the model packs it: the base view's grid, then each row of the high-resolution grid
    followed by the `newline` (D,) embedding (one newline after the base view where there is no such grid).

    features: (K, D) the image's tokens on `tiles` (the base view's grid, then the high-resolution grid), row-major.
    Returns: the block (M, D) and (M,) bool, True on the newlines.
    """
    base = tiles[0][0] * tiles[0][1]
    newline = newline.to(features.dtype)[None]  # (1, D)
    rows, cols = tiles[1] if len(tiles) > 1 else (1, 0)  # no high-resolution grid: one empty row, then a newline
    grid = torch.cat([features[base:].reshape(rows, cols, -1), newline.expand(rows, 1, -1)], dim=1)  # (rows, cols + 1, D)
    is_newline = torch.zeros(rows, cols + 1, dtype=torch.bool, device=features.device)
    is_newline[:, cols] = True
    return (torch.cat([features[:base], grid.flatten(0, 1)]),
            torch.cat([is_newline.new_zeros(base), is_newline.flatten()]))


def largest_image_tokens(config) -> int:
    """Image tokens of the largest image a model of `config` takes: the base view and the grid of its largest pinpoint
    (an image of that pinpoint's aspect needs no padding): 576 + 48 x 48 = 2880 on LLaVA-1.6."""
    rows, cols = largest_high_resolution_grid(config)
    return image_tokens_per_image(config) + rows * cols


def largest_high_resolution_grid(config) -> tuple[int, int]:
    """(rows, cols) of the largest grid of crops' tokens a model of `config` packs: its largest pinpoint's, where
    OneVision's `anyres_max_N` shrinks a grid of more than about N tiles to N tiles' worth of tokens (its
    `pack_image_features`)."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size  # tokens along a tile's side (384 // 14 = 27 on OneVision)
    largest_tiles = getattr(config, "vision_aspect_ratio", None)
    grids = []
    for height, width in config.image_grid_pinpoints:
        rows, cols = height // tile * side, width // tile * side
        if largest_tiles is not None:
            ratio = math.sqrt(rows * cols / (int(largest_tiles.removeprefix("anyres_max_")) * side**2))
            rows, cols = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
        grids.append((rows, cols))
    return max(grids, key=lambda grid: grid[0] * grid[1])


def largest_views(config) -> int:
    """The tower's views of the largest image: the base view and the crops of the largest pinpoint (5 on LLaVA-1.6)."""
    tile = config.vision_config.image_size
    return 1 + max((height // tile) * (width // tile) for height, width in config.image_grid_pinpoints)


def nominal_plan(config, settings: ReductionSettings) -> Plan:
    """The settings' stages for the largest image a model of `config` takes, so that bad budgets, layers and methods
    fail before any weights load; each batch's images are then planned for their own sizes (`engine.image_plans`)."""
    tokens = largest_image_tokens(config)
    side = math.isqrt(image_tokens_per_image(config))
    tiles = ((side, side), largest_high_resolution_grid(config))
    try:
        plan = settings.plan(tokens, config.text_config.num_hidden_layers, None, tiles, largest_views(config))
    except ValueError as error:
        raise ValueError(f"the largest image of this {config.model_type} checkpoint has {tokens} image tokens: {error}") from error
    check_tiled_plan(config, plan)
    return plan


def check_tiled_plan(config, plan: Plan) -> None:
    """Refuse, naming the method, what is not defined on tiled images: a stage in the tower whose authors give no
    version for an image seen in several views (the CLS-attention methods also need LLaVA-NeXT's CLIP: OneVision's
    SigLIP has no CLS), and a stage before the LLM after one in the tower."""
    check_plan_support(config, plan)
    if plan.vision is not None and plan.vision.shorten_views is None and plan.vision.select_views is None:
        raise ValueError(f"{plan.vision.method} on an image in tiles (a base view and the crops, as {config.model_type} "
                         f"sees it): {plan.vision.views_refusal}; refused")
    if plan.vision is not None and plan.vision.select_views is not None and getattr(config, "vision_aspect_ratio", None):
        raise ValueError(f"{plan.vision.method} on {config.model_type}: its authors' LLaVA-NeXT code carries each view's "
                         f"kept patches through the unpadding as a mask, which {config.model_type}'s "
                         f"{config.vision_aspect_ratio} (a large grid shrunk by bilinear interpolation) cannot carry, and "
                         f"their code refuses that aspect setting; refused")
    if plan.vision is not None and plan.pre_llm is not None:
        raise ValueError(f"{plan.pre_llm.method} after {plan.vision.method}: a stage before the LLM on the shortened views "
                         f"of a tiled image is not defined")
