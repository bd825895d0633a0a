"""The one place where a token selection is applied to a LLaVA model, and where generation runs.

A prompt travels like this:
  input_ids (B, L) + pixel_values  ->  `build_prompt_embeddings`: image features (after the projector)
  scattered into the token embeddings at the image-token positions found from `input_ids`
  ->  `reduce_prompt`: a selection method picks the image tokens to keep, per image; the others are
  either masked (`apply="mask"`, attention mask 0, sequence unchanged) or dropped (`apply="drop"`,
  removed from the sequence) -- in both cases every kept token keeps its *original* position id.
  A vision-side stage (`apply_vision_stage`, VisionZip) instead shortens each image inside the tower,
  before the projector; the shorter image sits where the image was, at contiguous positions.
  ->  `LanguageModelRun` (used by `generate` and `continuation_logprobs`): our loop over the decoder
  layers. A pruning stage at layer K (FastV's, several PyramidDrop-style, or DART's) chooses among the
  image tokens still present from layer K-1 and drops the rest for layers >= K. The reduced prompt is
  what sits in the KV cache, so ignored and pruned tokens stay invisible for the whole generation, not
  just the prefill. The image tokens each layer saw are counted there too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from lmms_simignore.reduction import fastv_scores, pairwise_similarity, random_scores, select_by_order, select_top_k, walk_scores
from lmms_simignore.reduction.dart import DEFAULT_PIVOTS, dart_choice
from lmms_simignore.reduction.visionzip import visionzip_tokens
from lmms_simignore.settings import ReductionSettings


@dataclass
class PromptEmbeddings:
    """A batch of prompts in the LLM input space, before reduction.

    inputs_embeds:  (B, L, D) token embeddings with image features in place of the image tokens
    attention_mask: (B, L) 1 on real tokens, 0 on (left) padding
    position_ids:   (B, L) RoPE positions (cumulative count of real tokens, as transformers' generate)
    image_positions:(I, N) column of each image token, images in row-major order of the batch
    image_rows:     (I,) batch row of each image
    image_features: (I, K, D) projector outputs of each image (K = N, or fewer after a vision-side stage)
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_positions: torch.Tensor
    image_rows: torch.Tensor
    image_features: torch.Tensor

    @property
    def tokens_per_image(self) -> int:
        return self.image_positions.shape[1]


@dataclass
class ReducedPrompt:
    """What the LLM actually sees at prefill.

    inputs_embeds: (B, L', D); attention_mask: (B, L'); position_ids: (B, L') original positions.
    image_tokens / visible_image_tokens: (B,) image tokens in the prompt / still visible after reduction.
    image_rows: (I,) batch row of each image; image_columns: (I, M) column of each image's tokens that are
    still in the sequence (M = N when masking, K when dropping); image_visible: (I, M) which of them are
    visible (an in-LLM stage chooses among these).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_tokens: torch.Tensor
    visible_image_tokens: torch.Tensor
    image_rows: torch.Tensor
    image_columns: torch.Tensor
    image_visible: torch.Tensor


@dataclass
class ImageTokensSeen:
    """Image tokens of each prompt row that each decoder layer worked on in the prompt pass, read off the
    sequence and attention mask the layer was given (not the requested budget).

    computed: (B, n_layers) image tokens in the layer's sequence (masked ones included: they cost compute)
    visible:  (B, n_layers) of those, the ones the attention mask lets the prompt attend to
    """

    computed: torch.Tensor
    visible: torch.Tensor


def image_tokens_per_image(config) -> int:
    """Image tokens one image becomes in a llava-hf config (576 for LLaVA-1.5: 24x24 CLIP patches).

    CLIP towers prepend a CLS token, which the "default" feature strategy drops; SigLIP-style towers have none.
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type == "clip_vision_model"
    return patches + int(has_cls and config.vision_feature_select_strategy == "full")


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only real tokens; 0 on left padding (transformers' generate convention)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@torch.inference_mode()
def build_prompt_embeddings(model, input_ids, attention_mask, pixel_values=None, image_features=None) -> PromptEmbeddings:
    """Embed a processed batch; image features replace the image tokens found from `input_ids`.

    input_ids, attention_mask: (B, L); pixel_values: (I, 3, H, W) or None.
    image_features: (I, K, D), K <= N, to place instead of the projector outputs (a vision-side stage's image):
    they fill the first K of each image's N image tokens; the other N - K hold zeros until `reduce_prompt`
    drops them.
    """
    config = model.config
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == config.image_token_id  # (B, L)
    placed = image_features is not None
    if placed:
        image_features = image_features.to(inputs_embeds.dtype)
    elif pixel_values is not None and pixel_values.shape[0]:
        features = model.model.get_image_features(pixel_values=pixel_values.to(inputs_embeds.dtype), return_dict=True)
        image_features = torch.stack(list(features.pooler_output)).to(inputs_embeds.dtype)  # (I, N, D)
    else:
        image_features = inputs_embeds.new_zeros(0, image_tokens_per_image(config), inputs_embeds.shape[-1])
    num_images, features_per_image = image_features.shape[:2]
    per_row = is_image.sum(dim=1)  # (B,)
    tokens_per_image = int(per_row.sum()) // num_images if placed and num_images else features_per_image
    if int(per_row.sum()) != num_images * tokens_per_image or (per_row % tokens_per_image).any() \
            or features_per_image > tokens_per_image:
        raise ValueError(
            f"input_ids hold {per_row.tolist()} image tokens per row but pixel_values give {num_images} image(s) "
            f"of {features_per_image} tokens; each image needs one block of {tokens_per_image} image tokens"
        )
    coordinates = is_image.nonzero()  # (I*N, 2), row-major
    image_positions = coordinates[:, 1].reshape(num_images, tokens_per_image)  # (I, N)
    image_rows = coordinates[::tokens_per_image, 0]  # (I,)
    if num_images:
        inputs_embeds = inputs_embeds.clone()
        if features_per_image < tokens_per_image:
            inputs_embeds[image_rows[:, None], image_positions] = 0.0
        inputs_embeds[image_rows[:, None], image_positions[:, :features_per_image]] = image_features
    return PromptEmbeddings(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=default_position_ids(attention_mask),
        image_positions=image_positions,
        image_rows=image_rows,
        image_features=image_features,
    )


@torch.inference_mode()
def embed_texts(model, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM input embeddings of one token list per row: (B, T, D) right-padded, and the (B, T) bool mask."""
    embedding = model.get_input_embeddings()
    width = max(1, max((len(ids) for ids in token_ids), default=1))
    padded = torch.zeros(len(token_ids), width, dtype=torch.long, device=embedding.weight.device)
    mask = torch.zeros(len(token_ids), width, dtype=torch.bool, device=embedding.weight.device)
    for row, ids in enumerate(token_ids):
        padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = True
    return embedding(padded), mask


def choose_kept_image_tokens(
    settings: ReductionSettings,
    image_features: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    image_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Indices (I, K) into each image's N tokens that the pre-LLM stage keeps; K from the settings' budget.

    image_features: (I, N, D); text_embeds: (I, T, D) and text_mask: (I, T), the text of each image's row
    (simignore only); image_seeds: one seed per image (random choices only).
    """
    num_images, tokens_per_image = image_features.shape[:2]
    keep = settings.kept_per_image(tokens_per_image)
    device = image_features.device
    if num_images == 0:  # no image in the batch: nothing to choose
        return torch.zeros(0, keep, dtype=torch.long, device=device)
    if settings.pre_llm is None or keep == tokens_per_image:
        return torch.arange(tokens_per_image, device=device).expand(num_images, -1)
    random_choice = settings.pre_llm == "random" or settings.order == "random"
    if random_choice:
        if image_seeds is None or len(image_seeds) != num_images:
            raise ValueError(f"random choices need one seed per image ({num_images}), got {image_seeds!r}")
        scores = random_scores(image_seeds, tokens_per_image, device)  # (I, N)
    else:
        if text_embeds is None or text_mask is None:
            raise ValueError("simignore needs the text embeddings of each image's row")
        pairwise = pairwise_similarity(image_features, text_embeds, text_mask, settings.similarity)  # (I, N, T)
        if settings.uses_walk:
            scores = walk_scores(pairwise, settings.simignore_start, settings.simignore_step)
        else:
            scores = pairwise.amax(dim=-1)  # (I, N)
    return select_by_order(scores, keep, "random" if random_choice else settings.order)


def apply_pre_llm_stage(
    model, tokenizer, settings: ReductionSettings, prompt: PromptEmbeddings, comparison_texts: list[str], image_seeds: list[int]
) -> "ReducedPrompt":
    """Choose the kept image tokens of the pre-LLM stage and apply them (mask or drop).

    comparison_texts: one per row (Simignore's text); image_seeds: one per image (random choices).
    """
    text_embeds = text_mask = None
    if settings.pre_llm == "simignore" and prompt.image_rows.numel():
        bos = [tokenizer.bos_token_id] if settings.text_bos and tokenizer.bos_token_id is not None else []
        token_ids = [bos + tokenizer(text, add_special_tokens=False).input_ids for text in comparison_texts]
        text_embeds, text_mask = embed_texts(model, token_ids)
        text_embeds, text_mask = text_embeds[prompt.image_rows], text_mask[prompt.image_rows]
    kept = choose_kept_image_tokens(settings, prompt.image_features, text_embeds, text_mask, image_seeds)
    return reduce_prompt(prompt, kept, settings.apply)


def check_vision_stage_support(model) -> None:
    """A vision-side stage reads the CLS token's attention in the tower's feature layer: it needs a CLIP tower
    (CLS first) and one feature layer."""
    config = model.config
    tower = config.vision_config.model_type
    if tower != "clip_vision_model":
        raise ValueError(f"visionzip ranks patches by the CLS token's attention; the vision tower {tower!r} has no CLS "
                         f"token (supported: clip_vision_model)")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"visionzip needs one vision feature layer; this checkpoint concatenates layers "
                         f"{config.vision_feature_layer}")
    if config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1) == 0:
        raise ValueError("visionzip needs the attention of the feature layer; vision_feature_layer selects the patch "
                         "embeddings, which have none")


def vision_layer_attention(layer, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS row of a CLIP encoder layer's self-attention and its keys, recomputed from the layer's own norm and
    projections (independent of the attention backend).

    hidden_in: (I, T, D) the layer's input, CLS first.
    Returns: (I, H, T) float32 softmax attention of the CLS query, and (I, H, T, d) keys.
    """
    attention = layer.self_attn
    images, tokens, _ = hidden_in.shape
    head_dim = attention.head_dim
    normed = layer.layer_norm1(hidden_in)  # (I, T, D)
    query = attention.q_proj(normed[:, :1]).view(images, 1, -1, head_dim).transpose(1, 2)  # (I, H, 1, d)
    keys = attention.k_proj(normed).view(images, tokens, -1, head_dim).transpose(1, 2)  # (I, H, T, d)
    scores = (query @ keys.transpose(-1, -2)).squeeze(2).float() * attention.scale  # (I, H, T)
    return scores.softmax(dim=-1), keys


@torch.inference_mode()
def vision_tower_states(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vision tower's hidden states of each image: the embeddings, then each encoder layer's output, each (I, T, D)."""
    dtype = model.get_input_embeddings().weight.dtype
    return model.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states


@torch.inference_mode()
def visionzip_image_features(model, tower_states: tuple[torch.Tensor, ...], dominant: int, contextual: int) -> torch.Tensor:
    """The images after VisionZip's vision-side stage, projected into the LLM input space: (I, dominant + contextual, D).

    tower_states: from `vision_tower_states`. The feature layer's CLS attention and keys are recomputed from
    that layer's parts on the layer's input.
    """
    check_vision_stage_support(model)
    feature_index = model.config.vision_feature_layer % len(tower_states)
    layer = model.model.vision_tower.encoder.layers[feature_index - 1]
    cls_attention, keys = vision_layer_attention(layer, tower_states[feature_index - 1])  # (I, H, T), (I, H, T, d)
    tokens = visionzip_tokens(tower_states[feature_index], cls_attention.sum(dim=1), keys.mean(dim=1), dominant, contextual)
    return model.model.multi_modal_projector(tokens)  # (I, K, D)


def apply_vision_stage(model, settings: ReductionSettings, inputs, tower_states: tuple[torch.Tensor, ...] | None = None) -> "ReducedPrompt":
    """Processor outputs of a batch -> the prompt after a vision-side stage: each image becomes the K tokens the
    stage returns, placed where its image tokens were, at contiguous positions (the image is shorter).

    tower_states: the tower's hidden states when already computed (`vision_tower_states`).
    """
    pixel_values = inputs.get("pixel_values")
    features = None
    if pixel_values is not None and pixel_values.shape[0]:
        if tower_states is None:
            tower_states = vision_tower_states(model, pixel_values)
        dominant, contextual = settings.visionzip_budget(image_tokens_per_image(model.config))
        features = visionzip_image_features(model, tower_states, dominant, contextual)  # (I, K, D)
    prompt = build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], pixel_values, image_features=features)
    kept = torch.arange(prompt.image_features.shape[1], device=prompt.image_positions.device)
    return reduce_prompt(prompt, kept.expand(prompt.image_positions.shape[0], -1), "drop", positions="contiguous")


