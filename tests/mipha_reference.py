"""Mipha as its own code assembles it, independently of our conversion: transformers' `PhiForCausalLM` (head with its
bias), `SiglipVisionModel` (features of layer -2, every patch) and a Linear-GELU-Linear projector loaded from the
released files; the image padded to a square with the mean colour (`expand2square`) before SigLIP's processor; the
image features spliced in at `<image>` of `{system} USER: <image>\\n{text} ASSISTANT:` (no BOS, each side tokenized
on its own, as LLaVA's `tokenizer_image_token`); greedy decoding, recomputing the whole sequence, until
`<|endoftext|>`. Optionally Simignore: keep the image tokens most cosine-similar to the option text's embeddings."""

import json
from pathlib import Path

import torch
from PIL import Image

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def load_reference(src, vision_config_file=None):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM, SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(src / shard))
    weights = {key: value.float() for key, value in weights.items()}
    phi_fields = {key: config[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "hidden_act", "max_position_embeddings",
                                               "layer_norm_eps", "rope_theta", "partial_rotary_factor")}
    phi = PhiForCausalLM(PhiConfig(**phi_fields)).eval()
    phi.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}, strict=True)
    vision = json.loads(Path(vision_config_file).read_text()) if vision_config_file else config["vision_config"]["vision_tower"]
    vision = {key: vision[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                           "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")}
    tower = SiglipVisionModel(SiglipVisionConfig(**vision)).eval()
    prefix = "model.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    projector = torch.nn.Sequential(torch.nn.Linear(vision["hidden_size"], config["hidden_size"]), torch.nn.GELU(),
                                    torch.nn.Linear(config["hidden_size"], config["hidden_size"]))
    projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in weights.items() if k.startswith("model.mm_projector.")})
    return {"phi": phi, "tower": tower, "projector": projector, "tokenizer": AutoTokenizer.from_pretrained(src),
            "processor": SiglipImageProcessorPil.from_pretrained(src)}


def expand2square(image, colour):
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def reference_pixels(reference, image):
    processor = reference["processor"]
    padded = expand2square(image.convert("RGB"), tuple(int(x * 255) for x in processor.image_mean))
    return processor(images=padded, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def reference_answer(reference, image, text, max_new_tokens=8, keep=None, options_text=None):
    """(answer, logits of the first answer token (V,)); with `keep`, only the `keep` image tokens whose best cosine
    similarity to the embeddings of `options_text` is highest stay, at their own positions."""
    tokenizer, phi = reference["tokenizer"], reference["phi"]
    embed = phi.get_input_embeddings()
    before = tokenizer(f"{SYSTEM} USER: ", add_special_tokens=False).input_ids
    after = tokenizer(f"\n{text} ASSISTANT:", add_special_tokens=False).input_ids
    features = reference["projector"](reference["tower"](reference_pixels(reference, image), output_hidden_states=True).hidden_states[-2])[0]
    positions = torch.arange(len(before) + features.shape[0] + len(after))
    if keep is not None:
        options = embed(torch.tensor(tokenizer(options_text, add_special_tokens=False).input_ids))
        similarity = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(options, dim=-1).T
        kept = similarity.amax(dim=-1).topk(keep).indices.sort().values
        text_after = positions[len(before) + features.shape[0]:]
        features = features[kept]
        positions = torch.cat([positions[: len(before)], len(before) + kept, text_after])
    sequence = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after))])[None]
    positions = positions[None]
    generated, first = [], None
    for _ in range(max_new_tokens):
        logits = phi(inputs_embeds=sequence, position_ids=positions).logits[0, -1]
        first = logits if first is None else first
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return tokenizer.decode(generated), first
