"""FastV (Chen et al., ECCV 2024): rank image tokens by the attention the last prompt token pays them.

At layer K, FastV looks at layer K-1's attention row of the last prompt token, averages it over heads
and keeps the image tokens that receive the most; the others are dropped for layers >= K. This module
only turns that attention row into per-image scores; `engine` computes the row and does the dropping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_simignore.methods.arguments import (argument, check_count_or_fraction, check_fraction, check_int, check_stage_layers,
                                              resolve_count, round_half_up)
from lmms_simignore.methods.base import IN_LLM, LayerChoice, LayerStage, Method, PipelineContext, StageRequest
from lmms_simignore.methods.selection import select_top_k


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


def choose_by_last_token_attention(view) -> LayerChoice:
    """The stage's `keep` image tokens per image that the last prompt token attends to most in the layer before
    (mean over heads); view: `engine.views.LayerView`."""
    scores = fastv_scores(view.last_token_attention(), view.image_columns, view.image_rows, view.image_visible)  # (I, M)
    return LayerChoice(select_top_k(scores, view.keep))


# -- declaration -----------------------------------------------------------------------------------------------------
DEFAULT_RATIO = 0.5  # R: its paper's default (and its lmms-eval shim's)


@dataclass(frozen=True)
class FastVArguments:
    fastv_layer: int = argument(2, "K: FastV prunes for layers ≥ K using layer K−1's attention (its paper's K = 2; its "
                                "lmms-eval shim used 3); must leave a layer on each side")
    fastv_keep: int | float | None = argument(None, "FastV's budget as image tokens (or a fraction of the model's) to "
                                              "keep per image")
    fastv_ratio: float | None = argument(None, "FastV's budget as the fraction R of the model's image tokens to drop "
                                         "(keeps round((1−R)·N)); 0.5 (its paper's) when no FastV budget is given")

    def __post_init__(self) -> None:
        check_int("fastv_layer", self.fastv_layer, 1)
        if self.fastv_keep is not None and self.fastv_ratio is not None:
            raise ValueError(f"give one of fastv_keep and fastv_ratio, not both (fastv_keep={self.fastv_keep}, "
                             f"fastv_ratio={self.fastv_ratio})")
        check_count_or_fraction("fastv_keep", self.fastv_keep)
        check_fraction("fastv_ratio", self.fastv_ratio, "of image tokens to drop")


def _check(args: FastVArguments, context: PipelineContext) -> None:
    if context.budget is not None and context.budget.adaptive:
        raise ValueError("keep=auto is Simignore's adaptive budget; fastv keeps a fixed number per image")


def kept_by_fastv(args: FastVArguments, request: StageRequest) -> int:
    """Image tokens per image FastV keeps for layers >= fastv_layer."""
    tokens = request.image_tokens
    if args.fastv_keep is not None:
        kept = resolve_count("fastv_keep", args.fastv_keep, tokens)
    elif request.budget is not None and request.budget.given:
        kept = request.budget.count(tokens)
    else:
        kept = round_half_up((1 - (DEFAULT_RATIO if args.fastv_ratio is None else float(args.fastv_ratio))) * tokens)
    if kept > request.available:
        raise ValueError(f"fastv keeps {kept} image tokens per image but only {request.available} of the model's {tokens} "
                         f"reach it; lower fastv_keep (or fastv_ratio's share) or raise the budget of the stage before")
    return kept


def _plan(args: FastVArguments, request: StageRequest) -> tuple[LayerStage]:
    check_stage_layers("fastv_layer", (args.fastv_layer,), request.num_layers, request.after_layer)
    return fastv_stage(args.fastv_layer, kept_by_fastv(args, request), request.positions or "original")


METHOD = Method(
    name="fastv",
    title="FastV (Chen et al., ECCV 2024)",
    summary="inside the LLM: at layer K ranks image tokens by the attention the last prompt token pays them in layer "
            "K−1 (mean over heads) and drops the rest for layers ≥ K",
    places=(IN_LLM,),
    arguments=FastVArguments,
    budget="tokens per image kept from layer K on: `fastv_ratio` R (default 0.5: keeps round((1−R)·N)) or `fastv_keep` "
           "(count or fraction of the model's N); as the first stage, `keep`/`ignore` too",
    positions="original",
    needs=("one attention row (the last prompt token's) at layer K−1",),
    check=_check,
    plan=_plan,
    own_budget=("fastv_keep", "fastv_ratio"),
)


def fastv_stage(layer: int, keep: int, positions: str = "original") -> tuple[LayerStage]:
    """FastV's one stage at `layer` keeping `keep` image tokens per image (what its plan gives)."""
    return (LayerStage("fastv", layer, keep, choose_by_last_token_attention, positions=positions),)
