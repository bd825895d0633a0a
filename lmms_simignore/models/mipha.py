"""Mipha checkpoints (Phi-2 + SigLIP, model_type `mipha_phi`) converted into transformers' own Llava classes.

    python -m lmms_simignore convert-mipha SRC OUT [--vision-config FILE]

SRC is a folder in Mipha's released layout (config.json, sharded safetensors with an index, Phi-2's tokenizer files,
a SigLIP preprocessor_config.json). OUT loads with `--model_args pretrained=OUT`: a `LlavaForConditionalGeneration`
whose language model is transformers' `PhiModel` and whose tower is its `SiglipVisionModel`, a `LlavaProcessor` that
pads each image to a square with the mean colour before SigLIP's resize (Mipha's `expand2square`), and Mipha's prompt
(`{system} USER: <image>\\n{text} ASSISTANT:`, no BOS). Mipha's language-model head has a bias, which transformers'
Llava head lacks: it is written to `lm_head_bias.safetensors`, declared in config.json and attached on load
(`attach_head_bias`); a checkpoint that declares it and lacks it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HEAD_BIAS_FILE = "lm_head_bias.safetensors"
HEAD_BIAS_KEY = "lm_head.bias"
IMAGE_TOKEN = "<image>"
# google/siglip-so400m-patch14-384, Mipha-3B's tower (its config.json names the tower but does not describe it)
SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
}
BUILT_IN_TOWERS = {"google/siglip-so400m-patch14-384": SIGLIP_SO400M_384}
# what describes a tower; the rest of a config transformers writes (vision_use_head, transformers_version, dtype,
# architectures, ...) is not the tower's: the pooling head is always dropped
SIGLIP_FIELDS = tuple(key for key in SIGLIP_SO400M_384 if key != "model_type")
PHI_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps", "rope_theta",
              "partial_rotary_factor", "qk_layernorm", "resid_pdrop", "embd_pdrop", "attention_dropout", "initializer_range")


def is_mipha_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "mipha_phi"


def hub_mipha_snapshot(pretrained: str, revision: str = "main") -> Path | None:
    """A hub id whose config.json says `mipha_phi` (zhumj34/Mipha-3B): its released files, downloaded (safetensors,
    JSON and tokenizer files only; no pickled weights). None for anything else, which transformers then loads or refuses."""
    if Path(pretrained).exists() or pretrained.count("/") != 1:
        return None
    import huggingface_hub

    try:
        config = json.loads(Path(huggingface_hub.hf_hub_download(pretrained, "config.json", revision=revision)).read_text())
    except (OSError, ValueError):  # unreachable or no such file: transformers' own loading reports it
        return None
    if config.get("model_type") != "mipha_phi":
        return None
    return Path(huggingface_hub.snapshot_download(pretrained, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt"]))


def read_mipha_config(src: Path, vision_config_file: str | Path | None = None) -> dict:
    """The parts of a Mipha config.json the conversion needs: Phi sizes, the vision tower (flat `mm_*` keys or a nested
    `vision_config` block; its SiglipVisionConfig fields only, from `vision_config_file`, the block or a known tower),
    the projector and the image aspect rule. Refuses anything else with what was expected."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{src} is not a Mipha folder: it has no config.json (expected Mipha's released layout: "
                         f"config.json with model_type 'mipha_phi', sharded safetensors, Phi-2's tokenizer files, a "
                         f"SigLIP preprocessor_config.json)")
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != "mipha_phi":
        raise ValueError(f"{src} is not a Mipha folder: config.json has model_type {raw.get('model_type')!r}, expected "
                         f"'mipha_phi' (Mipha-3B: Phi-2 + SigLIP)")
    nested = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else None
    if nested and nested.get("model_type") == "siglip_vision_model":  # llava-hf's layout: the block is the tower's config
        nested = {"vision_tower": nested}
    tower = dict(nested.get("vision_tower", {})) if nested else {}
    projector = dict(nested.get("mm_projector", {})) if nested else {}

    def setting(flat_key: str, nested_value, default=None):
        value = raw.get(flat_key, nested_value)
        return default if value is None else value

    tower_name = setting("mm_vision_tower", tower.get("vision_model_name_or_path"))
    select_layer = setting("mm_vision_select_layer", tower.get("mm_vision_select_layer"), -2)
    select_feature = setting("mm_vision_select_feature", tower.get("mm_vision_select_feature"), "patch")
    projector_type = setting("mm_projector_type", projector.get("mm_projector_type"))
    mm_hidden = setting("mm_hidden_size", projector.get("mm_hidden_size"))
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"{config_path}: mm_projector_type is {projector_type!r}; Llava's projector is Mipha's "
                         f"'mlp2x_gelu' (Linear, GELU, Linear), the only one converted")
    if select_feature != "patch":
        raise ValueError(f"{config_path}: mm_vision_select_feature is {select_feature!r}; expected 'patch' (every token "
                         f"of the SigLIP layer)")

    if vision_config_file is not None:
        vision = json.loads(Path(vision_config_file).read_text())
        vision = vision.get("vision_config", vision)  # a whole SiglipConfig, or its vision part
    elif "hidden_size" in tower:  # the nested layout describes the tower (under Mipha's own model type)
        vision = {**tower, "model_type": "siglip_vision_model"}
    elif (known := next((name for name in BUILT_IN_TOWERS if str(tower_name).rstrip("/").endswith(name)), None)) is not None:
        vision = dict(BUILT_IN_TOWERS[known])  # a hub id or a local copy of it
    else:
        raise ValueError(f"{config_path}: the vision tower {tower_name!r} is not described in config.json and is not one "
                         f"we know ({', '.join(BUILT_IN_TOWERS)}); give its SiglipVisionConfig JSON with --vision-config")
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(f"the vision tower must be SigLIP (siglip_vision_model), got {vision.get('model_type')!r}")
    vision = {key: vision[key] for key in SIGLIP_FIELDS if key in vision}
    if mm_hidden is not None and int(mm_hidden) != int(vision["hidden_size"]):
        raise ValueError(f"{config_path}: mm_hidden_size {mm_hidden} does not match the tower's hidden_size {vision['hidden_size']}")
    text = {key: raw[key] for key in PHI_FIELDS if raw.get(key) is not None}
    return {"text": text, "vision": vision, "select_layer": int(select_layer),
            "pad_to_square": setting("image_aspect_ratio", tower.get("image_aspect_ratio"), "pad") == "pad"}


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the sharded safetensors checkpoint (index file, or a single model.safetensors)."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = sorted(path.name for path in src.iterdir())
        raise ValueError(f"{src}: no safetensors checkpoint (expected model.safetensors.index.json and its shards, "
                         f"safetensors only); found {found}")
    weights = {}
    for shard in shards:
        weights.update(load_file(src / shard))
    return weights


