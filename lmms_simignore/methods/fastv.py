"""FastV (Chen et al., ECCV 2024): rank image tokens by the attention the last prompt token pays them.

At layer K, FastV looks at layer K-1's attention row of the last prompt token, averages it over heads
and keeps the image tokens that receive the most; the others are dropped for layers >= K. This module
only turns that attention row into per-image scores; `engine` computes the row and does the dropping.
"""

from __future__ import annotations

import torch


def fastv_scores(
    attention: torch.Tensor, image_columns: torch.Tensor, image_rows: torch.Tensor, image_visible: torch.Tensor
) -> torch.Tensor:
    """Per image token, the head-averaged attention it receives from its row's last prompt token.

    attention:     (B, H, L) softmax attention of each row's last token over the L columns.
    image_columns: (I, M) column of each image's candidate tokens; image_rows: (I,) their batch row.
    image_visible: (I, M) False where a candidate is already hidden (masked by an earlier stage).
    Returns: (I, M) float32 scores, -inf on hidden candidates (so they are never kept first).
    """
    mean_attention = attention.float().mean(dim=1)  # (B, L)
    scores = mean_attention[image_rows[:, None], image_columns]  # (I, M)
    return scores.masked_fill(~image_visible, float("-inf"))
