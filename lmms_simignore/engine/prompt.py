"""A processed batch as the LLM sees it: image features placed at the image tokens found from the ids, and the
prompt after a choice of image tokens (masked, or dropped with their original positions) or with shorter images
(at contiguous positions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from lmms_simignore.engine.views import TowerView


@dataclass
class PromptEmbeddings:
    """A batch of prompts in the LLM input space, before reduction.

    inputs_embeds:  (B, L, D) token embeddings with image features in place of the image tokens
    attention_mask: (B, L) 1 on real tokens, 0 on (left) padding
    position_ids:   (B, L) RoPE positions (cumulative count of real tokens, as transformers' generate), or (B, L, 3)
                    multimodal rotary positions (temporal, height, width: Qwen-VL's M-RoPE, from the model's own
                    `get_rope_index`)
    image_positions:(I, N) column of each image token, images in row-major order of the batch (N: the largest image's
                    tokens; a smaller image's slots after its own repeat its last column)
    image_rows:     (I,) batch row of each image
    image_features: (I, N, D) projector outputs of each image (or a shorter image's tokens after a vision-side stage;
                    zeros after a smaller image's own)
    image_tokens:   (B,) image tokens of each row before any reduction (what the token accounting reports)
    image_additions: one (I, N, D) per decoder layer from the first, added to that layer's output at each image token
                    in the prompt pass (Qwen3-VL's DeepStack: features of earlier tower layers); empty for most models
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_positions: torch.Tensor
    image_rows: torch.Tensor
    image_features: torch.Tensor
    image_tokens: torch.Tensor
    image_additions: tuple[torch.Tensor, ...] = ()
    image_lengths: torch.Tensor | None = None  # (I,) each image's tokens where images differ in size; None: all N
    image_grids: torch.Tensor | None = None  # (I, 2) rows x cols of each image's own token grid (dynamic resolution)
    # the model's positions for this batch with images of other grids (a shorter image): (is_image (B, L) bool,
    # attention_mask (B, L), grids (I, 2)) -> (B, L, 3); the family adapter's, for multimodal rotary positions only
    positions_for: Callable | None = None
    # (I,) tiles (views) each image was cut into, where images come in tiles (LLaVA-NeXT: the base view and the crops;
    # InternVL: the tiles and the thumbnail); None: one each
    image_views: torch.Tensor | None = None
    # each image's token grids in token order, where its tokens form several (LLaVA-NeXT: the base view's, then the
    # unpadded grid of its crops; InternVL: each tile's); None: one grid (`image_grids`) or none
    image_tiles: tuple[tuple[tuple[int, int], ...], ...] | None = None
    # the family's block for a shorter image of other tiles, where its images have separators between rows: (features
    # (K, D), tiles) -> (block (M, D), is_separator (M,) bool); None: the shorter image's tokens alone
    lay_out: Callable | None = None
    # the vision tower's states of the batch's views, kept for a stage in the tower (`engine.views.TowerView`, with the
    # tiling of each image); None where no such stage runs
    tower: TowerView | None = None
    # (I,) the last column of each image's block where separators follow its last token (LLaVA-NeXT's last newline);
    # None: the block ends at its last token
    image_block_ends: torch.Tensor | None = None

    @property
    def tokens_per_image(self) -> int:
        """N: the tokens of every image (of the largest, where they differ)."""
        return self.image_positions.shape[1]

    @property
    def image_slots(self) -> torch.Tensor:
        """(I, N) bool: which of each image's N slots are its own tokens (all of them when images are of one size)."""
        slots = torch.ones(self.image_positions.shape, dtype=torch.bool, device=self.image_positions.device)
        if self.image_lengths is None:
            return slots
        return torch.arange(self.tokens_per_image, device=slots.device)[None, :] < self.image_lengths[:, None]


@dataclass
class ReducedPrompt:
    """What the LLM actually sees at prefill.

    inputs_embeds: (B, L', D); attention_mask: (B, L'); position_ids: (B, L') or (B, L', 3) original positions.
    image_tokens / visible_image_tokens: (B,) image tokens in the prompt / still visible after reduction.
    image_rows: (I,) batch row of each image; image_columns: (I, M) column of each image's tokens that are
    still in the sequence (M = N when masking, K when dropping); image_visible: (I, M) which of them are
    visible (an in-LLM stage chooses among these); image_token_index: (I, M) which of the image's N tokens each of
    them is (None: the first M, in order); image_additions: as `PromptEmbeddings`' ((I, N, D) per layer).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_tokens: torch.Tensor
    visible_image_tokens: torch.Tensor
    image_rows: torch.Tensor
    image_columns: torch.Tensor
    image_visible: torch.Tensor
    image_token_index: torch.Tensor | None = None
    image_additions: tuple[torch.Tensor, ...] = ()


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


def image_grid(config) -> tuple[int, int] | None:
    """(rows, cols) of the grid one image's tokens form, row-major (24 x 24 for LLaVA-1.5, 27 x 27 for SigLIP so400m
    under "full"); None where they form none (a CLS token kept, or a SigLIP patch dropped by "default")."""
    tokens = image_tokens_per_image(config)
    side = int(round(tokens ** 0.5))
    return (side, side) if side * side == tokens else None


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only real tokens; 0 on left padding (transformers' generate convention)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@torch.inference_mode()
def build_prompt_embeddings(model, input_ids, attention_mask, pixel_values=None, image_features=None,
                            image_tokens=None) -> PromptEmbeddings:
    """Embed a processed batch; image features replace the image tokens found from `input_ids`.

    input_ids, attention_mask: (B, L); pixel_values: (I, 3, H, W) or None.
    image_features: (I, N, D) to place instead of the projector outputs (a shorter image's tokens, with `input_ids`
    already holding N image tokens per image: `shorten_images`); image_tokens: (B,) the rows' image tokens before that
    shortening (default: those in `input_ids`).
    """
    config = model.config
    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == config.image_token_id  # (B, L)
    if image_features is not None:
        image_features = image_features.to(inputs_embeds.dtype)
    elif pixel_values is not None and pixel_values.shape[0]:
        features = model.model.get_image_features(pixel_values=pixel_values.to(inputs_embeds.dtype), return_dict=True)
        image_features = torch.stack(list(features.pooler_output)).to(inputs_embeds.dtype)  # (I, N, D)
    else:
        image_features = inputs_embeds.new_zeros(0, image_tokens_per_image(config), inputs_embeds.shape[-1])
    grid = image_grid(config)  # every image's, where its tokens form one
    grids = None if grid is None else torch.tensor([grid] * image_features.shape[0], device=input_ids.device).view(-1, 2)
    return place_image_features(inputs_embeds, is_image, image_features, attention_mask,
                                default_position_ids(attention_mask), image_tokens, image_grids=grids)


def place_image_features(inputs_embeds: torch.Tensor, is_image: torch.Tensor, image_features,
                         attention_mask: torch.Tensor, position_ids: torch.Tensor,
                         image_tokens: torch.Tensor | None = None,
                         image_additions: tuple = (), image_grids: torch.Tensor | None = None,
                         positions_for: Callable | None = None, separated: bool = False) -> PromptEmbeddings:
    """The prompt with each image's features at its image tokens, images in row-major order of the batch.

    inputs_embeds: (B, L, D) token embeddings; is_image: (B, L) bool, the image tokens (one contiguous block per image);
    image_features: (I, N, D), or one (N_i, D) per image where images differ in size; attention_mask: (B, L);
    position_ids: (B, L), or (B, L, 3) multimodal rotary positions; image_tokens: (B,) the rows' image tokens before
    any shortening (default: those in `is_image`); image_additions: per decoder layer from the first, (I, N, D) or one
    (N_i, D) per image (see `PromptEmbeddings`); image_grids: (I, 2) each image's token grid, where images have their
    own sizes; positions_for: the model's positions for images of other grids (see `PromptEmbeddings`); separated: an
    image's tokens may have separators between them (LLaVA-NeXT's row newlines), which stay as they are.
    """
    if isinstance(image_features, torch.Tensor):
        lengths, width = [image_features.shape[1]] * image_features.shape[0], image_features.shape[1]
    else:
        lengths = [int(part.shape[0]) for part in image_features]
        width = max(lengths, default=0)
    per_row = is_image.sum(dim=1)  # (B,)
    coordinates = is_image.nonzero()  # (sum N_i, 2), row-major
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    blocks = [coordinates[start:end] for start, end in zip(starts, starts[1:])]
    if int(per_row.sum()) != sum(lengths) or not all(_one_block(block, separated) for block in blocks):
        raise ValueError(
            f"input_ids hold {per_row.tolist()} image tokens per row but pixel_values give {len(lengths)} image(s) of "
            f"{lengths} tokens; each image needs one block of its own number of image tokens, in order"
        )
    device = inputs_embeds.device

    def padded(parts, fill_last: bool):  # one (N_i, ...) per image -> (I, N, ...), after each its last or zeros
        if isinstance(parts, torch.Tensor):
            return parts
        if not parts:
            return inputs_embeds.new_zeros(0, width, inputs_embeds.shape[-1])
        rows = []
        for part in parts:
            pad = part[-1:].expand(width - len(part), *part.shape[1:]) if fill_last else \
                part.new_zeros(width - len(part), *part.shape[1:])
            rows.append(torch.cat([part, pad]))
        return torch.stack(rows)

    image_positions = padded([block[:, 1] for block in blocks], fill_last=True) if blocks else \
        coordinates.new_zeros(0, width)  # (I, N)
    image_rows = torch.stack([block[0, 0] for block in blocks]) if blocks else coordinates[:0, 0]  # (I,)
    features = padded(image_features, fill_last=False)  # (I, N, D)
    if blocks:
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[is_image] = torch.cat([features[index, :length] for index, length in enumerate(lengths)]).to(inputs_embeds.dtype)
    return PromptEmbeddings(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        image_positions=image_positions,
        image_rows=image_rows,
        image_features=features,
        image_tokens=per_row if image_tokens is None else image_tokens,
        image_additions=tuple(padded(addition, fill_last=False).to(inputs_embeds.dtype) for addition in image_additions),
        image_lengths=None if len(set(lengths)) <= 1 else torch.tensor(lengths, device=device),
        image_grids=image_grids,
        positions_for=positions_for,
    )


def _one_block(coordinates: torch.Tensor, separated: bool = False) -> bool:
    """Whether (n, 2) (row, column) coordinates are one run of consecutive columns of one row (with `separated`, of
    one row: other tokens may stand between them)."""
    if not len(coordinates):
        return True
    consecutive = separated or int(coordinates[-1, 1] - coordinates[0, 1]) + 1 == len(coordinates)
    return bool(coordinates[0, 0] == coordinates[-1, 0]) and consecutive


def with_shorter_images(prompt: PromptEmbeddings, features: torch.Tensor, lengths: torch.Tensor | None = None,
                        grids: torch.Tensor | None = None, additions: tuple[torch.Tensor, ...] = ()) -> PromptEmbeddings:
    """The prompt with each image's tokens replaced by its `features` (I, K, D): image i's first K_i (`lengths` (I,),
    default all K) take the first K_i of the image's slots, its other slots leave the sequence (rows left-packed again),
    so the shorter image sits where the image was, at contiguous positions (a vision-side stage's or a pooled image).

    Positions are counted anew: 1-D positions from the mask; multimodal rotary positions as the model gives images of
    `grids` (I, 2) (rows, cols of each shorter image's tokens; required there). `additions`: the shorter images' rows of
    each of the prompt's per-layer image additions ((I, K, D) per layer; required where the prompt has them).
    """
    num_images, width = features.shape[:2]
    if prompt.position_ids.dim() != 2 and (grids is None or prompt.positions_for is None):
        raise ValueError("a shorter image on multimodal rotary positions (M-RoPE) needs the grid its tokens form: this "
                         "stage's shorter image forms none")
    if len(additions) != len(prompt.image_additions):
        raise ValueError(f"this model adds image features to the outputs of {len(prompt.image_additions)} decoder layers "
                         f"(DeepStack); a stage that shortens each image must give the shorter image's rows of each")
    device = prompt.attention_mask.device
    lengths = torch.full((num_images,), width, device=device) if lengths is None else lengths.to(device)
    slot = torch.arange(prompt.tokens_per_image, device=device)[None, :]  # (1, N)
    leaving = prompt.image_slots & (slot >= lengths[:, None])  # (I, N) own slots past the shorter image
    staying = slot[:, :width] < lengths[:, None]  # (I, K) the shorter image's real tokens
    keep = prompt.attention_mask.bool().clone()  # (B, L)
    rows = prompt.image_rows[:, None]  # (I, 1)
    keep[rows.expand_as(leaving)[leaving], prompt.image_positions[leaving]] = False
    embeds = prompt.inputs_embeds.clone()
    columns = prompt.image_positions[:, :width]  # (I, K)
    embeds[rows.expand_as(columns)[staying], columns[staying]] = features[staying].to(embeds.dtype)
    source, mask, target = left_pack(keep)  # (B, L'), (B, L'), (B, L)
    batch_rows = torch.arange(keep.shape[0], device=device)[:, None]
    last = torch.minimum(torch.arange(width, device=device)[None, :], lengths[:, None] - 1)  # (I, K): a slot past K_i repeats K_i - 1
    image_positions = target[rows, columns.gather(1, last)]  # (I, K) in the new sequence
    mask = mask.to(prompt.attention_mask.dtype)
    if prompt.position_ids.dim() == 2:
        position_ids = default_position_ids(mask)
    else:
        is_image = torch.zeros_like(keep[:, : mask.shape[1]])
        is_image[rows.expand_as(image_positions)[staying], image_positions[staying]] = True
        position_ids = prompt.positions_for(is_image, mask, grids)
    zero_past = staying[..., None].to(features.dtype)
    return PromptEmbeddings(
        inputs_embeds=embeds[batch_rows, source] * mask[..., None].to(embeds.dtype),
        attention_mask=mask,
        position_ids=position_ids,
        image_positions=image_positions,
        image_rows=prompt.image_rows,
        image_features=(features * zero_past).to(embeds.dtype),
        image_tokens=prompt.image_tokens,
        image_additions=tuple((addition * zero_past.to(addition.dtype)).to(embeds.dtype) for addition in additions),
        image_lengths=None if len(set(lengths.tolist())) <= 1 else lengths,
        image_grids=grids,
        positions_for=prompt.positions_for,
    )


def with_image_blocks(prompt: PromptEmbeddings, blocks: list[torch.Tensor], separators: list[torch.Tensor],
                      grids: torch.Tensor | None = None,
                      tiles: tuple[tuple[tuple[int, int], ...], ...] | None = None) -> PromptEmbeddings:
    """The prompt with each image's whole block (from its first own token to its last, or to `image_block_ends`, the
    separators between and after them included) replaced by a new one: `blocks[i]` (M_i, D) takes the first M_i
    columns of image i's old block, the rest leave the sequence (rows left-packed again); its image tokens are the
    entries not flagged in `separators[i]` (M_i,) bool. So a shorter image of a model with separators (LLaVA-NeXT's newlines) stands where the image was, with its
    separators placed anew, at contiguous 1-D positions. grids (I, 2) / tiles: the new images' grid(s), where they
    form some."""
    if prompt.position_ids.dim() != 2 or prompt.image_additions:
        raise ValueError("an image block with separators is placed on 1-D positions without per-layer image additions")
    device = prompt.attention_mask.device
    lengths = prompt.image_lengths.tolist() if prompt.image_lengths is not None else \
        [prompt.tokens_per_image] * prompt.image_rows.shape[0]
    keep = prompt.attention_mask.bool().clone()  # (B, L)
    is_image = torch.zeros_like(keep)
    embeds = prompt.inputs_embeds.clone()
    for index, (block, separator, length) in enumerate(zip(blocks, separators, lengths)):
        row = int(prompt.image_rows[index])
        first = int(prompt.image_positions[index, 0])
        last = int(prompt.image_positions[index, length - 1] if prompt.image_block_ends is None else prompt.image_block_ends[index])
        if len(block) > last - first + 1:
            raise ValueError(f"image {index}'s new block of {len(block)} tokens is longer than its {last - first + 1}")
        end = first + len(block)
        embeds[row, first:end] = block.to(embeds.dtype)
        is_image[row, first:end] = ~separator.to(device)
        keep[row, end:last + 1] = False
    source, mask, _ = left_pack(keep)  # (B, L'), (B, L')
    batch_rows = torch.arange(keep.shape[0], device=device)[:, None]
    mask = mask.to(prompt.attention_mask.dtype)
    placed = place_image_features(embeds[batch_rows, source] * mask[..., None].to(embeds.dtype),
                                  is_image[batch_rows, source] & mask.bool(),
                                  [block[~separator.to(block.device)] for block, separator in zip(blocks, separators)],
                                  mask, default_position_ids(mask), prompt.image_tokens, image_grids=grids,
                                  separated=True)
    placed.image_views, placed.image_tiles, placed.lay_out = prompt.image_views, tiles, prompt.lay_out
    return placed


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


def with_longer_image_blocks(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                             extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input_ids and attention_mask with `extra` more image tokens at the end of each image's block, rows
    left-padded again to the longest: room for an image that a stage makes longer than the model's (B, L')."""
    is_image = input_ids == image_token_id
    block_ends = is_image & ~torch.cat([is_image[:, 1:], torch.zeros_like(is_image[:, :1])], dim=1)  # (B, L)
    repeats = 1 + extra * block_ends.long()
    rows = [(ids.repeat_interleave(count), mask.repeat_interleave(count))
            for ids, mask, count in zip(input_ids, attention_mask, repeats)]
    width = max((len(ids) for ids, _ in rows), default=0)
    longer_ids = input_ids.new_zeros(len(rows), width)
    longer_mask = attention_mask.new_zeros(len(rows), width)
    for row, (ids, mask) in enumerate(rows):  # left padding, as the processor pads
        longer_ids[row, width - len(ids):], longer_mask[row, width - len(ids):] = ids, mask
    return longer_ids, longer_mask


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


def reduce_prompt(prompt: PromptEmbeddings, kept: torch.Tensor, apply: str, contiguous: bool = False) -> ReducedPrompt:
    """Hide the image tokens not in `kept` (I, K indices, or (I, N) bool flags: with "mask", any number per image):
    by masking them or by dropping them.

    Every remaining token keeps its original position id, so both modes compute the same function; "drop" also
    shrinks the sequence to (B, L') with L' = the longest remaining row. With `contiguous` (1-D positions only), the
    remaining tokens' positions are counted anew instead, as in a prompt written without the hidden ones (both modes
    alike). (A shorter image at contiguous positions is `with_shorter_images`.)
    """
    if contiguous and prompt.position_ids.dim() != 2:
        raise ValueError("contiguous positions after a stage before the LLM are defined on 1-D positions only")
    if apply not in ("mask", "drop"):
        raise ValueError(f"apply must be 'mask' or 'drop', got {apply!r}")
    batch_size = prompt.attention_mask.shape[0]
    device = prompt.attention_mask.device
    visible = prompt.attention_mask.bool().clone()  # (B, L)
    num_images, tokens_per_image = prompt.image_positions.shape
    image_index = torch.arange(num_images, device=device)[:, None]  # (I, 1)
    kept_slots = None  # (I, K) which entries of `kept` are real, when images keep different numbers
    slots = prompt.image_slots  # (I, N): a smaller image's slots after its own are never kept
    if kept.dtype != torch.bool and prompt.image_lengths is not None:
        raise ValueError("where a batch's images differ in size, the kept image tokens must be given as (I, N) flags")
    if kept.dtype == torch.bool:  # (I, N) flags: any number per image (at least one each when dropping)
        kept_flags = kept & slots
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
        hidden = slots & ~kept_flags
        visible[rows[hidden], prompt.image_positions[hidden]] = False
    image_tokens = prompt.image_tokens  # (B,)
    visible_image_tokens = torch.zeros(batch_size, dtype=torch.long, device=device).index_add_(0, prompt.image_rows, kept_flags.sum(dim=1))  # (B,)

    if apply == "mask":
        return ReducedPrompt(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=visible.to(prompt.attention_mask.dtype),
            position_ids=default_position_ids(visible) if contiguous else prompt.position_ids,
            image_tokens=image_tokens,
            visible_image_tokens=visible_image_tokens,
            image_rows=prompt.image_rows,
            image_columns=prompt.image_positions,
            image_visible=kept_flags,
            image_token_index=None if prompt.image_lengths is None else torch.minimum(  # a padded slot: its image's last
                torch.arange(tokens_per_image, device=device)[None, :], prompt.image_lengths[:, None] - 1),
            image_additions=prompt.image_additions,
        )
    source, mask, target = left_pack(visible)  # (B, L'), (B, L'), (B, L)
    rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
    image_columns = target[prompt.image_rows[:, None], prompt.image_positions.gather(1, kept)]  # (I, K)
    return ReducedPrompt(
        inputs_embeds=prompt.inputs_embeds[rows, source] * mask[..., None].to(prompt.inputs_embeds.dtype),
        attention_mask=mask.to(prompt.attention_mask.dtype),
        position_ids=default_position_ids(mask) if contiguous else
        prompt.position_ids[rows, source] * mask.view(*mask.shape, *[1] * (prompt.position_ids.dim() - 2)),
        image_tokens=image_tokens,
        visible_image_tokens=visible_image_tokens,
        image_rows=prompt.image_rows,
        image_columns=image_columns,
        image_visible=torch.ones_like(image_columns, dtype=torch.bool) if kept_slots is None else kept_slots,
        image_token_index=kept,
        image_additions=prompt.image_additions,
    )