def llava_key(mipha_key: str) -> str | None:
    """A Mipha weight's name in transformers' Llava (in-memory names), or None for the tower's unused pooling head."""
    if mipha_key.startswith("model.vision_tower.vision_model.head."):
        return None  # SigLIP's attention-pooling head: features come from layer -2, the head never runs
    for old, new in (("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
                     ("model.vision_tower.vision_model.", "model.vision_tower."),
                     ("model.", "model.language_model."),
                     ("lm_head.", "lm_head.")):
        if mipha_key.startswith(old):
            return new + mipha_key[len(old):]
    raise ValueError(f"unexpected weight {mipha_key!r} in a Mipha checkpoint (expected model.*, lm_head.*)")


def convert_mipha(src: str | Path, out: str | Path, vision_config_file: str | Path | None = None, echo=print) -> Path:
    """Convert the Mipha folder `src` into a llava-hf-style folder `out` (safetensors only); returns `out`."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, PhiConfig, SiglipVisionConfig

    src, out = Path(src), Path(out)
    settings = read_mipha_config(src, vision_config_file)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_rows = int(settings["text"]["vocab_size"])
    if image_token_id >= vocab_rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens with {IMAGE_TOKEN}, but the embedding matrix has "
                         f"{vocab_rows} rows: no free row for {IMAGE_TOKEN}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{src}: the tokenizer has no end-of-text token (Phi-2's is <|endoftext|>)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches are left-padded; the padding is masked

    weights = _read_weights(src)
    head_bias = weights.pop(HEAD_BIAS_KEY, None)
    if head_bias is None:
        raise ValueError(f"{src}: the checkpoint has no {HEAD_BIAS_KEY}; Mipha's language-model head has a bias")
    dtype = weights["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in weights else torch.bfloat16

    text_config = PhiConfig(**settings["text"], bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                            tie_word_embeddings=False)
    vision_config = SiglipVisionConfig(**settings["vision"], vision_use_head=False)  # the pooling head never runs
    image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=settings["select_layer"], vision_feature_select_strategy="full",
        image_seq_length=image_tokens, multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.lm_head_bias = HEAD_BIAS_FILE  # attach_head_bias reads it on load
    config.dtype = dtype

    mapped = {}
    for key, tensor in weights.items():
        new_key = llava_key(key)
        if new_key is not None:
            mapped[new_key] = tensor
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    result = model.load_state_dict(mapped, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{src}: the weights do not fill transformers' Llava exactly: missing {sorted(result.missing_keys)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")
    if head_bias.shape != (vocab_rows,):
        raise ValueError(f"{src}: {HEAD_BIAS_KEY} has shape {tuple(head_bias.shape)}, expected ({vocab_rows},)")
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_file({HEAD_BIAS_KEY: head_bias.contiguous()}, str(out / HEAD_BIAS_FILE))

    siglip = json.loads((src / "preprocessor_config.json").read_text()) if (src / "preprocessor_config.json").is_file() else None
    if siglip is None or "Siglip" not in str(siglip.get("image_processor_type", "")):
        raise ValueError(f"{src}: expected SigLIP's preprocessor_config.json (image_processor_type SiglipImageProcessor)")
    mipha_processor(tokenizer, vision_config.patch_size, siglip, settings["pad_to_square"]).save_pretrained(out)
    echo(f"converted {src} -> {out}: Phi {text_config.num_hidden_layers} layers, SigLIP {vision_config.num_hidden_layers} "
         f"layers, {image_tokens} image tokens per image, {IMAGE_TOKEN} = {image_token_id}, end of text = {eos}")
    return out


def converted_folder(src: str | Path, cache_dir: str | Path | None = None) -> Path:
    """`pretrained=` a Mipha folder: its conversion, made once into a cache (`LMMS_SIMIGNORE_CACHE`, default
    ~/.cache/lmms_simignore) keyed by the folder and its config and index files; concurrent processes each convert into
    their own temporary folder and the first to finish publishes it."""
    import hashlib
    import os
    import shutil
    import tempfile

    src = Path(src).resolve()
    digest = hashlib.sha256(str(src).encode())
    for name in ("config.json", "model.safetensors.index.json"):
        if (src / name).is_file():
            digest.update((src / name).read_bytes())
    root = Path(cache_dir or os.environ.get("LMMS_SIMIGNORE_CACHE") or Path.home() / ".cache" / "lmms_simignore")
    target = root / f"mipha-{src.name}-{digest.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        convert_mipha(src, scratch / "out")
        try:
            (scratch / "out").rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def mipha_processor(tokenizer, patch_size: int, siglip: dict, pad_to_square: bool = True):
    """A `LlavaProcessor` that prepares images as Mipha's evaluation does: padded to a square with the mean colour
    (`do_pad`), then SigLIP's preprocessing (`siglip`: its preprocessor_config.json: resize to size, rescale, normalise);
    every patch one token; Mipha's prompt."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from lmms_simignore.tasks.scienceqa_utils import LLAVA_CHAT_TEMPLATE

    size = siglip["size"]
    image_processor = LlavaImageProcessorPil(
        do_pad=pad_to_square, do_resize=siglip.get("do_resize", True), size={"height": size["height"], "width": size["width"]},
        resample=siglip.get("resample", 3), do_center_crop=False, do_rescale=siglip.get("do_rescale", True),
        rescale_factor=siglip.get("rescale_factor", 1 / 255), do_normalize=siglip.get("do_normalize", True),
        image_mean=siglip.get("image_mean", [0.5, 0.5, 0.5]), image_std=siglip.get("image_std", [0.5, 0.5, 0.5]), do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0, chat_template=LLAVA_CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN)


def attach_head_bias(model, pretrained: str | Path) -> None:
    """Give the language-model head the bias a converted checkpoint declares (`config.lm_head_bias`); refuse a
    declared bias that is missing or of the wrong shape. Checkpoints that declare none are left as they are."""
    from safetensors import safe_open

    declared = getattr(model.config, "lm_head_bias", None)
    if not declared:
        return
    path = Path(pretrained) / str(declared)
    if not path.is_file():
        raise ValueError(f"{pretrained}: config.json declares a language-model head bias in {declared}, which is missing")
    with safe_open(str(path), framework="pt") as handle:
        if HEAD_BIAS_KEY not in handle.keys():
            raise ValueError(f"{path}: no {HEAD_BIAS_KEY} tensor")
        bias = handle.get_tensor(HEAD_BIAS_KEY)
    head = model.lm_head
    if bias.shape != (head.out_features,):
        raise ValueError(f"{path}: {HEAD_BIAS_KEY} has shape {tuple(bias.shape)}, the head has {head.out_features} outputs")
    head.bias = torch.nn.Parameter(bias.to(device=head.weight.device, dtype=head.weight.dtype), requires_grad=False)


def load_llava(pretrained: str | Path, **load_kwargs):
    """(model, processor) of a llava checkpoint for the analysis commands and the bench: `shipped:` names resolved,
    safetensors only, eval mode, a converted Mipha's head bias attached, left padding; `load_kwargs` go to
    `from_pretrained` (dtype, attn_implementation, device_map)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_simignore.shipped import resolve_pretrained

    path = resolve_pretrained(str(pretrained))
    model = LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True, **load_kwargs).eval()
    attach_head_bias(model, path)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
