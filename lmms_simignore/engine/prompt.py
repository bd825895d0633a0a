"""A processed batch as the LLM sees it: image features placed at the image tokens found from the ids, and the
prompt after a choice of image tokens (masked, or dropped with the original or contiguous positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def image_tokens_per_image(config) -> int:
    """Image tokens one image becomes in a llava-hf config, as transformers' Llava computes them (576 for LLaVA-1.5:
    24x24 CLIP patches; 729 for a SigLIP so400m tower under the "full" strategy).

    CLIP towers prepend a CLS token, SigLIP towers have none; the "default" feature strategy drops the first token
    either way (the CLS token, or a real SigLIP patch).
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type == "clip_vision_model"
    return patches + int(has_cls) - int(config.vision_feature_select_strategy == "default")


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


def left_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    """Hide the image tokens not in `kept` (I, K indices, or (I, N) bool flags: with "mask", any number per image):
    by masking them or by dropping them.

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
    kept_slots = None  # (I, K) which entries of `kept` are real, when images keep different numbers
    if kept.dtype == torch.bool:  # (I, N) flags: any number per image (at least one each when dropping)
        kept_flags = kept.clone()
        if apply == "drop":  # as indices, padded to the largest count with each image's last kept token
            counts = kept_flags.sum(dim=1)
            if num_images and int(counts.min()) < 1:
                raise ValueError("dropping needs at least one kept token per image")
            width = int(counts.max()) if num_images else 0
            order = torch.sort((~kept_flags).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept ones first, ascending
            kept_slots = torch.arange(width, device=device)[None, :] < counts[:, None]
            last = order.gather(1, (counts - 1).clamp(min=0)[:, None]).expand_as(order)
            kept = torch.where(kept_slots, order, last)
    else:
        kept_flags = torch.zeros(num_images, tokens_per_image, dtype=torch.bool, device=device)  # (I, N)
        kept_flags[image_index, kept] = True
    if num_images:
        rows = prompt.image_rows[:, None].expand(-1, tokens_per_image)  # (I, N)
        visible[rows[~kept_flags], prompt.image_positions[~kept_flags]] = False
    images_per_row = torch.bincount(prompt.image_rows, minlength=batch_size)  # (B,)
    image_tokens = images_per_row * tokens_per_image  # (B,)
    visible_image_tokens = torch.zeros(batch_size, dtype=torch.long, device=device).index_add_(0, prompt.image_rows, kept_flags.sum(dim=1))  # (B,)

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
    source, mask, target = left_pack(visible)  # (B, L'), (B, L'), (B, L)
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
        image_visible=torch.ones_like(image_columns, dtype=torch.bool) if kept_slots is None else kept_slots,
    )
