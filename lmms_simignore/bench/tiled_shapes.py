"""Random-weight models with the exact shapes of LLaVA-1.6-vicuna-7B and LLaVA-OneVision-qwen2-7B, for timing without
the weights.

As for the other shapes (`lmms_simignore.bench.llava_shapes`, `.qwen_shapes`), speed and memory depend on the shapes,
not on the weight values. Both models cut an image into tiles of the tower's size, chosen among their grid pinpoints,
and feed the LLM a base view of the whole image, then the rows of the unpadded high-resolution grid of its tiles, each
row followed by one `image_newline` embedding (`lmms_simignore.families.llava_next`):

- `llava-hf/llava-v1.6-vicuna-7b-hf`: CLIP ViT-L/14 at 336 px (576 tokens per tile, CLS dropped, layer -2), a GELU
  projector and a Llama-2 decoder (Vicuna-7B: 32 layers of 4096, vocabulary 32064). A 672 x 672 image is 2 x 2 tiles:
  576 + 48 x 48 = 2880 image tokens and 48 newlines.
- `llava-hf/llava-onevision-qwen2-7b-ov-hf`: SigLIP so400m at 384 px with its last layer dropped (26 layers, 729 tokens
  per tile, every token of the last), a GELU projector and a Qwen2 decoder (Qwen2-7B-Instruct: 28 layers of 3584, 4
  key/value heads; vocabulary 152128: Qwen2's 152064 plus `<image>` and `<video>`, padded to a multiple of 64 by
  transformers' conversion script). A 1152 x 1152 image is 3 x 3 tiles: 729 + 81 x 81 = 7290 image tokens and 81
  newlines (`anyres_max_9` shrinks a grid only above about 9 tiles' worth).

The tokenizer is the fixtures' small one (ids below the vocabulary size; OneVision's processor also needs a `<video>`
token), and the processors are the tiny tiled checkpoints' builders (`lmms_simignore.testbed.tiny_llava_next`) at the
released tile sizes, so prompt lengths are in its tokens.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from lmms_simignore.bench.llava_shapes import CLIP_VIT_L_336
from lmms_simignore.testbed.tiny import TinyLlavaShape
from lmms_simignore.testbed.tiny_llava_next import RELEASED_PINPOINTS

LLAVA_NEXT_7B_SHAPE = "llava_next7b-shape"
LLAVA_ONEVISION_7B_SHAPE = "llava_onevision7b-shape"
SHAPES = (LLAVA_NEXT_7B_SHAPE, LLAVA_ONEVISION_7B_SHAPE)
HUB_IDS = {LLAVA_NEXT_7B_SHAPE: "llava-hf/llava-v1.6-vicuna-7b-hf",
           LLAVA_ONEVISION_7B_SHAPE: "llava-hf/llava-onevision-qwen2-7b-ov-hf"}  # whose shapes these are

# llava-hf/llava-v1.6-vicuna-7b-hf's config.json: its text_config sets the vocabulary, positions and norm epsilon; the
# rest are LlamaConfig's defaults, Llama-2-7B's (written out here so that they do not follow transformers' defaults)
VICUNA_7B = {
    "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
# llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json: Qwen2-7B-Instruct's decoder with the vocabulary resized, in
# transformers 5's spelling (`rope_theta` is `rope_parameters`)
QWEN2_7B = {
    "vocab_size": 152128, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False,
}
SIGLIP_SO400M_26 = {  # so400m-patch14-384 without its last layer and pooling head, as the conversion script writes it
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16, "patch_size": 14,
    "image_size": 384, "vision_use_head": False,
}
ONEVISION_ASPECT_RATIO = "anyres_max_9"
# the tile geometry of each shape's processor (`tiny_llava_next`'s builders take it as a TinyLlavaShape)
TILES = {LLAVA_NEXT_7B_SHAPE: TinyLlavaShape(image_size=336, patch_size=14),
         LLAVA_ONEVISION_7B_SHAPE: TinyLlavaShape(image_size=384, patch_size=14)}


def _check_name(name: str) -> None:
    if name not in SHAPES:
        raise ValueError(f"unknown tiled model shape {name!r}; allowed: {', '.join(SHAPES)}")


def shape_tokenizer(name: str):
    """The fixtures' small tokenizer for `name` (one of SHAPES), with `<video>` added for OneVision's processor."""
    from lmms_simignore.testbed.tiny import build_tokenizer

    _check_name(name)
    tokenizer = build_tokenizer()
    if name == LLAVA_ONEVISION_7B_SHAPE:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    return tokenizer


def llava_next_7b_config(tokenizer):
    """The `LlavaNextConfig` of llava-v1.6-vicuna-7b's shape, with `tokenizer`'s special-token ids (its grid pinpoints:
    the released 1 x 2, 2 x 1, 2 x 2, 3 x 1 and 1 x 3 tiles of 336 px)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text_config = LlamaConfig(**copy.deepcopy(VICUNA_7B), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(**CLIP_VIT_L_336)
    return LlavaNextConfig(
        vision_config=vision, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=copy.deepcopy(RELEASED_PINPOINTS), image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def llava_onevision_7b_config(tokenizer):
    """The `LlavaOnevisionConfig` of llava-onevision-qwen2-7b-ov's shape, with `tokenizer`'s special-token ids (its
    grid pinpoints: the config's default, 1..6 x 1..6 tiles of 384 px)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text_config = Qwen2Config(**copy.deepcopy(QWEN2_7B), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M_26), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=ONEVISION_ASPECT_RATIO, tie_word_embeddings=False,
    )


def shape_config(name: str, tokenizer):
    """The config of `name` (one of SHAPES)."""
    _check_name(name)
    return llava_next_7b_config(tokenizer) if name == LLAVA_NEXT_7B_SHAPE else llava_onevision_7b_config(tokenizer)


def shape_processor(name: str, tokenizer):
    """The processor of `name` (one of SHAPES) over `tokenizer`: the tiny tiled checkpoints' builders at the released
    tile size (LLaVA-1.6: 336 px tiles, its 5 pinpoints; OneVision: 384 px tiles, 1..6 x 1..6 of them, 729 tokens)."""
    from lmms_simignore.testbed.tiny_llava_next import build_next_processor, build_onevision_processor

    _check_name(name)
    if name == LLAVA_NEXT_7B_SHAPE:
        return build_next_processor(tokenizer, TILES[name])
    return build_onevision_processor(tokenizer, TILES[name])


def full_tile_side(image_processor, vision_aspect_ratio: str | None) -> int:
    """Side in pixels of the largest square image whose tiles reach the LLM whole: the largest square grid pinpoint of
    `image_processor`, of at most N tiles where `vision_aspect_ratio` is `anyres_max_N` (OneVision shrinks a larger
    grid). LLaVA-1.6: 672 (2 x 2 tiles of 336); OneVision: 1152 (3 x 3 tiles of 384)."""
    tile = (image_processor.crop_size if image_processor.do_center_crop else image_processor.size)["height"]
    most_tiles = math.inf if vision_aspect_ratio is None else int(vision_aspect_ratio.removeprefix("anyres_max_"))
    sides = [height for height, width in image_processor.image_grid_pinpoints
             if height == width and (height // tile) ** 2 <= most_tiles]
    if not sides:
        raise ValueError(f"image_grid_pinpoints {image_processor.image_grid_pinpoints} hold no square grid of at most "
                         f"{most_tiles} tiles of {tile} px")
    return max(sides)


def write_random_shape(name: str, output_dir: str | Path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Path:
    """Build `name` (one of SHAPES) with random weights directly on `device` in `dtype` and save it (safetensors,
    tokenizer and processor).

    In float16, llava_next7b-shape is 14.1 GB on disk (7.06 B parameters) and llava_onevision7b-shape 16.1 GB (8.03 B).
    """
    from transformers import AutoModelForImageTextToText

    _check_name(name)
    output_dir = Path(output_dir)
    tokenizer = shape_tokenizer(name)
    config = shape_config(name, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    shape_processor(name, tokenizer).save_pretrained(output_dir)
    del model
    return output_dir
