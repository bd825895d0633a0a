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
This module holds the pure tensor function and its declaration; `engine` computes the key norms and hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.arguments import argument, check_count_or_fraction, check_int, check_stage_layers, resolve_count
from lmms_simignore.methods.base import IN_LLM, LayerChoice, LayerStage, Method, PipelineContext, StageRequest, require_keep_or_ignore
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


def choose_least_duplicated(pivots: int, view) -> LayerChoice:
    """DART's stage: pivots and similarities from the layer before (its keys' L1 norms after the rotary embedding, its
    output through the final norm); the text pivots come from the visible text after each image. view:
    `engine.views.LayerView`."""
    image_rows, columns = view.image_rows, view.image_columns  # (I,), (I, M)
    key_norms = view.key_norms()  # (B, S)
    normed = view.normed_output()  # (B, S, D)
    length = normed.shape[1]
    after = torch.arange(length, device=normed.device)[None, :] > columns.amax(dim=1, keepdim=True)  # (I, S)
    text_mask = after & view.visible[image_rows] & ~view.is_image[image_rows]  # (I, S)
    kept = dart_choice(
        normed[image_rows[:, None], columns], key_norms[image_rows[:, None], columns], view.image_visible,
        normed[image_rows], key_norms[image_rows], text_mask, view.keep, pivots,
    )
    return LayerChoice(kept)


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DartArguments:
    dart_layer: int = argument(DEFAULT_LAYER, "DART prunes for layers ≥ `dart_layer`, from layer `dart_layer`−1's keys "
                               "and output (its LLaVA scripts' K = 2)")
    dart_pivots: int = argument(DEFAULT_PIVOTS, "pivot tokens per image, half image and half text (its LLaVA scripts' "
                                "4 + 4)")
    dart_keep: int | float | None = argument(None, "DART's budget when it is not the pipeline's first stage (count, or "
                                             "fraction of the model's image tokens); as the first stage, `keep`/`ignore`")

    def __post_init__(self) -> None:
        check_int("dart_layer", self.dart_layer, 1)
        check_int("dart_pivots", self.dart_pivots, 1)
        check_count_or_fraction("dart_keep", self.dart_keep)


def _check(args: DartArguments, context: PipelineContext) -> None:
    if args.dart_keep is None:
        require_keep_or_ignore("dart", context, alternative=", or dart_keep=")


def _plan(args: DartArguments, request: StageRequest) -> tuple[LayerStage]:
    check_stage_layers("dart_layer", (args.dart_layer,), request.num_layers, request.after_layer)
    tokens = request.image_tokens
    keep = resolve_count("dart_keep", args.dart_keep, tokens) if args.dart_keep is not None else request.budget.count(tokens)
    if keep > request.available:
        raise ValueError(f"dart keeps {keep} image tokens per image but only {request.available} reach it")
    return dart_stage(args.dart_layer, keep, args.dart_pivots, request.positions or "original")


METHOD = Method(
    name="dart",
    title="DART (Wen et al., 2025)",
    summary="inside the LLM, for layers ≥ `dart_layer`, from layer `dart_layer`−1: pivots by the largest L1 norm of "
            "their keys (after the rotary embedding), half among the image tokens and half among the text after the "
            "image; each pivot in turn keeps its share of the budget, the image tokens least cosine-similar to it (that "
            "layer's output through the final norm); the image pivots are kept too. Ours keeps exactly `keep` (DART's "
            "code keeps 4 + 8·⌊keep/8⌋, e.g. 196 for 192)",
    places=(IN_LLM,),
    arguments=DartArguments,
    budget="`keep`/`ignore` per image from `dart_layer` on (count or fraction of the model's image tokens), required; "
           "`dart_keep` when it follows another budgeted stage",
    positions="original",
    needs=("keys of layer K−1 (after the rotary embedding)", "hidden states of layer K−1 through the final norm"),
    check=_check,
    plan=_plan,
    own_budget=("dart_keep",),
)


def dart_stage(layer: int, keep: int, pivots: int = DEFAULT_PIVOTS, positions: str = "original") -> tuple[LayerStage]:
    """DART's stage at `layer` keeping `keep` image tokens per image (what its plan gives)."""
    return (LayerStage("dart", layer, keep, partial(choose_least_duplicated, pivots), positions=positions),)
