"""VisionDrop (Xu et al., AAAI 2026, arXiv 2506.22283): text-free reduction in stages, merging what it drops.

Its argument: the text-guided choices (Simignore's, FastV's) suffer from cross-modal misalignment, so rank
image tokens by how much attention they receive *from image tokens*. Stage 1 is VisionZip's in the vision
tower. Then, at stages inside the LLM (its code: after layers 8, 16, 24 of 32), the image tokens present
are scored with the next layer's norm, query/key projections and rotary embedding on the current hidden
states: queries are the image tokens, keys the whole sequence under the causal mask, softmax over all keys,
then the image-key columns are kept and averaged over heads and over the image queries. The top `dominant`
stay; the rest merge VisionZip-style into `contextual` tokens (metric: the same layer's keys after the rotary
embedding, averaged over heads). Its code's schedule for an average of 32 tokens on LLaVA-1.5-7B: 42 + 6 in
the tower, then 30 + 5, 22 + 4 and 16 + 3 ((48 + 35 + 26 + 19) x 8 / 32 = 32).

Positions: VisionDrop re-packs them contiguously after each stage; we keep original positions (a merged token
at its target's), the engine's rule for every in-LLM stage. This module holds the pure tensor functions.
"""

from __future__ import annotations

import torch

# (dominant, contextual) of the vision stage, then of each LLM stage: its code's LLaVA-1.5 schedule (average 32)
DEFAULT_SCHEDULE = ((42, 6), (30, 5), (22, 4), (16, 3))
SCHEDULE_AVERAGE = 32  # image tokens per layer that schedule averages over 32 layers with stages at 8, 16, 24


def scaled_schedule(average: int | float, schedule: tuple[tuple[int, int], ...] = DEFAULT_SCHEDULE) -> tuple[tuple[int, int], ...]:
    """The published schedule scaled to another average (rounded half up; at least one dominant token per stage)."""
    factor = average / SCHEDULE_AVERAGE
    return tuple((max(1, int(dominant * factor + 0.5)), int(contextual * factor + 0.5)) for dominant, contextual in schedule)


def received_attention(weights: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Per image token, the attention it receives from the image's tokens.

    weights: (I, H, M, M) softmax weights of the M image queries (rows) on the M image keys (columns), taken
    from a softmax over the whole sequence; visible: (I, M) False on hidden candidates (neither query nor key).
    Returns: (I, M) float32, mean over heads and over the visible queries; -inf on hidden candidates.
    """
    per_query = weights.float().mean(dim=1)  # (I, M queries, M keys)
    queries = visible.float()[..., None]  # (I, M, 1)
    scores = (per_query * queries).sum(dim=1) / queries.sum(dim=1).clamp(min=1)  # (I, M)
    return scores.masked_fill(~visible, float("-inf"))
