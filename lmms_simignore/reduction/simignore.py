"""Simignore: score image tokens by their embedding similarity to text tokens (Zeng et al., AAAI 2025).

Each image token gets the similarity to its *most similar* text token; the least similar image tokens
are the ones to ignore. Distances are turned into scores by negation, so "most similar" always means
"highest score" (the published code's commented-out distance variants kept the most distant tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("cosine", "euclidean", "manhattan")


def similarity_scores(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """Per image token, its best similarity over the valid text tokens of the same row.

    image_embeds: (B, N, D) image features in the LLM input space (after the projector).
    text_embeds:  (B, T, D) LLM input embeddings of the text tokens.
    text_mask:    (B, T) bool, True on real text tokens (each row needs at least one).
    Returns: (B, N) float32 scores, higher = more similar (cosine, or minus the L2 / L1 distance).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if image_embeds.dim() != 3 or text_embeds.dim() != 3 or image_embeds.shape[::2] != text_embeds.shape[::2]:
        raise ValueError(
            f"expected image (B, N, D) and text (B, T, D) with equal B and D, "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if text_mask.shape != text_embeds.shape[:2]:
        raise ValueError(f"text_mask must be {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}")
    empty_rows = (~text_mask.bool()).all(dim=1)
    if empty_rows.any():
        raise ValueError(f"rows {empty_rows.nonzero().flatten().tolist()} have no text token to compare with")

    image = image_embeds.float()
    text = text_embeds.float()
    valid = text_mask.bool()[:, None, :]  # (B, 1, T)
    if similarity == "cosine":
        pairwise = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).transpose(1, 2)  # (B, N, T)
    else:
        p = 2.0 if similarity == "euclidean" else 1.0
        pairwise = -torch.cdist(image, text, p=p)  # (B, N, T)
    return pairwise.masked_fill(~valid, float("-inf")).amax(dim=-1)  # (B, N)
