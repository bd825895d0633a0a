"""Turning per-token scores into the set of kept tokens."""

from __future__ import annotations

import torch

# Which part of a score ranking is *ignored* (the rest is kept).
ORDERS = ("unimportant", "middle", "important", "random")


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(..., N) scores -> (..., N) indices, highest score first (ties: the lower index first); compared in float32 at
    least (float64 as it is)."""
    return torch.sort(-(scores if scores.dtype == torch.float64 else scores.float()), dim=-1, stable=True).indices


def select_top_k(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest-scoring tokens of each row, in ascending (sequence) order.

    scores: (B, N), higher = keep first. Ties go to the lower index (stable sort), so the choice is
    deterministic across runs, devices and batch compositions.
    Returns: (B, keep) int64.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if not 0 <= keep <= scores.shape[1]:
        raise ValueError(f"keep must be in [0, {scores.shape[1]}] (tokens per row), got {keep}")
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    return torch.sort(ranking[:, :keep], dim=1).values  # (B, keep)


def select_by_order(scores: torch.Tensor, keep: int, order: str = "unimportant") -> torch.Tensor:
    """Keep `keep` tokens per row, ignoring the part of the score ranking that `order` names.

    scores: (B, N), higher = more important.
    order:  "unimportant": ignore the lowest scores (keep the top `keep`);
            "important":   ignore the highest scores (keep the bottom `keep`);
            "middle":      ignore the middle band (keep the top ceil(keep/2) and the bottom floor(keep/2));
            "random":      `scores` are already random draws: keep their top `keep`.
    Returns: (B, keep) int64, ascending.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if order in ("unimportant", "random"):
        return select_top_k(scores, keep)
    if not 0 <= keep <= scores.shape[1]:
        raise ValueError(f"keep must be in [0, {scores.shape[1]}] (tokens per row), got {keep}")
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N), best first
    if order == "important":
        chosen = ranking[:, ranking.shape[1] - keep :]
    else:
        top = (keep + 1) // 2
        chosen = torch.cat([ranking[:, :top], ranking[:, ranking.shape[1] - (keep - top) :]], dim=1)
    return torch.sort(chosen, dim=1).values  # (B, keep)


def within_margin_of_best(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """An adaptive budget: keep every token whose score is within `margin` of the image's best one.

    scores: (I, N), higher = keep first. Returns (I, N) bool; the best token is always kept, and an image whose
    scores are close together keeps more tokens than one with a few clear winners.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return scores >= scores.amax(dim=1, keepdim=True) - margin
