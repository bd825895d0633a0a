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

After each LLM stage its code rebuilds the image as [dominant tokens in their order, then the contextual tokens]
(`visiondrop_rank_drop`: `torch.cat([dominant_tokens, contextual_tokens])`) and re-numbers the positions 0..n-1;
ours does the same by default (`visiondrop_merge_order=end`, positions re-packed), or puts each contextual token in
its target's place (`target`). This module holds the pure tensor functions and the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from lmms_simignore.methods.arguments import argument, check_choice, check_stage_layers, layers_text, parse_layers, resolve_layers
from lmms_simignore.methods.base import (CLS_ATTENTION, IN_LLM, VISION, Budget, LayerChoice, LayerStage, Method, PipelineContext,
                                         StageRequest, VisionStage)
from lmms_simignore.methods.pdrop import depth_layers
from lmms_simignore.methods.selection import select_top_k
from lmms_simignore.methods.visionzip import contextual_plan, merge_into_targets, shorten_in_tower

# (dominant, contextual) of the vision stage, then of each LLM stage: its code's LLaVA-1.5 schedule (average 32)
DEFAULT_SCHEDULE = ((42, 6), (30, 5), (22, 4), (16, 3))
SCHEDULE_AVERAGE = 32  # image tokens per layer that schedule averages over 32 layers with stages at 8, 16, 24


def scaled_schedule(average: int | float, schedule: tuple[tuple[int, int], ...] = DEFAULT_SCHEDULE) -> tuple[tuple[int, int], ...]:
    """The published schedule scaled to another average (rounded half up; at least one dominant token per stage)."""
    factor = average / SCHEDULE_AVERAGE
    return tuple((max(1, int(dominant * factor + 0.5)), int(contextual * factor + 0.5)) for dominant, contextual in schedule)


