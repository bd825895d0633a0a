"""A tiny offline LLaVA-NeXT: a random `LlavaNextForConditionalGeneration` of the real transformers classes.

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
