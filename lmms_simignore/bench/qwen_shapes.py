"""A random-weight model with the exact shape of Qwen2.5-VL-7B-Instruct, for timing without the weights.

As for the LLaVA shapes (`lmms_simignore.bench.llava_shapes`), speed and memory depend on the shapes, not on the
weight values: a `Qwen2_5_VLForConditionalGeneration` of this config times like the released checkpoint. Its ViT
(32 blocks of 1280, windows of 112 px with full attention in blocks 7, 15, 23 and 31, patch 14, 2x2 merge) gives one
token per 28 x 28 pixels, so a 1280 x 960 photo, which the processor resizes to 1288 x 952, becomes 46 x 34 = 1564
image tokens; its decoder is Qwen2 with M-RoPE (28 layers of 3584, 28 query heads and 4 key/value heads of 128,
vocabulary 152064). The tokenizer and processor are the tiny Qwen2.5-VL's (`lmms_simignore.testbed.tiny_qwen`: the
real classes, ids below the vocabulary size; prompt lengths are in its tokens) with lmms-eval's `qwen2_5_vl` pixel
limits. The FLOP model (`lmms_simignore.bench.flops`) counts the 4 key/value heads' projections as such; the
decoder's q/k/v biases (3584 + 2 x 512 additions per token and layer) are left out with the norms.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

QWEN25_VL_7B_SHAPE = "qwen2_5_vl7b-shape"
HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"  # whose shape this is
FAMILY = "qwen2_5_vl"
# The numbers of Qwen/Qwen2.5-VL-7B-Instruct's config.json, spelled as transformers 5 spells them: its
# `rope_scaling: {"type": "mrope", "mrope_section": ...}` and `rope_theta` are `rope_parameters`, `in_chans` is
# `in_channels`.
QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3,
}


def qwen25_vl_7b_config(tokenizer):
    """The `Qwen2_5_VLConfig` of Qwen2.5-VL-7B-Instruct's shape, with `tokenizer`'s special-token ids."""
    from transformers import Qwen2_5_VLConfig

    from lmms_simignore.testbed.tiny_qwen import special_token_ids

    ids = special_token_ids(tokenizer)
    text = {**copy.deepcopy(QWEN25_VL_7B_TEXT), **{key: ids[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    vision_ids = {key: ids[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=copy.deepcopy(QWEN25_VL_7B_VISION), tie_word_embeddings=False,
                            **vision_ids)


def qwen25_vl_processor(tokenizer):
    """The tiny Qwen2.5-VL processor over `tokenizer`, with lmms-eval's `qwen2_5_vl` pixel limits (256 x 28 x 28 to
    1605632: 256 to 2048 image tokens)."""
    from lmms_simignore.models.qwen_vl_simignore import BUILTIN_CLASSES
    from lmms_simignore.testbed.tiny_qwen import TinyQwenShape, build_processor, pixel_limits

    builtin = BUILTIN_CLASSES[FAMILY]
    pixels_per_token = pixel_limits(FAMILY, 1, 1)[0]  # (patch x merge)^2
    limits = TinyQwenShape(min_image_tokens=builtin.min_pixels // pixels_per_token,
                           max_image_tokens=builtin.max_pixels // pixels_per_token)
    return build_processor(FAMILY, tokenizer, limits)


def write_random_shape(output_dir: str | Path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Path:
    """Build Qwen2.5-VL-7B's shape with random weights directly on `device` in `dtype` and save it (safetensors,
    tokenizer and processor).

    In float16 it is 16.6 GB on disk (8.3 B parameters: the decoder 7.6 B with its untied head, the ViT 0.7 B).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lmms_simignore.testbed.tiny_qwen import build_qwen_tokenizer, special_token_ids

    output_dir = Path(output_dir)
    tokenizer = build_qwen_tokenizer(FAMILY)
    config = qwen25_vl_7b_config(tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    ids = special_token_ids(tokenizer)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["bos_token_id"]]  # <|im_end|>, <|endoftext|>
    model.save_pretrained(output_dir, safe_serialization=True)
    qwen25_vl_processor(tokenizer).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    del model
    return output_dir
