"""Pooling: the plain downsampling baseline the field's benchmarks compare (UniPruneBench's "Pool", VTC-Bench's
"downsample", which beats most compression methods in their measurements).

After the projector, each image's grid of tokens (24 x 24 on LLaVA-1.5; each image's own on Qwen-VL; on a tiled image
each of its grids on its own: InternVL's 16 x 16 per tile, LLaVA-NeXT's base view and the unpadded grid of its crops as
the model packs them, its newlines then placed after each pooled row) is average-pooled with kernel = stride = s and
read out row-major: a shorter image that stands where the image was, at contiguous
positions (as VisionZip's shorter image; on models with multimodal rotary positions, at the positions the model gives an
image of the pooled grid). `keep=1/s²` (0.25, 0.111, 0.0625) pools with stride s on any grid: where s does not divide a
side, the last window of that side is partial, the mean of the tokens it covers (ceil mode), so an image of r x c
tokens keeps ceil(r/s) * ceil(c/s). A count (`keep=144`, `ignore=N`) must be (r/s) * (c/s) for a whole stride of the
grid; others are refused, naming the nearest valid ones. UniPruneBench pools the projector outputs of each tile the
same way (`Pool_PreLLM.py`, `adaptive_avg_pool2d` to a square budget); no public code pools Qwen's merged grid, whose
sides are rarely multiples of s, hence the partial windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.base import (PRE_LLM, Budget, Method, PipelineContext, PreLLMStage, ShorterImage, StageRequest,
                                         require_keep_or_ignore)


def pooled_size(grid: tuple[int, int], stride: int) -> tuple[int, int]:
    """(rows, cols) of a grid pooled with `stride`, a partial last window on a side it does not divide."""
    return math.ceil(grid[0] / stride), math.ceil(grid[1] / stride)


def pooled_grid(features: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Average pooling of each image's grid, kernel = stride = `stride`; a window cut by the grid's edge averages the
    tokens it covers.

    features: (I, N, D) with N = rows * cols, row-major; grid: (rows, cols).
    Returns: (I, ceil(rows / stride) * ceil(cols / stride), D), row-major.
    """
    images, tokens, width = features.shape
    rows, cols = grid
    if rows * cols != tokens or stride < 1:
        raise ValueError(f"a {rows} x {cols} grid of {tokens} tokens cannot be pooled with stride {stride}")
    planes = features.reshape(images, rows, cols, width).permute(0, 3, 1, 2)  # (I, D, rows, cols)
    pooled = F.avg_pool2d(planes, kernel_size=stride, stride=stride, ceil_mode=True)  # (I, D, ceil(rows/s), ceil(cols/s))
    return pooled.flatten(2).transpose(1, 2)  # (I, K, D)


