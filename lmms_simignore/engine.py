"""The one place where a token selection is applied to a LLaVA model, and where generation runs.

A prompt travels like this:
  input_ids (B, L) + pixel_values  ->  `build_prompt_embeddings`: image features (after the projector)
  scattered into the token embeddings at the image-token positions found from `input_ids`
  ->  `reduce_prompt`: a selection method picks the image tokens to keep, per image; the others are
  either masked (`apply="mask"`, attention mask 0, sequence unchanged) or dropped (`apply="drop"`,
  removed from the sequence) -- in both cases every kept token keeps its *original* position id
  ->  `generate`: prefill + KV-cache decoding. The reduced prompt is what sits in the cache, so the
  ignored tokens stay invisible for the whole generation, not just the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmms_simignore.reduction import select_top_k, similarity_scores
from lmms_simignore.settings import ReductionSettings


@dataclass
class PromptEmbeddings:
    """A batch of prompts in the LLM input space, before reduction.

    inputs_embeds:  (B, L, D) token embeddings with image features in place of the image tokens
    attention_mask: (B, L) 1 on real tokens, 0 on (left) padding
    position_ids:   (B, L) RoPE positions (cumulative count of real tokens, as transformers' generate)
    image_positions:(I, N) column of each image token, images in row-major order of the batch
    image_rows:     (I,) batch row of each image
    image_features: (I, N, D) projector outputs of each image
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
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_tokens: torch.Tensor
    visible_image_tokens: torch.Tensor


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
def build_prompt_embeddings(model, input_ids, attention_mask, pixel_values=None) -> PromptEmbeddings:
    """Embed a processed batch; image features replace the image tokens found from `input_ids`.

    input_ids, attention_mask: (B, L); pixel_values: (I, 3, H, W) or None.
    """
    config = model.config
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == config.image_token_id  # (B, L)
    if pixel_values is not None and pixel_values.shape[0]:
        features = model.model.get_image_features(pixel_values=pixel_values.to(inputs_embeds.dtype), return_dict=True)
        image_features = torch.stack(list(features.pooler_output)).to(inputs_embeds.dtype)  # (I, N, D)
    else:
        image_features = inputs_embeds.new_zeros(0, image_tokens_per_image(config), inputs_embeds.shape[-1])
    num_images, tokens_per_image = image_features.shape[:2]
    per_row = is_image.sum(dim=1)  # (B,)
    if int(per_row.sum()) != num_images * tokens_per_image or (per_row % tokens_per_image).any():
        raise ValueError(
            f"input_ids hold {per_row.tolist()} image tokens per row but pixel_values give {num_images} image(s) "
            f"of {tokens_per_image} tokens; each image needs one block of {tokens_per_image} image tokens"
        )
    coordinates = is_image.nonzero()  # (I*N, 2), row-major
    image_positions = coordinates[:, 1].reshape(num_images, tokens_per_image)  # (I, N)
    image_rows = coordinates[::tokens_per_image, 0]  # (I,)
    if num_images:
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[image_rows[:, None], image_positions] = image_features
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
    settings: ReductionSettings, image_features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """Indices (I, K) into each image's N tokens that stay visible; K from the settings' budget.

    image_features: (I, N, D); text_embeds: (I, T, D) and text_mask: (I, T), the text of each image's row.
    """
    tokens_per_image = image_features.shape[1]
    keep = settings.kept_per_image(tokens_per_image)
    if image_features.shape[0] == 0:  # no image in the batch: nothing to choose
        return torch.zeros(0, keep, dtype=torch.long, device=image_features.device)
    if settings.reduction == "none" or keep == tokens_per_image:
        return torch.arange(tokens_per_image, device=image_features.device).expand(image_features.shape[0], -1)
    if settings.reduction == "simignore":
        scores = similarity_scores(image_features, text_embeds, text_mask, settings.similarity)  # (I, N)
        return select_top_k(scores, keep)
    raise ValueError(f"unknown reduction {settings.reduction!r}")


def reduce_prompt(prompt: PromptEmbeddings, kept: torch.Tensor, apply: str) -> ReducedPrompt:
    """Hide the image tokens not in `kept` (I, K): by masking them or by dropping them.

    Both modes keep the original position ids of every remaining token, so they compute the same
    function; "drop" also shrinks the sequence to (B, L') with L' = the longest remaining row.
    """
    batch_size, length = prompt.attention_mask.shape
    visible = prompt.attention_mask.bool().clone()  # (B, L)
    num_images, tokens_per_image = prompt.image_positions.shape
    if num_images:
        hidden = torch.ones(num_images, tokens_per_image, dtype=torch.bool, device=visible.device)  # (I, N)
        hidden[torch.arange(num_images, device=visible.device)[:, None], kept] = False
        rows = prompt.image_rows[:, None].expand(-1, tokens_per_image)  # (I, N)
        visible[rows[hidden], prompt.image_positions[hidden]] = False
    image_tokens = torch.bincount(prompt.image_rows, minlength=batch_size) * tokens_per_image  # (B,)
    visible_image_tokens = torch.bincount(prompt.image_rows, minlength=batch_size) * kept.shape[1]  # (B,)

    if apply == "mask":
        return ReducedPrompt(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=visible.to(prompt.attention_mask.dtype),
            position_ids=prompt.position_ids,
            image_tokens=image_tokens,
            visible_image_tokens=visible_image_tokens,
        )
    if apply != "drop":
        raise ValueError(f"apply must be 'mask' or 'drop', got {apply!r}")

    counts = visible.sum(dim=1)  # (B,)
    new_length = int(counts.max()) if batch_size else 0
    rank = visible.long().cumsum(dim=1) - 1  # (B, L) index among the row's visible tokens
    target = rank + (new_length - counts)[:, None]  # (B, L) column in the left-padded output
    rows, columns = visible.nonzero(as_tuple=True)
    inputs_embeds = prompt.inputs_embeds.new_zeros(batch_size, new_length, prompt.inputs_embeds.shape[-1])
    inputs_embeds[rows, target[rows, columns]] = prompt.inputs_embeds[rows, columns]
    attention_mask = prompt.attention_mask.new_zeros(batch_size, new_length)
    attention_mask[rows, target[rows, columns]] = 1
    position_ids = prompt.position_ids.new_zeros(batch_size, new_length)
    position_ids[rows, target[rows, columns]] = prompt.position_ids[rows, columns]
    return ReducedPrompt(inputs_embeds, attention_mask, position_ids, image_tokens, visible_image_tokens)


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


@torch.inference_mode()
def generate(
    model,
    prompt: ReducedPrompt,
    options: DecodingOptions,
    eos_token_ids: list[int],
    pad_token_id: int,
    use_cache: bool = True,
    stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate after a reduced prompt. Returns (B, T) new token ids, `pad_token_id` after a row ends.

    With `use_cache` the prompt is encoded once and each step feeds one token at position
    (last position + 1); without it the whole sequence is recomputed every step (same result, slower).
    `stopped(generated (B, t)) -> (B,) bool` marks rows that hit a stop string.
    """
    from transformers import DynamicCache

    language_model = model.model.language_model
    embedding = model.get_input_embeddings()
    device = prompt.inputs_embeds.device
    batch_size = prompt.inputs_embeds.shape[0]
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    eos = torch.as_tensor(eos_token_ids, device=device)
    cache = DynamicCache(config=model.config.text_config) if use_cache else None

    step_embeds, attention_mask, position_ids = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    generated = []
    for _ in range(options.max_new_tokens):
        hidden = language_model(
            inputs_embeds=step_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
        ).last_hidden_state  # (B, t, D)
        logits = model.lm_head(hidden[:, -1])  # (B, V)
        tokens = _next_tokens(logits, options, generator).masked_fill(finished, pad_token_id)  # (B,)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos)
        if stopped is not None:
            finished |= stopped(torch.stack(generated, dim=1))
        if finished.all():
            break
        new_embeds = embedding(tokens[:, None])  # (B, 1, D)
        new_positions = position_ids[:, -1:] + 1  # (B, 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        if use_cache:
            step_embeds, position_ids = new_embeds, new_positions
        else:
            step_embeds = torch.cat([step_embeds, new_embeds], dim=1)
            position_ids = torch.cat([position_ids, new_positions], dim=1)
    return torch.stack(generated, dim=1)