def received_attention(received: torch.Tensor, columns: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Per image token, the attention it receives from the image's tokens, averaged.

    received: (I, S) the attention each column of the row receives from the image's visible tokens, mean over heads,
    summed over those queries (each query's weights a softmax over the whole sequence); columns: (I, M) where the
    image's tokens sit; visible: (I, M) False on hidden candidates (neither query nor key).
    Returns: (I, M) float32, mean over heads and over the visible queries; -inf on hidden candidates.
    """
    queries = visible.sum(dim=1, keepdim=True).clamp(min=1)  # (I, 1)
    scores = received.float().gather(1, columns) / queries  # (I, M)
    return scores.masked_fill(~visible, float("-inf"))


def parse_schedule(schedule) -> tuple[tuple[int, int], ...]:
    """'42+6/30+5/22+4/16+3' -> ((42, 6), (30, 5), (22, 4), (16, 3)): at least two stages, dominant >= 1, contextual
    >= 0, and no stage keeping more than the one before."""
    try:
        stages = tuple(tuple(int(x) for x in part.split("+")) for part in schedule.split("/")) if isinstance(schedule, str) \
            else tuple(tuple(part) for part in schedule)
    except (ValueError, TypeError, AttributeError):
        stages = ()
    totals = [sum(stage) for stage in stages]
    if len(stages) < 2 or any(len(stage) != 2 or stage[0] < 1 or stage[1] < 0 for stage in stages) \
            or totals != sorted(totals, reverse=True):
        raise ValueError(f"visiondrop_schedule must be dominant+contextual per stage, the vision stage first, each stage "
                         f"keeping at most what the one before kept, e.g. 42+6/30+5/22+4/16+3; got {schedule!r}")
    return stages


def merged_content(dominant: torch.Tensor, rest: torch.Tensor, targets: torch.Tensor, assignment: torch.Tensor,
                   kept: torch.Tensor, order: str, hidden: torch.Tensor) -> torch.Tensor:
    """The kept slots' content (I, K, D) from the candidates' hidden states `hidden` (I, M, D).

    dominant: (I, d) and rest: (I, R) indices into the M candidates (ascending); targets, assignment: the merge plan
    over `rest` (`visionzip.contextual_plan`); kept: (I, K) the slots (dominant and targets, ascending).
    order "end": the dominant tokens in their order, then the contextual ones (its code); "target": each contextual
    token in its target's slot.
    """
    width = hidden.shape[-1]
    contextual = merge_into_targets(hidden.gather(1, rest[..., None].expand(-1, -1, width)), targets, assignment)  # (I, C, D)
    if order == "end":
        dominant_hidden = hidden.gather(1, dominant[..., None].expand(-1, -1, width))  # (I, d, D)
        return torch.cat([dominant_hidden, contextual.to(hidden.dtype)], dim=1)
    content = hidden.gather(1, kept[..., None].expand(-1, -1, width)).clone()  # (I, K, D)
    slots = torch.searchsorted(kept, rest[:, targets])  # (I, C) where each target sits among the kept
    return content.scatter(1, slots[..., None].expand(-1, -1, width), contextual.to(hidden.dtype))


def choose_dominant_and_merge(contextual: int, order: str, view) -> LayerChoice:
    """A VisionDrop LLM stage: the `keep - contextual` image tokens the image attends to most in the next layer stay,
    the rest merge into `contextual` tokens (metric: the next layer's keys after the rotary embedding, mean over
    heads). view: `engine.views.LayerView`."""
    columns, visible = view.image_columns, view.image_visible  # (I, M)
    if not columns.numel():
        return LayerChoice(columns[:, : view.keep])
    received, keys = view.next_layer_attention_from_images()  # (I, S), (I, Hkv, S, d)
    dominant = select_top_k(received_attention(received, columns, visible), view.keep - contextual)  # (I, d)
    rest_flags = visible.clone()
    rest_flags.scatter_(1, dominant, False)
    rest = rest_flags.nonzero()[:, 1].reshape(columns.shape[0], -1)  # (I, R) ascending
    metric = keys.float().mean(dim=1)  # (I, S, d)
    metric = metric.gather(1, columns.gather(1, rest)[..., None].expand(-1, -1, metric.shape[-1]))  # (I, R, d)
    targets, assignment = contextual_plan(metric, contextual)
    kept = torch.sort(torch.cat([dominant, rest[:, targets]], dim=1), dim=1).values  # (I, K)
    return LayerChoice(kept, partial(merged_content, dominant, rest, targets, assignment, kept, order))


# -- declaration -----------------------------------------------------------------------------------------------------
MERGE_ORDERS = ("end", "target")


@dataclass(frozen=True)
class VisionDropArguments:
    visiondrop_schedule: str | tuple | None = argument(
        None, "dominant+contextual tokens per image of the tower stage, then of each LLM stage (its code's schedule, an "
              "average of 32 tokens per layer on LLaVA-1.5); `keep=N` instead scales it to an average of N",
        "`42+6/30+5/22+4/16+3`")
    visiondrop_layers: str | tuple | None = argument(
        None, "the LLM stages' layers, as `pdrop_layers` (its code's 8/16/24 of 32)", "`0.25/0.5/0.75`")
    visiondrop_merge_order: str = argument(
        "end", "where an LLM stage's merged tokens go: after the dominant ones (its code's `torch.cat([dominant, "
               "contextual])`) or each in its target's place", " | ".join(MERGE_ORDERS))

    def __post_init__(self) -> None:
        if self.visiondrop_schedule is not None:
            object.__setattr__(self, "visiondrop_schedule", parse_schedule(self.visiondrop_schedule))
        if self.visiondrop_layers is not None:
            object.__setattr__(self, "visiondrop_layers", parse_layers("visiondrop_layers", self.visiondrop_layers))
        check_choice("visiondrop_merge_order", self.visiondrop_merge_order, MERGE_ORDERS)


def _check(args: VisionDropArguments, context: PipelineContext) -> None:
    budget = context.budget or Budget()
    if budget.ignore is not None or budget.adaptive or isinstance(budget.keep, float):
        raise ValueError(f"visiondrop is budgeted by keep=N (an average number of image tokens per layer: its schedule "
                         f"scaled) or visiondrop_schedule=, not {budget.describe()}")


def schedule_of(args: VisionDropArguments, request: StageRequest) -> tuple[tuple[int, int], ...]:
    if args.visiondrop_schedule is not None:
        return args.visiondrop_schedule
    if request.budget is not None and request.budget.keep is not None:
        return scaled_schedule(request.budget.keep)
    return DEFAULT_SCHEDULE


def _plan(args: VisionDropArguments, request: StageRequest) -> tuple:
    schedule = schedule_of(args, request)
    (dominant, contextual), llm_schedule = schedule[0], schedule[1:]
    if dominant + contextual > request.image_tokens:
        raise ValueError(f"visiondrop's tower stage keeps {dominant}+{contextual} tokens per image, more than the model's "
                         f"{request.image_tokens} image tokens (its default schedule is for LLaVA-1.5's 576: pass keep=N)")
    layers = depth_layers(request.num_layers) if args.visiondrop_layers is None else \
        resolve_layers("visiondrop_layers", args.visiondrop_layers, request.num_layers)
    if len(layers) != len(llm_schedule):
        raise ValueError(f"visiondrop has {len(llm_schedule)} LLM stages in its schedule "
                         f"({'/'.join(f'{d}+{c}' for d, c in schedule)}) but {len(layers)} stage layers "
                         f"({layers_text(layers)}); give as many of each")
    check_stage_layers("visiondrop_layers", layers, request.num_layers, request.after_layer)
    tower = VisionStage("visiondrop", dominant + contextual, partial(shorten_in_tower, dominant, contextual))
    layer_keeps = tuple((layer, kept + merged) for layer, (kept, merged) in zip(layers, llm_schedule))
    merged = tuple(merged for _, merged in llm_schedule)
    return (tower, *visiondrop_stages(layer_keeps, merged, args.visiondrop_merge_order, request.positions or "repacked"))


METHOD = Method(
    name="visiondrop",
    title="VisionDrop (Xu et al., AAAI 2026)",
    summary="VisionZip's stage in the tower, then stages inside the LLM (a quarter, a half and three quarters of the "
            "depth, as its code's 8/16/24 of 32). Each scores the image tokens present by the attention they receive "
            "from the image's tokens in the next layer (that layer's norm, projections and rotary embedding on the "
            "current hidden states; causal, softmax over the whole sequence; mean over heads and image queries), keeps "
            "the top `dominant` and merges the rest into `contextual` tokens as VisionZip does (metric: that layer's "
            "keys after the rotary embedding, averaged over heads), placed after the dominant ones as its code does",
    places=(VISION, IN_LLM),
    arguments=VisionDropArguments,
    budget="a schedule of dominant+contextual per stage; `keep=N` is its average over the layers (the published "
           "schedule scaled)",
    positions="contiguous then repacked",
    needs=(CLS_ATTENTION, "the next layer's attention from the image's tokens at each LLM stage"),
    refuses="towers without a CLS token (SigLIP); tiled images (its released LLM stages cover LLaVA-1.5's one view)",
    check=_check,
    plan=_plan,
    own_budget=("visiondrop_schedule",),
)


def visiondrop_stages(layer_keeps: tuple[tuple[int, int], ...], merged: tuple[int, ...], order: str = "end",
                      positions: str = "repacked") -> tuple[LayerStage, ...]:
    """VisionDrop's LLM stages at the given (layer, keep) pairs, `merged[i]` of stage i's keep merged (what its plan gives)."""
    return tuple(LayerStage("visiondrop", layer, keep, partial(choose_dominant_and_merge, count, order), positions=positions,
                            merges=count > 0)
                 for (layer, keep), count in zip(layer_keeps, merged))
