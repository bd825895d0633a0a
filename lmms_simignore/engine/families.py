"""The model families our layer loop knows: the language models whose decoder layers it runs and reads, and the vision
towers whose tokens it counts. Each is tested against transformers' own forward and eager attention; anything else is
refused by name before any compute, never run approximately."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_simignore.methods.base import CLS_ATTENTION, CLS_TOKEN, PATCH_ATTENTION, PATCHES_ALONE


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between the supported decoders, as far as our loop is concerned.

    final_norm: the language model's norm after the last layer; rotary_axes: 1 for 1-D positions, 3 for the multimodal
    rotary embedding (M-RoPE: temporal, height and width positions, which the rotary module recomposes into one
    (cos, sin) per token, so the layers apply it as any rotary embedding). Everything else the loop uses is common to
    them: each layer's `input_layernorm`, `self_attn.q_proj`/`k_proj` (rotary embedding on the first `cos.shape[-1]`
    dims of each head: all of them for Llama, Phi's partial share; per-head query/key norms where the attention has
    them), one causal mask for every layer, no step between the embedding and the first layer other than dropout, nor
    between layers other than the prompt's per-layer image additions (DeepStack).
    """

    name: str
    final_norm: str
    rotary_axes: int = 1


DECODER_FAMILIES = {
    "llama": DecoderFamily("llama", final_norm="norm"),  # LLaVA-1.5 (Vicuna)
    "phi": DecoderFamily("phi", final_norm="final_layernorm"),  # Mipha-3B (Phi-2): partial rotary, parallel attention + MLP
    "qwen2": DecoderFamily("qwen2", final_norm="norm"),  # LLaVA-OneVision: Llama's layout with q/k/v biases
    "qwen2_vl_text": DecoderFamily("qwen2_vl_text", final_norm="norm", rotary_axes=3),  # Qwen2-VL (Qwen2 with M-RoPE)
    "qwen2_5_vl_text": DecoderFamily("qwen2_5_vl_text", final_norm="norm", rotary_axes=3),  # Qwen2.5-VL
    # Qwen3-VL: query/key norms per head (applied by the attention rows), interleaved M-RoPE (inside its rotary module),
    # DeepStack (the prompt's per-layer image additions, applied by the loop)
    "qwen3_vl_text": DecoderFamily("qwen3_vl_text", final_norm="norm", rotary_axes=3),
}
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def decoder_family(text) -> DecoderFamily:
    """The family of a language model's config; refuses the ones the loop would run wrongly."""
    family = DECODER_FAMILIES.get(text.model_type)
    if family is None:
        raise ValueError(
            f"the language model of this checkpoint is {text.model_type!r}, which llava_simignore does not run: its loop "
            f"over the decoder layers is checked for {', '.join(DECODER_FAMILIES)} only (others differ in ways it would "
            f"miss: query/key norms, sliding-window layers, embedding scaling)"
        )
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        raise ValueError(f"this {text.model_type} language model has sliding-window layers (use_sliding_window=true), "
                         f"which the loop's one causal mask for every layer would run wrongly; this checkpoint is refused")
    if family.name == "phi" and getattr(text, "qk_layernorm", False):
        raise ValueError("a Phi language model with qk_layernorm=true normalises queries and keys per head, which the "
                         "loop's attention rows do not; this checkpoint is refused")
    return family


def check_model_support(config) -> DecoderFamily:
    """Refuse, by name, a llava config whose language model or vision tower the engine does not handle."""
    tower = config.vision_config.model_type
    if tower not in VISION_TOWERS:
        raise ValueError(
            f"the vision tower of this checkpoint is {tower!r}; llava_simignore handles towers with a fixed number of "
            f"tokens per image: {', '.join(VISION_TOWERS)} (a tower with a variable number, such as pixtral's, is refused)"
        )
    return decoder_family(config.text_config)


def final_norm(language_model):
    """The norm applied after a language model's last decoder layer (`model.norm`, Phi's `final_layernorm`)."""
    return getattr(language_model, decoder_family(language_model.config).final_norm)


def check_plan_support(config, plan) -> None:
    """Refuse, naming the method, a plan whose methods need what this model cannot give (a CLS token's attention, each
    image token's attention in the tower)."""
    check_cls_attention(config, plan.needing(CLS_ATTENTION))
    check_cls_token(config, plan.needing(CLS_TOKEN))
    if config.vision_config.model_type == "clip_vision_model":  # SigLIP: the attention received, and no CLS token
        check_cls_attention(config, plan.needing(PATCH_ATTENTION))
        check_patches_alone(config, plan.needing(PATCHES_ALONE))


def check_patches_alone(config, needing: tuple[str, ...]) -> None:
    """Refuse, naming them, methods that rank and keep a CLIP tower's patches alone (`needing`) where its CLS token is
    itself an image token."""
    if needing and config.vision_feature_select_strategy != "default":
        raise ValueError(f"{', '.join(needing)} ranks the patches by the CLS token's attention; under "
                         f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} the CLS token is "
                         f"itself an image token (supported: 'default', which projects the patches alone)")


def check_cls_token(config, needing: tuple[str, ...]) -> None:
    """Refuse, naming them, methods that read a CLS token in the tower (`needing`) where it has none, or that take one
    feature layer where the checkpoint concatenates several."""
    if not needing:
        return
    names = ", ".join(needing)
    tower = config.vision_config.model_type
    if tower != "clip_vision_model":
        raise ValueError(f"{names} ranks patches by the CLS token's attention; the vision tower {tower!r} has no CLS "
                         f"token (supported: clip_vision_model)")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"{names} needs one vision feature layer; this checkpoint concatenates layers "
                         f"{config.vision_feature_layer}")


def check_cls_attention(config, needing: tuple[str, ...]) -> None:
    """Refuse, naming them, methods that read the CLS token's attention in the tower's feature layer (`needing`) where
    it has none."""
    if not needing:
        return
    check_cls_token(config, needing)
    if config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1) == 0:
        raise ValueError(f"{', '.join(needing)} needs the attention of the feature layer; vision_feature_layer selects the patch "
                         f"embeddings, which have none")