def prepare_reduced_prompt(
    model, tokenizer, settings: ReductionSettings, inputs, comparison_texts: list[str], image_seeds: list[int]
) -> "ReducedPrompt":
    """Processor outputs of a batch -> the prompt after the vision-side or pre-LLM stage (what the model classes run)."""
    if settings.vision is not None:
        return apply_vision_stage(model, settings, inputs)
    prompt = build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))
    return apply_pre_llm_stage(model, tokenizer, settings, prompt, comparison_texts, image_seeds)


def _pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pack the True columns of each row: (B, L) bool -> source columns (B, L'), mask (B, L') and
    target (B, L), the output column of every input column (meaningful where `keep`).

    L' is the longest row's count; shorter rows get left padding (source column 0, mask 0).
    """
    counts = keep.sum(dim=1)  # (B,)
    new_length = int(counts.max()) if keep.shape[0] else 0
    target = keep.long().cumsum(dim=1) - 1 + (new_length - counts)[:, None]  # (B, L) column in the output
    rows, columns = keep.nonzero(as_tuple=True)
    source = torch.zeros(keep.shape[0], new_length, dtype=torch.long, device=keep.device)
    source[rows, target[rows, columns]] = columns
    mask = torch.zeros(keep.shape[0], new_length, dtype=torch.long, device=keep.device)
    mask[rows, target[rows, columns]] = 1
    return source, mask, target


def reduce_prompt(prompt: PromptEmbeddings, kept: torch.Tensor, apply: str, positions: str = "original") -> ReducedPrompt:
    """Hide the image tokens not in `kept` (I, K): by masking them or by dropping them.

    With `positions="original"` every remaining token keeps its original position id, so both modes compute
    the same function; "drop" also shrinks the sequence to (B, L') with L' = the longest remaining row.
    `positions="contiguous"` (drop only) renumbers the remaining tokens 0, 1, 2, ... as if the dropped ones
    had never been in the prompt (a vision-side stage's shorter image).
    """
    if apply not in ("mask", "drop"):
        raise ValueError(f"apply must be 'mask' or 'drop', got {apply!r}")
    if positions not in ("original", "contiguous") or (positions == "contiguous" and apply != "drop"):
        raise ValueError(f"positions must be 'original', or 'contiguous' with apply='drop'; got {positions!r} with {apply!r}")
    batch_size = prompt.attention_mask.shape[0]
    device = prompt.attention_mask.device
    visible = prompt.attention_mask.bool().clone()  # (B, L)
    num_images, tokens_per_image = prompt.image_positions.shape
    image_index = torch.arange(num_images, device=device)[:, None]  # (I, 1)
    kept_flags = torch.zeros(num_images, tokens_per_image, dtype=torch.bool, device=device)  # (I, N)
    kept_flags[image_index, kept] = True
    if num_images:
        rows = prompt.image_rows[:, None].expand(-1, tokens_per_image)  # (I, N)
        visible[rows[~kept_flags], prompt.image_positions[~kept_flags]] = False
    images_per_row = torch.bincount(prompt.image_rows, minlength=batch_size)  # (B,)
    image_tokens = images_per_row * tokens_per_image  # (B,)
    visible_image_tokens = images_per_row * kept.shape[1]  # (B,)

    if apply == "mask":
        return ReducedPrompt(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=visible.to(prompt.attention_mask.dtype),
            position_ids=prompt.position_ids,
            image_tokens=image_tokens,
            visible_image_tokens=visible_image_tokens,
            image_rows=prompt.image_rows,
            image_columns=prompt.image_positions,
            image_visible=kept_flags,
        )
    source, mask, target = _pack(visible)  # (B, L'), (B, L'), (B, L)
    rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
    image_columns = target[prompt.image_rows[:, None], prompt.image_positions.gather(1, kept)]  # (I, K)
    return ReducedPrompt(
        inputs_embeds=prompt.inputs_embeds[rows, source] * mask[..., None].to(prompt.inputs_embeds.dtype),
        attention_mask=mask.to(prompt.attention_mask.dtype),
        position_ids=prompt.position_ids[rows, source] * mask if positions == "original" else default_position_ids(mask),
        image_tokens=image_tokens,
        visible_image_tokens=visible_image_tokens,
        image_rows=prompt.image_rows,
        image_columns=image_columns,
        image_visible=torch.ones_like(image_columns, dtype=torch.bool),
    )


@dataclass(frozen=True)
class DecodingOptions:
    """How to pick tokens. Greedy unless do_sample; `seed` makes sampling reproducible."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _next_tokens(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)  # (B, V)
    if options.top_p is not None and options.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > options.top_p  # keep the smallest nucleus
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def last_token_attention(layer, hidden_states: torch.Tensor, position_embeddings, key_visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each row's last position over all columns, per head, in `layer`'s self-attention.

    Recomputed from the layer's own norm, query/key projections and rotary embedding, so the result does
    not depend on the attention backend (eager, sdpa, flash) the model runs with.
    hidden_states: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B, L, d);
    key_visible: (B, L) bool, the columns the last position may attend to.
    Returns: (B, H, L) float32.
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    apply_rotary = importlib.import_module(type(attention).__module__).apply_rotary_pos_emb
    normed = layer.input_layernorm(hidden_states)  # (B, L, D)
    query = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, d)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, d)
    cos, sin = position_embeddings
    query = apply_rotary(query, query, cos[:, -1:], sin[:, -1:])[0]
    key = apply_rotary(key, key, cos, sin)[0]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, L, d), grouped-query heads
    scores = (query @ key.transpose(-1, -2)).squeeze(2).float() * attention.scaling  # (B, H, L)
    scores = scores.masked_fill(~key_visible[:, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def layer_key_norms(layer, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """L1 norm of each position's key in `layer`'s self-attention (after the rotary embedding, all key heads
    together), recomputed from the layer's norm and key projection.

    hidden_states: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B, L, d). Returns (B, L) float32.
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    apply_rotary = importlib.import_module(type(attention).__module__).apply_rotary_pos_emb
    key = attention.k_proj(layer.input_layernorm(hidden_states)).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    key = apply_rotary(key, key, cos, sin)[0]  # (B, Hkv, L, d)
    return key.float().abs().sum(dim=(1, 3))


def check_in_llm_support(model) -> None:
    """FastV recomputes one attention row from the decoder layer's parts: they must be the Llama-style ones."""
    layer = model.model.language_model.layers[0]
    attention = getattr(layer, "self_attn", None)
    needed = {"input_layernorm": layer, "self_attn.q_proj": attention, "self_attn.k_proj": attention}
    missing = [name for name, owner in needed.items() if owner is None or not hasattr(owner, name.split(".")[-1])]
    if attention is not None and not hasattr(importlib.import_module(type(attention).__module__), "apply_rotary_pos_emb"):
        missing.append("apply_rotary_pos_emb")
    if missing:
        raise ValueError(
            f"fastv needs Llama-style decoder layers (input_layernorm, q_proj, k_proj, rotary embedding); "
            f"{type(layer).__name__} lacks {', '.join(missing)}"
        )


@dataclass
class _Segment:
    """Decoder layers [start, end) and the prompt columns they see.

    columns: (B, S) the prompt columns in this segment's sequence (original coordinates, ascending);
    gather: (B, S) where each of them sits in the previous segment's sequence (None for the first segment);
    mask: (B, S + t) its 2-D attention mask (t = tokens fed so far); image_columns: (I, M) where each image's
    tokens sit in this segment's sequence; image_visible: (I, M) which of them are visible;
    keep: image tokens per image that the stage starting this segment keeps (None for the first segment).
    """

    start: int
    end: int
    keep: int | None = None
    columns: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    image_columns: torch.Tensor | None = None
    image_visible: torch.Tensor | None = None


PRUNE_RULES = ("attention", "dart")


class LanguageModelRun:
    """Runs the decoder layers of a llava model's language model: the one place a reduction acts inside the LLM.

    In-LLM pruning stages split the layers into segments. A stage at layer K (`prune_stages=((K, keep), ...)`,
    or FastV's `fastv_layer=K, fastv_keep=keep`) chooses, among the image tokens still visible, the `keep` per
    image that layers >= K (up to the next stage) see, at their original position ids. `prune_rule` says how:
    "attention" (FastV, PyramidDrop): the most attended by the last prompt token in layer K-1 (mean over heads);
    "dart": DART's least duplicated tokens, from layer K-1's key norms and output (`dart_pivots` pivots). The kept sets are chosen once, from the prompt, and then fixed: every
    generated token passes through each segment with that segment's prompt columns, with a KV cache (one entry
    per token and layer, each layer its own length) or by recomputing the whole sequence.
    """

    def __init__(self, model, prompt: ReducedPrompt, fastv_layer: int | None = None, fastv_keep: int = 0,
                 use_cache: bool = True, prune_stages: tuple[tuple[int, int], ...] = (), prune_rule: str = "attention",
                 dart_pivots: int = DEFAULT_PIVOTS):
        from transformers import DynamicCache

        if prune_rule not in PRUNE_RULES:
            raise ValueError(f"prune_rule must be one of {', '.join(PRUNE_RULES)}; got {prune_rule!r}")
        self.prune_rule, self.dart_pivots = prune_rule, dart_pivots

        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embedding = model.get_input_embeddings()
        self.prompt = prompt
        num_layers = len(self.language_model.layers)
        if fastv_layer is not None:
            if prune_stages:
                raise ValueError("give either fastv_layer/fastv_keep or prune_stages, not both")
            if not 1 <= fastv_layer < num_layers:
                raise ValueError(f"fastv_layer={fastv_layer} must be in [1, {num_layers - 1}] for {num_layers} decoder layers")
            available = int(prompt.image_visible.sum(dim=1).min()) if prompt.image_visible.numel() else fastv_keep
            if fastv_keep > available:
                raise ValueError(f"fastv_keep={fastv_keep} exceeds the {available} image tokens per image still visible")
            prune_stages = ((fastv_layer, fastv_keep),)
        self._check_stages(prune_stages, num_layers)
        if prune_stages:
            check_in_llm_support(model)
        bounds = [0, *(layer for layer, _ in prune_stages), num_layers]
        keeps = [None, *(keep for _, keep in prune_stages)]
        self.segments = [_Segment(start, end, keep) for start, end, keep in zip(bounds, bounds[1:], keeps)]
        first = self.segments[0]
        first.mask, first.image_columns, first.image_visible = prompt.attention_mask, prompt.image_columns, prompt.image_visible
        self.cache = DynamicCache(config=self.language_model.config) if use_cache else None
        self.embeds = prompt.inputs_embeds  # (B, L, D), prompt + tokens fed so far (kept only without a cache)
        self.positions = prompt.position_ids  # (B, L + t)
        self.prompt_length = prompt.inputs_embeds.shape[1]
        self.image_tokens_seen: ImageTokensSeen | None = None  # filled by the prompt pass

    def _check_stages(self, stages: tuple[tuple[int, int], ...], num_layers: int) -> None:
        prompt = self.prompt
        previous_layer, previous_keep = 0, int(prompt.image_visible.sum(dim=1).min()) if prompt.image_visible.numel() else None
        for layer, keep in stages:
            if not previous_layer < layer < num_layers:
                raise ValueError(f"a pruning stage at layer {layer} must come after layer {previous_layer} and before the "
                                 f"last of {num_layers} decoder layers (stages: {list(stages)})")
            if keep < 0 or (previous_keep is not None and keep > previous_keep):
                raise ValueError(f"the pruning stage at layer {layer} keeps {keep} image tokens per image, but only "
                                 f"{previous_keep} are visible before it (stages: {list(stages)})")
            previous_layer, previous_keep = layer, keep

    @property
    def kept_columns(self) -> torch.Tensor | None:
        """(B, S) prompt columns (original coordinates) that the last segment's layers see; None without pruning."""
        return self.segments[-1].columns

    @property
    def mask_high(self) -> torch.Tensor | None:
        """(B, S + t) the last segment's attention mask; None without pruning."""
        return self.segments[-1].mask if len(self.segments) > 1 else None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Encode the prompt; (B, V) logits of the next token."""
        hidden = self._forward(self.embeds, self.positions, prompt_pass=True)
        return self.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B, t) after everything so far; (B, t, V) logits after each of them."""
        count = tokens.shape[1]
        new_embeds = self.embedding(tokens)  # (B, t, D)
        offsets = torch.arange(1, count + 1, device=tokens.device)
        new_positions = self.positions[:, -1:] + offsets  # (B, t)
        ones = self.segments[0].mask.new_ones(tokens.shape[0], count)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        for segment in self.segments:
            segment.mask = torch.cat([segment.mask, ones], dim=1)
        if self.cache is not None:
            hidden = self._forward(new_embeds, new_positions, prompt_pass=False)
        else:
            self.embeds = torch.cat([self.embeds, new_embeds], dim=1)
            hidden = self._forward(self.embeds, self.positions, prompt_pass=False)[:, -count:]
        return self.lm_head(hidden)

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, prompt_pass: bool) -> torch.Tensor:
        """Run all decoder layers on `hidden` (B, q, D) at `positions` (B, q); returns the final-norm states."""
        from transformers.masking_utils import create_causal_mask

        model = self.language_model
        layers = model.layers
        cache_kwargs = {"cache": self.cache, "use_cache": self.cache is not None}
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        seen = []
        previous_length = self.prompt_length  # prompt columns in the previous segment's sequence
        for number, segment in enumerate(self.segments):
            if number and (prompt_pass or self.cache is None):  # the whole sequence is here: keep the segment's columns
                generated = torch.arange(previous_length, hidden.shape[1], device=hidden.device)
                index = torch.cat([segment.gather, generated.expand(hidden.shape[0], -1)], dim=1)  # (B, S + t)
                hidden, positions = hidden[rows, index], positions[rows, index]
            if number:
                previous_length = segment.gather.shape[1]
            position_embeddings = model.rotary_emb(hidden, position_ids=positions)
            mask = create_causal_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=segment.mask,
                cache=self.cache, position_ids=positions, layer_idx=segment.start,
            )
            if prompt_pass:
                seen += [_image_columns_in(self._image_columns_map(segment, hidden.shape[1]), segment.mask)] * (segment.end - segment.start)
            for index in range(segment.start, segment.end):
                layer_input = hidden
                hidden = layers[index](
                    hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings, **cache_kwargs
                )
                if prompt_pass and index == segment.end - 1 and number + 1 < len(self.segments):
                    self._choose_next_segment(number + 1, layers[index], layer_input, hidden, position_embeddings)
        if prompt_pass:
            self.image_tokens_seen = ImageTokensSeen(*(torch.stack([counts[part] for counts in seen], dim=1) for part in range(2)))
        return model.norm(hidden)

    def _image_columns_map(self, segment: _Segment, length: int) -> torch.Tensor:
        """(B, S) bool: which columns of the segment's prompt sequence hold an image token (masked or not)."""
        is_image = torch.zeros(segment.mask.shape[0], length, dtype=torch.bool, device=segment.mask.device)
        is_image[self.prompt.image_rows[:, None].expand_as(segment.image_columns), segment.image_columns] = True
        return is_image

    def _choose_next_segment(self, number: int, layer, layer_input: torch.Tensor, layer_output: torch.Tensor,
                             position_embeddings) -> None:
        """A pruning stage after `layer` (the last layer before the stage; its input and output (B, S, D)): keep
        `keep` image tokens per image among those still visible, by the run's rule; fill the next segment's
        columns and mask."""
        previous, segment = self.segments[number - 1], self.segments[number]
        image_rows = self.prompt.image_rows
        visible = previous.mask.bool()  # (B, S), the prompt pass: no generated token yet
        if self.prune_rule == "dart":
            index = self._dart_choice(previous, layer, layer_input, layer_output, position_embeddings, segment.keep)
        else:
            attention = last_token_attention(layer, layer_input, position_embeddings, visible)  # (B, H, S)
            scores = fastv_scores(attention, previous.image_columns, image_rows, previous.image_visible)  # (I, M)
            index = select_top_k(scores, segment.keep)
        chosen = previous.image_columns.gather(1, index)  # (I, K) columns, ascending
        keep = visible.clone()
        keep[image_rows[:, None].expand_as(previous.image_columns), previous.image_columns] = False
        keep[image_rows[:, None].expand_as(chosen), chosen] = True
        segment.gather, mask, target = _pack(keep)
        segment.mask = mask.to(previous.mask.dtype)
        base = previous.columns if previous.columns is not None else torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        segment.columns = base.gather(1, segment.gather)
        segment.image_columns = target[image_rows[:, None].expand_as(chosen), chosen]  # (I, K) in the new sequence
        segment.image_visible = torch.ones_like(segment.image_columns, dtype=torch.bool)

    def _dart_choice(self, previous: _Segment, layer, layer_input, layer_output, position_embeddings, keep: int) -> torch.Tensor:
        """DART's kept tokens (I, K), indices into `previous.image_columns`: pivots by the L1 norm of `layer`'s keys,
        similarity of `layer`'s output through the final norm; text = the visible non-image columns after each image."""
        image_rows, columns = self.prompt.image_rows, previous.image_columns  # (I,), (I, M)
        key_norms = layer_key_norms(layer, layer_input, position_embeddings)  # (B, S)
        normed = self.language_model.norm(layer_output)  # (B, S, D)
        length = normed.shape[1]
        is_image = self._image_columns_map(previous, length)  # (B, S)
        after = torch.arange(length, device=normed.device)[None, :] > columns.amax(dim=1, keepdim=True)  # (I, S)
        text_mask = after & previous.mask[image_rows, :length].bool() & ~is_image[image_rows]  # (I, S)
        return dart_choice(
            normed[image_rows[:, None], columns], key_norms[image_rows[:, None], columns], previous.image_visible,
            normed[image_rows], key_norms[image_rows], text_mask, keep, self.dart_pivots,
        )


def _image_columns_in(is_image: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) image columns of a layer's sequence and its (B, >= S) 2-D mask -> (B,) image tokens present and
    (B,) of them attendable."""
    visible = is_image & attention_mask[:, : is_image.shape[1]].bool()
    return is_image.sum(dim=1), visible.sum(dim=1)


@dataclass
class Generation:
    """tokens: (B, T) generated ids (`pad_token_id` after a row ended); image_tokens_seen: what each layer saw."""

    tokens: torch.Tensor
    image_tokens_seen: ImageTokensSeen


@torch.inference_mode()
def generate(
    model,
    prompt: ReducedPrompt,
    options: DecodingOptions,
    eos_token_ids: list[int],
    pad_token_id: int,
    use_cache: bool = True,
    stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fastv_layer: int | None = None,
    fastv_keep: int = 0,
    prune_stages: tuple[tuple[int, int], ...] = (),
    prune_rule: str = "attention",
    dart_pivots: int = DEFAULT_PIVOTS,
) -> Generation:
    """Generate after a reduced prompt, optionally with FastV pruning at `fastv_layer` or several pruning stages
    (`prune_stages`, `prune_rule`, `dart_pivots`: see `LanguageModelRun`): the new token ids and the image tokens
    each decoder layer saw.

    With `use_cache` the prompt is encoded once and each step feeds one token at position
    (last position + 1); without it the whole sequence is recomputed every step (same result, slower).
    `stopped(generated (B, t)) -> (B,) bool` marks rows that hit a stop string.
    """
    run = LanguageModelRun(model, prompt, fastv_layer=fastv_layer, fastv_keep=fastv_keep, use_cache=use_cache,
                           prune_stages=prune_stages, prune_rule=prune_rule, dart_pivots=dart_pivots)
    device = prompt.inputs_embeds.device
    batch_size = prompt.inputs_embeds.shape[0]
    generator = torch.Generator(device=device).manual_seed(options.seed) if options.do_sample else None
    eos = torch.as_tensor(eos_token_ids, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    logits = run.prefill()  # (B, V)
    generated = []
    for _ in range(options.max_new_tokens):
        tokens = _next_tokens(logits, options, generator).masked_fill(finished, pad_token_id)  # (B,)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos)
        if stopped is not None:
            finished |= stopped(torch.stack(generated, dim=1))
        if finished.all() or len(generated) == options.max_new_tokens:
            break
        logits = run.feed(tokens[:, None])[:, -1]
    return Generation(torch.stack(generated, dim=1), run.image_tokens_seen)


@torch.inference_mode()
def continuation_logprobs(
    model, prompt: ReducedPrompt, continuation: torch.Tensor, fastv_layer: int | None = None, fastv_keep: int = 0,
    prune_stages: tuple[tuple[int, int], ...] = (), prune_rule: str = "attention", dart_pivots: int = DEFAULT_PIVOTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `continuation` (B, C) token by token after a reduced prompt (teacher forcing).

    Returns (B, C) float32 log-probabilities and (B, C) bool: whether each token was the greedy choice.
    """
    run = LanguageModelRun(model, prompt, fastv_layer=fastv_layer, fastv_keep=fastv_keep, use_cache=True, prune_stages=prune_stages,
                           prune_rule=prune_rule, dart_pivots=dart_pivots)
    first = run.prefill()[:, None]  # (B, 1, V)
    logits = first if continuation.shape[1] == 1 else torch.cat([first, run.feed(continuation[:, :-1])], dim=1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, C, V)
    return logprobs.gather(-1, continuation[..., None]).squeeze(-1), logits.argmax(-1) == continuation
