"""Pooling: the plain downsampling baseline the field's benchmarks compare (UniPruneBench's "Pool", VTC-Bench's
"downsample", which beats most compression methods in their measurements).

After the projector, each image's grid of tokens (24 x 24 on LLaVA-1.5) is average-pooled with kernel = stride = s,
where s^2 = N / keep (576 -> 144 with s = 2, -> 64 with s = 3), and read out row-major: a shorter image that stands where
the image was, at contiguous positions (as VisionZip's shorter image). UniPruneBench pools the projector outputs of
each tile the same way (`Pool_PreLLM.py`, `adaptive_avg_pool2d` to a square budget); a budget that does not give a
whole stride is refused here, naming the nearest valid ones, rather than pooled with uneven windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.base import PRE_LLM, Method, PipelineContext, PreLLMStage, StageRequest, require_keep_or_ignore


def pooled_grid(features: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Average pooling of each image's grid, kernel = stride = `stride`.

    features: (I, N, D) with N = rows * cols, row-major; grid: (rows, cols), each divisible by `stride`.
    Returns: (I, (rows / stride) * (cols / stride), D), row-major.
    """
    images, tokens, width = features.shape
    rows, cols = grid
    if rows * cols != tokens or rows % stride or cols % stride:
        raise ValueError(f"a {rows} x {cols} grid of {tokens} tokens cannot be pooled with stride {stride}")
    planes = features.reshape(images, rows, cols, width).permute(0, 3, 1, 2)  # (I, D, rows, cols)
    pooled = F.avg_pool2d(planes, kernel_size=stride, stride=stride)  # (I, D, rows / s, cols / s)
    return pooled.flatten(2).transpose(1, 2)  # (I, K, D)


def valid_budgets(grid: tuple[int, int]) -> dict[int, int]:
    """{tokens kept per image: stride} for every whole stride of the grid (the stride dividing both sides)."""
    rows, cols = grid
    return {(rows // stride) * (cols // stride): stride for stride in range(1, min(rows, cols) + 1)
            if rows % stride == 0 and cols % stride == 0}


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolArguments:
    """None of its own: the stride follows from `keep` (s^2 = N / keep)."""


def _check(args: PoolArguments, context: PipelineContext) -> None:
    require_keep_or_ignore("pool", context)
    if context.apply == "mask":
        raise ValueError("pool makes new tokens (averages of its windows), which only apply=drop can place in the sequence")


def _plan(args: PoolArguments, request: StageRequest) -> tuple[PreLLMStage]:
    if request.grid is None or request.available != request.image_tokens:
        raise ValueError(f"pool averages each image's grid of tokens; this model's {request.available} image tokens per "
                         f"image form no grid (a CLS token kept, a patch dropped, or a shorter image from a stage before)")
    keep = request.budget.count(request.image_tokens)
    budgets = valid_budgets(request.grid)
    if keep not in budgets:
        nearest = sorted(budgets, key=lambda valid: (abs(valid - keep), valid))[:2]
        raise ValueError(f"pool keeps (rows / s) x (cols / s) tokens per image for a whole stride s of the "
                         f"{request.grid[0]} x {request.grid[1]} grid: keep={', '.join(map(str, sorted(budgets, reverse=True)))}; "
                         f"got keep={keep}, nearest valid: {' or '.join(map(str, nearest))}")
    return (PreLLMStage("pool", keep, partial(_pool, request.grid, budgets[keep]), replaces=True),)


def _pool(grid: tuple[int, int], stride: int, view) -> torch.Tensor:
    """(I, K, D) each image's pooled grid; view: `engine.views.ImageTokensView`."""
    return pooled_grid(view.image_features, grid, stride)


METHOD = Method(
    name="pool",
    title="pooling (UniPruneBench's Pool, VTC-Bench's downsample)",
    summary="after the projector, average-pools each image's grid of tokens with kernel = stride = s (s² = N / keep: "
            "576 → 144 with s = 2, → 64 with s = 3), row-major; the shorter image stands where the image was, at "
            "contiguous positions",
    places=(PRE_LLM,),
    arguments=PoolArguments,
    budget="`keep`/`ignore` per image, required, for a whole stride: (rows / s) · (cols / s) (on 24 × 24: 576, 144, 64, "
           "36, 16, 9, 4, 1); others are refused naming the nearest",
    positions="contiguous",
    needs=("projected image tokens on one grid per image",),
    refuses="towers whose tokens form no grid (a CLS token kept); apply=mask",
    check=_check,
    plan=_plan,
)