def valid_budgets(grids: tuple[tuple[int, int], ...]) -> dict[int, int]:
    """{tokens kept per image: stride} for every whole stride of an image's grids (a stride dividing every side)."""
    smallest = min(min(grid) for grid in grids)
    return {sum((rows // stride) * (cols // stride) for rows, cols in grids): stride for stride in range(1, smallest + 1)
            if all(rows % stride == 0 and cols % stride == 0 for rows, cols in grids)}


def stride_of_fraction(keep) -> int | None:
    """s where `keep` is a fraction 1/s² (to two decimals of s²: 0.111 -> 3), else None."""
    if not isinstance(keep, float) or not 0 < keep <= 1:
        return None
    stride = max(1, round(keep ** -0.5))
    return stride if abs(keep * stride * stride - 1) <= 0.01 else None


def stride_for(budget: Budget, grids: tuple[tuple[int, int], ...]) -> int:
    """The stride a budget pools an image of `grids` with (one grid, or a tiled image's grids, each pooled on its own):
    a fraction 1/s² gives s; a count must be a whole stride's."""
    stride = stride_of_fraction(budget.keep)
    if stride is not None:
        return stride
    keep = budget.count(sum(rows * cols for rows, cols in grids))
    budgets = valid_budgets(grids)
    if keep not in budgets:
        nearest = sorted(budgets, key=lambda valid: (abs(valid - keep), valid))[:2]
        shape = " + ".join(f"{rows} x {cols}" for rows, cols in grids)
        raise ValueError(f"pool keeps 1/s² of each image (keep=0.25: stride 2, 0.111: 3, 0.0625: 4; a partial last window "
                         f"where s does not divide a side) or (rows / s) x (cols / s) tokens for a whole stride s of the "
                         f"{shape} grid{'s' if len(grids) > 1 else ''}: keep={', '.join(map(str, sorted(budgets, reverse=True)))}; "
                         f"got keep={keep}, nearest valid: {' or '.join(map(str, nearest))}")
    return budgets[keep]


def pooled_tiles(features: torch.Tensor, grids: tuple[tuple[int, int], ...], stride: int) -> torch.Tensor:
    """Each of an image's grids pooled on its own (`pooled_grid`), in order: (I, N, D) with N = the grids' tokens ->
    (I, K, D), K = the pooled grids' tokens."""
    sizes = [rows * cols for rows, cols in grids]
    return torch.cat([pooled_grid(part, grid, stride) for part, grid in zip(features.split(sizes, dim=1), grids)], dim=1)


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolArguments:
    """None of its own: the stride follows from `keep` (s^2 = N / keep)."""


def _check(args: PoolArguments, context: PipelineContext) -> None:
    require_keep_or_ignore("pool", context)
    if context.apply == "mask":
        raise ValueError("pool makes new tokens (averages of its windows), which only apply=drop can place in the sequence")


def _plan(args: PoolArguments, request: StageRequest) -> tuple[PreLLMStage]:
    grids = request.grids
    if grids is None or request.available != request.image_tokens:
        raise ValueError(f"pool averages each image's grid of tokens; this model's {request.available} image tokens per "
                         f"image form no grid (a CLS token kept, a patch dropped, or a shorter image from a stage before)")
    stride = stride_for(request.budget, grids)
    pooled = tuple(pooled_size(grid, stride) for grid in grids)
    return (PreLLMStage("pool", sum(rows * cols for rows, cols in pooled), partial(_pool, grids, stride), replaces=True),)


def _pool(grids: tuple[tuple[int, int], ...], stride: int, view) -> ShorterImage:
    """Each image's pooled grid(s), and the same pooling for other rows of its tokens; view:
    `engine.views.ImageTokensView`."""
    same = partial(pooled_tiles, grids=grids, stride=stride)
    pooled = tuple(pooled_size(grid, stride) for grid in grids)
    tiled = len(grids) > 1
    return ShorterImage(same(view.image_features), None if tiled else pooled[0], same, pooled if tiled else None)


METHOD = Method(
    name="pool",
    title="pooling (UniPruneBench's Pool, VTC-Bench's downsample)",
    summary="after the projector, average-pools each image's grid of tokens with kernel = stride = s (s² = N / keep: "
            "576 → 144 with s = 2, → 64 with s = 3), row-major; the shorter image stands where the image was, at "
            "contiguous positions (M-RoPE: those of an image of the pooled grid)",
    places=(PRE_LLM,),
    arguments=PoolArguments,
    budget="`keep`/`ignore` per image, required: `keep=1/s²` (0.25, 0.111, 0.0625) pools any grid with stride s "
           "(⌈rows / s⌉ · ⌈cols / s⌉ tokens, a partial last window where s does not divide a side); a count must be "
           "(rows / s) · (cols / s) for a whole stride (on 24 × 24: 576, 144, 64, 36, 16, 9, 4, 1); others are refused "
           "naming the nearest",
    positions="contiguous",
    needs=("projected image tokens on a grid per image, or per tile of a tiled image",),
    refuses="towers whose tokens form no grid (a CLS token kept); apply=mask",
    check=_check,
    plan=_plan,
)
