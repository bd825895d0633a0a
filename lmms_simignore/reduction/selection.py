"""Turning per-token scores into the set of kept tokens."""

from __future__ import annotations

import torch


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
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    return torch.sort(order[:, :keep], dim=1).values  # (B, keep)
