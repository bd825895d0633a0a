"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a processed batch as the LLM sees it.

The processor writes one `<|image_pad|>` per merged 2x2 patch block between `<|vision_start|>` and `<|vision_end|>`
(raster order over the image's (H/28) x (W/28) grid); the vision tower's merged features go there, in order, and
the positions are the model's own multimodal rotary positions (`get_rope_index`: temporal, height and width), and
Qwen3-VL's DeepStack features (one merger per chosen tower layer, added to the outputs of the first decoder layers at
the image tokens) travel with the prompt as its per-layer image additions, so our loop over the decoder layers sees
exactly what the model's forward would.
"""

from __future__ import annotations

import torch

from lmms_simignore.engine.prompt import PromptEmbeddings, place_image_features

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def check_qwen_model(config) -> None:
    """Refuse, by name, a checkpoint that is not Qwen2-VL or Qwen2.5-VL."""
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
                                image_additions=additions, image_grids=grids)
