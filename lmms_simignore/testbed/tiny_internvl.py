"""A tiny offline InternVL3: a random `InternVLForConditionalGeneration` of the real transformers classes.

InternVL3's geometry at toy width: tiles of 112 px in 14 px patches (8 x 8 + a CLS token in InternViT, the CLS dropped,
pixel-shuffled 2 x 2 into 4 x 4 = 16 tokens per tile, as 448 px give 256), 1 to 12 tiles cut row-major plus a thumbnail
last when there are several, a pixel-shuffle MLP projector and a Qwen2 decoder. The processor is transformers'
`InternVLProcessor` (the GotOcr2 image processor forced to crop, ImageNet mean and std, its video processor, a
`Qwen2Tokenizer` naming `<img>`, `</img>` and `<IMG_CONTEXT>`) with the conversion script's chat template (no system
turn), so `from_pretrained`, `AutoProcessor` and lmms-eval's built-in `internvl_hf` load it offline. Each image becomes
`<img>` + `<IMG_CONTEXT>` x 16 per tile + `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_simignore.testbed.tiny_qwen import VISION_SPECIALS, _train_bpe

INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
VIDEO_TOKEN = "<video>"
# what InternVLProcessor reads off the tokenizer by name
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": VIDEO_TOKEN}
# transformers' InternVL conversion script's template: one `<IMG_CONTEXT>\n` per image part, no system turn
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class TinyInternVLShape:
    """Tiles of `image_size` px in `patch_size` px patches; pixel shuffle 0.5: (image_size / patch / 2)^2 tokens per tile
    (InternVL3: 448 / 14 -> 16 x 16 = 256; here 112 / 14 -> 4 x 4 = 16)."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 32
    text_hidden: int = 64
    text_layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vocab_target: int = 400
    max_patches: int = 12

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size // 2) ** 2


def build_internvl_tokenizer(vocab_size: int = 400):
    """A `Qwen2Tokenizer` over a tiny trained BPE, Qwen2.5-VL's and InternVL's special tokens after it, eos
    `<|im_end|>`, pad `<|endoftext|>`, no bos, and the named image tokens the processor reads."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(vocab_size)
    specials = VISION_SPECIALS + INTERNVL_SPECIALS + [VIDEO_TOKEN]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", extra_special_tokens=dict(NAMED_TOKENS))
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.model_max_length = 8192
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_internvl_processor(tokenizer, shape: TinyInternVLShape = TinyInternVLShape()):
    """`InternVLProcessor` as the -hf checkpoints have it: tiles of `shape.image_size`, 1..max_patches tiles and a
    thumbnail, ImageNet mean and std, `image_seq_length` tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    common = dict(size={"height": shape.image_size, "width": shape.image_size}, image_mean=IMAGENET_MEAN,
                  image_std=IMAGENET_STD, do_convert_rgb=True)
    image_processor = GotOcr2ImageProcessor(crop_to_patches=False, min_patches=1, max_patches=shape.max_patches, **common)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(**common),
                             image_seq_length=shape.image_seq_length, chat_template=CHAT_TEMPLATE)


def build_tiny_internvl(output_dir: str | Path, seed: int = 0, shape: TinyInternVLShape = TinyInternVLShape()) -> Path:
    """Write a random tiny InternVL checkpoint (safetensors + processor) to `output_dir`; loadable offline with
    `InternVLForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_internvl_tokenizer(shape.vocab_target)
    ids = tokenizer.convert_tokens_to_ids
    vision_config = {  # InternViT-300M's kind: q/k/v biases, no q/k norm, LayerNorm, layer scale 0.1
        "hidden_size": shape.vision_hidden, "intermediate_size": shape.vision_hidden * 4, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": shape.image_size, "patch_size": shape.patch_size, "attention_bias": True,
        "use_qk_norm": False, "norm_type": "layer_norm", "use_mean_pooling": True, "layer_scale_init_value": 0.1,
    }
    text_config = {
        "model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": shape.text_hidden,
        "intermediate_size": shape.text_hidden * 2, "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "initializer_range": 0.2, "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"), "tie_word_embeddings": False,
    }
    config = InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=ids("<IMG_CONTEXT>"),
                            image_seq_length=shape.image_seq_length, downsample_ratio=0.5, projector_hidden_act="gelu",
                            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    build_internvl_processor(tokenizer, shape).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
