"""Random-weight models with the exact shapes of LLaVA-1.5-7B and -13B and of Mipha-3B, for timing without the weights.

Speed and memory depend on the model's shapes, not on its weight values, so a `LlavaForConditionalGeneration`
built from these configs with random weights times like the llava-hf checkpoints: CLIP ViT-L/14 at 336 px
(576 image tokens, features from the second-to-last layer, CLS dropped), a two-layer GELU projector, and a
Llama-2 decoder (vocabulary 32064). The tokenizer is the fixtures' small one: its ids stay below the
vocabulary size, and the benchmarks measure prompt lengths in its tokens. Mipha-3B's shape is what `convert-mipha`
makes of zhumj34/Mipha-3B: Phi-2 (32 layers of 2560, partial rotary 0.4, a head with a bias) and SigLIP so400m at
384 px (729 image tokens, every token of layer -2), images padded to a square.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The numbers of llava-hf/llava-1.5-{7b,13b}-hf's config.json.
CLIP_VIT_L_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
LLAMA_DECODERS = {
    "llava7b-shape": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32},
    "llava13b-shape": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
                       "num_key_value_heads": 40},
}
LLAVA_15_VOCAB_SIZE = 32064
LLAVA_15_SHAPES = tuple(LLAMA_DECODERS)
MIPHA_SHAPE = "mipha3b-shape"
# zhumj34/Mipha-3B's config.json: Phi-2's sizes
PHI_2 = {"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
         "max_position_embeddings": 2048, "rope_theta": 10000.0}
SHAPES = (*LLAVA_15_SHAPES, MIPHA_SHAPE)
HUB_IDS = {"llava7b-shape": "llava-hf/llava-1.5-7b-hf", "llava13b-shape": "llava-hf/llava-1.5-13b-hf",
           MIPHA_SHAPE: "zhumj34/Mipha-3B"}  # whose shapes these are


def llava15_config(name: str, tokenizer):
    """The `LlavaConfig` of `name` (one of LLAVA_15_SHAPES), with `tokenizer`'s special-token ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if name not in LLAMA_DECODERS:
        raise ValueError(f"unknown LLaVA-1.5 shape {name!r}; allowed: {', '.join(LLAVA_15_SHAPES)}")
    text_config = LlamaConfig(
        vocab_size=LLAVA_15_VOCAB_SIZE, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **LLAMA_DECODERS[name],
    )
    vision = CLIPVisionConfig(**CLIP_VIT_L_336)
    return LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )


def mipha3b_config(tokenizer):
    """The `LlavaConfig` that `convert-mipha` writes for Mipha-3B, with `tokenizer`'s special-token ids."""
    from transformers import LlavaConfig, PhiConfig, SiglipVisionConfig

    from lmms_simignore.models.mipha import HEAD_BIAS_FILE, SIGLIP_SO400M_384

    text_config = PhiConfig(**PHI_2, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = SiglipVisionConfig(**{key: value for key, value in SIGLIP_SO400M_384.items() if key != "model_type"}, vision_use_head=False)
    config = LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="full",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2, multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.lm_head_bias = HEAD_BIAS_FILE
    return config


def shape_config(name: str, tokenizer):
    """The `LlavaConfig` of any of SHAPES."""
    if name == MIPHA_SHAPE:
        return mipha3b_config(tokenizer)
    return llava15_config(name, tokenizer)


def write_random_shape(name: str, output_dir: str | Path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Path:
    """Build `name` (one of SHAPES) with random weights directly on `device` in `dtype` and save it (safetensors +
    processor; Mipha's head bias in its own file, as `convert-mipha` writes it).

    7B in float16 is 14 GB on disk (13B: 26 GB; Mipha-3B: 6.4 GB); building on a GPU takes seconds.
    """
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from lmms_simignore.models.mipha import HEAD_BIAS_KEY, mipha_processor
    from lmms_simignore.testbed.tiny import build_processor, build_tokenizer

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; allowed: {', '.join(SHAPES)}")
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = shape_config(name, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    vision = config.vision_config
    if name == MIPHA_SHAPE:
        bias = torch.randn(model.lm_head.out_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
        save_file({HEAD_BIAS_KEY: bias}, str(output_dir / config.lm_head_bias))
        siglip = {"size": {"height": vision.image_size, "width": vision.image_size}}  # SigLIP's defaults otherwise
        mipha_processor(tokenizer, vision.patch_size, siglip).save_pretrained(output_dir)
    else:
        build_processor(tokenizer, vision.image_size, vision.patch_size).save_pretrained(output_dir)
    del model
    return output_dir
