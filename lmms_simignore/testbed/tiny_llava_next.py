"""Tiny offline LLaVA-NeXT and LLaVA-OneVision: random checkpoints of the real transformers classes.

Its geometry is LLaVA-1.6's scaled down by 14: a CLIP tower of 24 px tiles in 6 px patches (4 x 4 = 16 tokens per
tile, after the CLS is dropped), the released grid pinpoints scaled alike ((336, 672) -> (24, 48), ...: up to 2 x 2 tiles
or 3 x 1), so an image becomes the 16 tokens of its base view, then the rows of its unpadded high-resolution grid, each
row followed by one `image_newline` embedding (up to 16 + 8 x 8 + 8 = 88 placeholders, as 2880 on the released
models). The processor is transformers' `LlavaNextProcessor` with the PIL image processor and the tiny LLaVA's vicuna
chat template, so `from_pretrained`, `AutoProcessor` and lmms-eval's built-in `llava_hf` load it offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmms_simignore.tasks.scienceqa_utils import LLAVA_CHAT_TEMPLATE
from lmms_simignore.testbed.tiny import TinyLlavaShape, build_tokenizer, tiny_clip_and_llama

NEXT_SHAPE = TinyLlavaShape(image_size=24, patch_size=6)
# the offline fixtures' (`python -m lmms_simignore fixtures DIR --llava-next`): 8 decoder layers, so that three-stage
# schedules given as fractions of the depth run as written; 8 x 8 patches per tile, so that the peers' smallest share
# (160 of 2880) still leaves VisionZip a token in each of an image's 5 views
FIXTURE_SHAPE = TinyLlavaShape(image_size=48, patch_size=6, text_layers=8)
RELEASED_TILE = 336  # LLaVA-1.6's tile size, whose pinpoints these are
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def scaled_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-1.6's grid pinpoints for tiles of `tile` pixels (the released 336 scaled)."""
    return [[height * tile // RELEASED_TILE, width * tile // RELEASED_TILE] for height, width in RELEASED_PINPOINTS]


def build_next_processor(tokenizer, shape: TinyLlavaShape = NEXT_SHAPE):
    """A `LlavaNextProcessor` as llava-hf's LLaVA-1.6 checkpoints have it (CLS counted then dropped by the `default`
    strategy), at `shape`'s tile size."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size},
        image_grid_pinpoints=scaled_pinpoints(shape.image_size),
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)


def build_tiny_llava_next(output_dir: str | Path, seed: int = 0, shape: TinyLlavaShape = NEXT_SHAPE) -> Path:
    """Write a random tiny LLaVA-NeXT checkpoint (safetensors + processor) to `output_dir`; loadable offline with
    `LlavaNextForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_target)
    vision_config, text_config = tiny_clip_and_llama(shape, tokenizer)
    config = LlavaNextConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=scaled_pinpoints(shape.image_size),
        image_seq_length=shape.image_tokens,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the newline embedding to zeros' scale; make it a distinct token
        model.model.image_newline.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    build_next_processor(tokenizer, shape).save_pretrained(output_dir)
    return output_dir


# LLaVA-OneVision: SigLIP tiles of 24 px in 6 px patches (16 tokens, no CLS, every token of the last layer), a Qwen2
# decoder, and its 6 x 6 grid pinpoints scaled from 384 px tiles: a large image's unpadded grid is shrunk bilinearly to
# about 9 tiles' worth (anyres_max_9), as the released model's is.
ONEVISION_TILE = 24
RELEASED_ONEVISION_TILE = 384


def onevision_pinpoints(tile: int = ONEVISION_TILE) -> list[list[int]]:
    """LLaVA-OneVision's grid pinpoints (1..6 x 1..6 tiles of 384 px) for tiles of `tile` pixels."""
    return [[tile * rows, tile * cols] for rows in range(1, 7) for cols in range(1, 7)]


def build_onevision_processor(tokenizer, shape: TinyLlavaShape = NEXT_SHAPE):
    """A `LlavaOnevisionProcessor` as llava-hf's OneVision checkpoints have it (SigLIP: no CLS, `full` strategy), with
    its video processor (which needs torchvision) and the tiny LLaVA's chat template."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": shape.image_size, "width": shape.image_size}
    image_processor = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=onevision_pinpoints(shape.image_size))
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                   num_image_tokens=shape.image_tokens, vision_feature_select_strategy="full",
                                   chat_template=LLAVA_CHAT_TEMPLATE)


def build_tiny_llava_onevision(output_dir: str | Path, seed: int = 0, shape: TinyLlavaShape = NEXT_SHAPE) -> Path:
    """Write a random tiny LLaVA-OneVision checkpoint (safetensors + processor) to `output_dir`; loadable offline with
    `LlavaOnevisionForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_target)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    _, llama = tiny_clip_and_llama(shape, tokenizer)
    vision_config = SiglipVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
                                       num_hidden_layers=2, num_attention_heads=shape.heads, image_size=shape.image_size,
                                       patch_size=shape.patch_size, vision_use_head=False)
    text_config = Qwen2Config(**{key: getattr(llama, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")})
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=onevision_pinpoints(shape.image_size),
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # a distinct newline embedding, as the released one
        model.model.image_newline.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    build_onevision_processor(tokenizer, shape).save_pretrained(output_dir)
    return output_dir
