"""A tiny random Mipha checkpoint in the released layout, built in code (the real one, zhumj34/Mipha-3B, is 3B
parameters behind the hub): config.json with model_type `mipha_phi` (Phi's bos/eos defaults 1/2, the vision settings
as flat `mm_*` keys or a nested `vision_config` block), two safetensors shards with an index in Mipha's key names
(the head with a bias), a byte-level BPE tokenizer whose only special token is `<|endoftext|>` and which has no
`<image>`, and SigLIP's preprocessor_config.json. The weights come from transformers' `PhiForCausalLM`,
`SiglipVisionModel` and a Linear-GELU-Linear projector, as Mipha's code assembles them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class TinyMiphaShape:
    """24 px images in 4 px SigLIP patches give 36 image tokens (SigLIP has no CLS token)."""

    image_size: int = 24
    patch_size: int = 4
    vision_hidden: int = 16
    vision_layers: int = 3
    text_hidden: int = 32
    text_layers: int = 3
    heads: int = 4
    partial_rotary_factor: float = 0.5  # Phi-2: 0.4 of 80 dims; here 4 of 8
    spare_vocab_rows: int = 24  # embedding rows beyond the tokenizer (Mipha-3B: 51200 rows, 50295 tokens)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_mipha_tokenizer():
    """Phi-2-like: byte-level BPE, `<|endoftext|>` as bos/eos/unk, no BOS added to a text, no `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmms_simignore.testbed.tiny import _corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)


def tiny_siglip_config(shape: TinyMiphaShape = TinyMiphaShape()) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": shape.vision_hidden, "intermediate_size": shape.vision_hidden * 2,
            "num_hidden_layers": shape.vision_layers, "num_attention_heads": 2, "num_channels": 3, "image_size": shape.image_size,
            "patch_size": shape.patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0}


def build_tiny_mipha(output_dir: str | Path, seed: int = 0, shape: TinyMiphaShape = TinyMiphaShape(), layout: str = "flat",
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the released layout to `output_dir`. `layout="flat"`: `mm_*` keys, the tower only named (convert with
    `--vision-config tiny_siglip.json`, written alongside); `"nested"`: a `vision_config` block that describes it."""
    from safetensors.torch import save_file
    from transformers import PhiConfig, PhiForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    if layout not in ("flat", "nested"):
        raise ValueError(f"layout must be flat or nested, got {layout!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_mipha_tokenizer()
    tokenizer.save_pretrained(output_dir)
    vocab_rows = len(tokenizer) + shape.spare_vocab_rows

    torch.manual_seed(seed)
    text = PhiConfig(vocab_size=vocab_rows, hidden_size=shape.text_hidden, intermediate_size=shape.text_hidden * 2,
                     num_hidden_layers=shape.text_layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                     hidden_act="gelu_new", max_position_embeddings=2048, layer_norm_eps=1e-5, rope_theta=10000.0,
                     partial_rotary_factor=shape.partial_rotary_factor, initializer_range=0.2)
    language_model = PhiForCausalLM(text).eval()
    with torch.no_grad():
        language_model.lm_head.bias.normal_(0.0, 1.0)  # a head bias that matters
    siglip = tiny_siglip_config(shape)
    tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in siglip.items() if k != "model_type"})).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(shape.vision_hidden, shape.text_hidden), torch.nn.GELU(),
                                    torch.nn.Linear(shape.text_hidden, shape.text_hidden))

    weights = dict(language_model.state_dict())  # model.embed_tokens, model.layers.*, model.final_layernorm, lm_head.{weight,bias}
    weights.update({f"model.vision_tower.vision_model.{key}": value for key, value in tower.state_dict().items()})
    weights.update({f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()})
    weights = {key: value.detach().to(dtype).contiguous() for key, value in weights.items()}
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, str(output_dir / shard), metadata={"format": "pt"})
        weight_map.update({key: shard for key in keys})
    total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    (output_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

    config = {
        "architectures": ["MiphaPhiForCausalLM"], "model_type": "mipha_phi",
        "vocab_size": vocab_rows, "hidden_size": shape.text_hidden, "intermediate_size": shape.text_hidden * 2,
        "num_hidden_layers": shape.text_layers, "num_attention_heads": shape.heads, "num_key_value_heads": None,
        "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
        "partial_rotary_factor": shape.partial_rotary_factor, "qk_layernorm": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,  # Phi's defaults, not the tokenizer's (a trap the conversion must avoid)
        "torch_dtype": str(dtype).replace("torch.", ""), "image_aspect_ratio": "pad", "use_cache": True,
    }
    if layout == "flat":
        config.update({"mm_vision_tower": "tiny/siglip-tiny-patch4-24", "mm_hidden_size": shape.vision_hidden,
                       "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"})
        (output_dir / "tiny_siglip.json").write_text(json.dumps(siglip, indent=1))
    else:
        config["vision_config"] = {
            "vision_tower": {**siglip, "model_type": "mipha_vision_model", "mm_vision_select_layer": -2,
                             "mm_vision_select_feature": "patch", "vision_model_name_or_path": "tiny/siglip-tiny-patch4-24"},
            "mm_projector": {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": shape.vision_hidden, "hidden_size": shape.text_hidden},
        }
    (output_dir / "config.json").write_text(json.dumps(config, indent=1))
    SiglipImageProcessor(size={"height": shape.image_size, "width": shape.image_size}, resample=3).save_pretrained(output_dir)
    return output_dir
