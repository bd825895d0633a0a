"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a processed batch as the LLM sees it.

The processor writes one `<|image_pad|>` per merged 2x2 patch block between `<|vision_start|>` and `<|vision_end|>`
(raster order over the image's (H/28) x (W/28) grid); the vision tower's merged features go there, in order, and
the positions are the model's own multimodal rotary positions (`get_rope_index`: temporal, height and width), and
Qwen3-VL's DeepStack features (one merger per chosen tower layer, added to the outputs of the first decoder layers at
the image tokens) travel with the prompt as its per-layer image additions, so our loop over the decoder layers sees
exactly what the model's forward would.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from lmms_simignore.engine.families import check_cls_attention, check_plan_support
from lmms_simignore.engine.prompt import PromptEmbeddings, place_image_features
from lmms_simignore.settings import Plan, ReductionSettings

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def check_qwen_model(config) -> None:
    """Refuse, by name, a checkpoint that is not Qwen2-VL, Qwen2.5-VL or Qwen3-VL."""
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"this checkpoint is {config.model_type!r}; the Qwen-VL adapter handles {', '.join(MODEL_TYPES)}")


@torch.inference_mode()
def embed_prompt(model, inputs) -> PromptEmbeddings:
    """Embed a processed batch (the processor's `input_ids`, `attention_mask`, `mm_token_type_ids`, and
    `pixel_values` (sum of t*h*w patches, C*2*14*14) with `image_grid_thw` (I, 3) when it has images).

    Each image gives (h/2)*(w/2) tokens, so images of different sizes give different numbers (the prompt's
    `image_lengths`); positions are (B, L, 3), 0 on left padding.
    """
    check_qwen_model(model.config)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == model.config.image_token_id  # (B, L)
    grid = inputs.get("image_grid_thw")
    if grid is not None and grid.shape[0]:
        outputs = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        image_features = list(outputs.pooler_output)  # one (N_i, D) per image
        additions = tuple(list(level) for level in getattr(outputs, "deepstack_features", None) or ())
    else:
        grid, additions = None, ()
        image_features = []
    positions, _ = model.model.get_rope_index(input_ids, inputs["mm_token_type_ids"], image_grid_thw=grid,
                                              attention_mask=attention_mask)  # (3, B, L)
    grids = None
    if grid is not None:
        if (grid[:, 0] != 1).any():
            raise ValueError(f"image_grid_thw has temporal sizes {grid[:, 0].tolist()}; an image has 1 (videos are not "
                             f"supported)")
        grids = grid[:, 1:] // model.config.vision_config.spatial_merge_size  # (I, 2) merged tokens per row and column
    return place_image_features(inputs_embeds, is_image, image_features, attention_mask, positions.permute(1, 2, 0),
                                image_additions=additions, image_grids=grids, positions_for=partial(rope_positions, model))


def rope_positions(model, is_image: torch.Tensor, attention_mask: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """(B, L, 3) the model's own multimodal rotary positions (`get_rope_index`) for a sequence whose image tokens are
    `is_image` (B, L), one contiguous block per image in row-major order, the images' token grids `grids` (I, 2) (rows,
    cols of merged tokens), and `attention_mask` (B, L) (0 on left padding): each image's tokens at (T, H, W) = (p, p +
    row, p + col), the text after it from p + max(rows, cols), as the model places an image of that grid."""
    merge = model.config.vision_config.spatial_merge_size
    image_grid_thw = torch.cat([torch.ones_like(grids[:, :1]), grids * merge], dim=1)  # (I, 3) in patches, as the processor writes it
    token_types = is_image.long()  # 1 marks an image token, 0 text
    positions, _ = model.model.get_rope_index(token_types, token_types, image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)  # (3, B, L)
    return positions.permute(1, 2, 0)


def nominal_plan(config, settings: ReductionSettings, max_pixels: int) -> Plan:
    """The settings' stages for the largest image a model of `config` takes (a square of `max_pixels`: side =
    floor(sqrt(max_pixels) / (patch x merge)) merged tokens), so that bad budgets, layers and methods fail before any
    weights load; each batch's images are then planned for their own sizes (`engine.image_plans`)."""
    check_cls_attention(config, settings.needs_cls_attention)  # whatever the budgets, before planning them
    vision = config.vision_config
    side = max(1, math.isqrt(int(max_pixels)) // (vision.patch_size * vision.spatial_merge_size))
    try:
        plan = settings.plan(side * side, config.text_config.num_hidden_layers, (side, side))
    except ValueError as error:
        raise ValueError(f"an image at max_pixels={max_pixels} has {side * side} tokens ({side} x {side}): {error}") from error
    check_qwen_plan(config, plan)
    return plan


def check_qwen_plan(config, plan: Plan) -> None:
    """Refuse, naming the method, what a Qwen-VL model cannot give: a CLS token's attention, a stage inside the ViT,
    positions re-packed or closed up on its multimodal rotary positions, a merging stage among Qwen3-VL's DeepStack
    layers."""
    check_plan_support(config, plan)
    deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())  # Qwen3-VL's added levels
    for stage in plan.layers:
        if stage.merges and stage.layer < deepstack:
            raise ValueError(f"{stage.method}'s stage at layer {stage.layer} merges image tokens, but {config.model_type} adds "
                             f"image features to the outputs of layers 0-{deepstack - 1} (DeepStack), which a merged token "
                             f"has no row of: its stage must be at layer {deepstack} or later")
        if stage.positions != "original":
            raise ValueError(f"{stage.method}'s stage at layer {stage.layer} re-packs the positions of the tokens it keeps "
                             f"(its authors' rule on 1-D positions), which is not defined for {config.model_type}'s "
                             f"multimodal rotary positions: pass stage_positions=original (each kept token keeps its own)")
    if plan.pre_llm is not None and plan.pre_llm.positions == "contiguous":
        raise ValueError(f"{plan.pre_llm.method} closes up the positions of the image tokens it keeps (its authors' rule on "
                         f"1-D positions), which is not defined for {config.model_type}'s multimodal rotary positions: "
                         f"pass {plan.pre_llm.method}_positions=original (each kept token at its own position)")
    if plan.vision is not None:
        raise ValueError(f"{plan.vision.method} shortens each image inside the vision tower, which is defined here for "
                         f"the CLIP and SigLIP towers of LLaVA-style models only; {config.model_type}'s ViT (windowed "
                         f"attention, 2x2 patch merger, no CLS token) is refused")
