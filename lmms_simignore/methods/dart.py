"""DART (Wen et al., 2025, "Stop looking for important tokens ... duplication matters more"): keep the image
tokens that duplicate the others least.

At layer K (2 in its code) DART takes the output of layer K-1, picks *pivot* tokens by the largest L1 norm of
their keys in layer K-1 (half among the image tokens, half among the text after the image; 4 + 4 in its
LLaVA-1.5 scripts), and lets each pivot in turn keep its share of the budget: the image tokens least
cosine-similar to it (hidden states through the final norm), never one already kept. The image pivots are
kept too. Layers >= K see only the kept image tokens, at their original positions.

Ours keeps exactly `keep` tokens per image: the image pivots plus the rest of the budget shared among all
pivots (the first ones get one more when it does not divide); DART's code keeps 4 + 8 * floor(keep / 8)
(196 for 192) and visits the pivots in Python set order, ours in descending key norm, image pivots first.
This module holds the pure tensor function; `engine` computes the key norms and hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmms_simignore.methods.selection import select_top_k

DEFAULT_PIVOTS = 8
DEFAULT_LAYER = 2


def dart_choice(
    image_hidden: torch.Tensor,
    image_key_norms: torch.Tensor,
    image_visible: torch.Tensor,
    text_hidden: torch.Tensor,
    text_key_norms: torch.Tensor,
    text_mask: torch.Tensor,
    keep: int,
    pivots: int = DEFAULT_PIVOTS,
) -> torch.Tensor:
    """Indices of the `keep` image tokens DART keeps per image, ascending.

    image_hidden: (I, M, D) hidden states of each image's candidate tokens; image_key_norms: (I, M) L1 norms of
    their keys; image_visible: (I, M) False on candidates already hidden (never kept, never pivots).
    text_hidden: (I, T, D) and text_key_norms: (I, T) of the text tokens after each image; text_mask: (I, T).
    pivots: pivots per image, ceil(pivots / 2) among the image tokens, the rest among the text (fewer when the
    text is shorter; every image has at least one image pivot when keep >= 1).
    Returns: (I, keep) int64.
    """
    images, candidates, _ = image_hidden.shape
    available = int(image_visible.sum(dim=1).min()) if images else keep
    if not 0 <= keep <= available:
        raise ValueError(f"dart keeps {keep} image tokens per image but only {available} are visible")
    if pivots < 1:
        raise ValueError(f"dart needs at least one pivot, got {pivots}")
    device = image_hidden.device
    image_pivots = min((pivots + 1) // 2, keep)
    norms = image_key_norms.float().masked_fill(~image_visible, float("-inf"))
    image_pivot_index = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :image_pivots]  # (I, P_i)
    text_norms = text_key_norms.float().masked_fill(~text_mask, float("-inf"))
    text_order = torch.sort(text_norms, dim=1, descending=True, stable=True).indices[:, : pivots - image_pivots]  # (I, P_t)
    text_valid = text_mask.gather(1, text_order)  # (I, P_t)

    def gathered(hidden, index):
        return F.normalize(hidden.float().gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), dim=-1)

    pivot_vectors = torch.cat([gathered(image_hidden, image_pivot_index), gathered(text_hidden, text_order)], dim=1)  # (I, P, D)
    pivot_valid = torch.cat([torch.ones_like(image_pivot_index, dtype=torch.bool), text_valid], dim=1)  # (I, P)
    rows = torch.arange(images, device=device)[:, None]
    kept = torch.zeros(images, candidates, dtype=torch.bool, device=device)
    kept[rows, image_pivot_index] = True
    # the rest of the budget, shared among each image's valid pivots in order
    count = pivot_valid.sum(dim=1, keepdim=True)  # (I, 1)
    rest = keep - image_pivots
    slot = pivot_valid.long().cumsum(dim=1) - 1  # (I, P) rank among the valid pivots
    shares = torch.where(pivot_valid, rest // count + (slot < rest % count).long(), 0)  # (I, P)
    normalised = F.normalize(image_hidden.float(), dim=-1)  # (I, M, D)
    for pivot in range(pivot_vectors.shape[1]):
        similarity = (normalised @ pivot_vectors[:, pivot, :, None]).squeeze(-1)  # (I, M)
        similarity = similarity.masked_fill(kept | ~image_visible, float("inf"))
        order = torch.sort(similarity, dim=1, stable=True).indices  # least similar first
        rank = order.argsort(dim=1)  # (I, M)
        kept |= rank < shares[:, pivot, None]
    return select_top_k(kept.float(), keep)
