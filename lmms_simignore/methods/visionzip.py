"""VisionZip (Yang et al., CVPR 2025): reduce the image on the vision side, before the projector.

In the vision tower's feature layer (LLaVA-1.5: layer -2), the *dominant* tokens are the CLS token and the
patches the CLS token attends to most (attention summed over heads); the CLS token counts toward `dominant`.
The remaining patches are merged into `contextual` tokens: every (remaining // contextual)-th remaining token
is a target, each other remaining token joins the target whose key (averaged over heads, L2-normalised) is
most cosine-similar, and a contextual token is its target's hidden state plus the mean of the hidden states
that joined it. The image then is [dominant tokens in their original order, contextual tokens]: a shorter
image, which the LLM sees at contiguous positions, as VisionZip's own LLaVA code feeds it.

This module holds the pure tensor functions; `engine` recomputes the tower's attention and keys and
places the result in the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.arguments import argument, check_count, check_int
from lmms_simignore.methods.base import CLS_ATTENTION, VISION, Budget, Method, PipelineContext, StageRequest, VisionStage
from lmms_simignore.methods.selection import select_top_k

# VisionZip's LLaVA-1.5 budgets (dominant, contextual): 192 -> (162, 30), 128 -> (108, 20), 64 -> (54, 10),
# i.e. 5/32 of the retained tokens are contextual.
CONTEXTUAL_SHARE = 5 / 32


def split_budget(retained: int) -> tuple[int, int]:
    """(dominant, contextual) for `retained` tokens per image, in VisionZip's published proportion
    (64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30); at least the CLS token is dominant."""
    if retained < 1:
        raise ValueError(f"visionzip keeps at least the CLS token: retained tokens must be >= 1, got {retained}")
    contextual = min(int(retained * CONTEXTUAL_SHARE + 0.5), retained - 1)
    return retained - contextual, contextual


def dominant_indices(cls_attention: torch.Tensor, dominant: int) -> torch.Tensor:
    """The CLS token (index 0) and the `dominant - 1` patches with the highest CLS attention, ascending.

    cls_attention: (I, T) attention of the CLS query over the T tower tokens (CLS first), summed over heads.
    Ties go to the lower index. Returns: (I, dominant) int64.
    """
    if not 1 <= dominant <= cls_attention.shape[1]:
        raise ValueError(f"dominant must be in [1, {cls_attention.shape[1]}] (the CLS token and the patches), got {dominant}")
    scores = cls_attention.float().clone()
    scores[:, 0] = float("inf")  # the CLS token is always kept
    return select_top_k(scores, dominant)


def contextual_plan(keys: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of R remaining tokens become the `contextual` targets, and which target each other token joins.

    keys: (I, R, d) the remaining tokens' keys, averaged over heads. Targets are the tokens 0, s, 2s, ...
    (s = max(1, R // contextual)), the first `contextual` of them; every other token joins its most
    cosine-similar target (ties: the earlier target).
    Returns: targets (C,) indices into R, and assignment (I, R, C) one-hot (all zero on the targets' rows).
    """
    images, remaining, _ = keys.shape
    if not 0 <= contextual <= remaining:
        raise ValueError(f"contextual must be in [0, {remaining}] (the tokens left after the dominant ones), got {contextual}")
    targets = torch.arange(0, remaining, max(1, remaining // max(contextual, 1)), device=keys.device)[:contextual]  # (C,)
    normalised = F.normalize(keys.float(), dim=-1)  # (I, R, d)
    similarity = normalised @ normalised[:, targets].transpose(1, 2)  # (I, R, C)
    assignment = F.one_hot(similarity.argmax(dim=-1), contextual).float() if contextual else similarity  # (I, R, C)
    assignment[:, targets] = 0.0  # a target does not join another
    return targets, assignment


def merge_into_targets(hidden: torch.Tensor, targets: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Contextual tokens (I, C, D): each target's hidden state + the mean of the hidden states that joined it
    (+ 0 when none did). hidden: (I, R, D); targets, assignment: from `contextual_plan`."""
    counts = assignment.sum(dim=1).clamp(min=1)[..., None]  # (I, C, 1)
    joined = assignment.transpose(1, 2).to(hidden.dtype) @ hidden  # (I, C, D) sums of the joined hidden states
    return hidden[:, targets] + joined / counts.to(hidden.dtype)


def merge_contextual(hidden: torch.Tensor, keys: torch.Tensor, contextual: int) -> torch.Tensor:
    """Merge R remaining tokens into `contextual` tokens (`contextual_plan`, then `merge_into_targets`).

    hidden: (I, R, D) the remaining tokens' hidden states; keys: (I, R, d) their keys, averaged over heads.
    Returns: (I, contextual, D).
    """
    return merge_into_targets(hidden, *contextual_plan(keys, contextual))


def visionzip_tokens(
    hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """The image after VisionZip: dominant tokens (original order) then contextual tokens.

    hidden: (I, T, D) the feature layer's hidden states, CLS first; cls_attention: (I, T) the CLS row of that
    layer's attention, summed over heads; keys: (I, T, d) that layer's keys averaged over heads.
    Returns: (I, dominant + contextual, D).
    """
    return visionzip_tokens_and_dominant(hidden, cls_attention, keys, dominant, contextual)[0]


def visionzip_tokens_and_dominant(
    hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`visionzip_tokens`, and which tower tokens are the dominant ones: (I, dominant + contextual, D), (I, dominant)
    indices into T, ascending (the CLS token, 0, first)."""
    kept = dominant_indices(cls_attention, dominant)  # (I, dominant)
    images, tokens, _ = hidden.shape
    rest = torch.ones(images, tokens, dtype=torch.bool, device=hidden.device)
    rest[torch.arange(images, device=hidden.device)[:, None], kept] = False
    remaining = tokens - dominant
    rest_index = rest.nonzero()[:, 1].reshape(images, remaining)  # (I, R), ascending
    gather = rest_index[..., None]
    merged = merge_contextual(hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1])),
                              keys.gather(1, gather.expand(-1, -1, keys.shape[-1])), contextual)  # (I, C, D)
    dominant_hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))  # (I, dominant, D)
    return torch.cat([dominant_hidden, merged], dim=1), kept


def crops_in_raster_order(patches: torch.Tensor, crop_rows: int, crop_cols: int, side: int) -> torch.Tensor:
    """The order in which the patches of a grid of crops come when the crops are stitched into one
    (crop_rows * side) x (crop_cols * side) grid and read row by row.

    patches: (crop_rows * crop_cols, P) each crop's patch indices into its own side x side grid, crops row-major.
    Returns: (crop_rows * crop_cols * P,) a permutation of the flattened `patches`.
    """
    crop = torch.arange(patches.shape[0], device=patches.device)[:, None]  # (n, 1)
    row = (crop // crop_cols) * side + patches // side  # (n, P) row in the stitched grid
    column = (crop % crop_cols) * side + patches % side
    return torch.sort((row * crop_cols * side + column).flatten(), stable=True).indices


def tiled_image_tokens(views: torch.Tensor, dominant_index: torch.Tensor, dominant: int, crop_rows: int, crop_cols: int,
                       side: int) -> torch.Tensor:
    """One image's tokens as VisionZip's LLaVA-NeXT code packs its views (no unpadding, no newline tokens): the base
    view's tokens as they are (CLS, dominant patches, contextual), then the crops' dominant patches in raster order over
    the stitched grid of crops, then each crop's CLS token, then each crop's contextual tokens, crop by crop.

    views: (V, dominant + contextual, D) each view's tokens after `visionzip_tokens`, the base view first, then the
    crop_rows x crop_cols crops row-major; dominant_index: (V, dominant) which tower tokens are each view's dominant ones
    (CLS first). Returns: (V * (dominant + contextual), D).
    """
    crops = views[1:]  # (n, dominant + contextual, D)
    patches = crops[:, 1:dominant].flatten(0, 1)  # (n * (dominant - 1), D)
    order = crops_in_raster_order(dominant_index[1:, 1:] - 1, crop_rows, crop_cols, side)
    return torch.cat([views[0], patches[order], crops[:, 0], crops[:, dominant:].flatten(0, 1)])


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionZipArguments:
    dominant: int | None = argument(None, "VisionZip's budget per view of the tower instead of `keep` (an image is one "
                                    "view; LLaVA-NeXT's base view and crops are one each): the dominant tokens, the CLS "
                                    "token included (its LLaVA-1.5 settings: 54 / 108 / 162)")
    contextual: int | None = argument(None, "with `dominant`: the merged contextual tokens per view (its settings: "
                                      "10 / 20 / 30)")

    def __post_init__(self) -> None:
        if self.dominant is not None:
            check_int("dominant", self.dominant, 1)
        check_count("contextual", self.contextual)


def check_budget(method: str, args: VisionZipArguments, context: PipelineContext) -> None:
    """keep=N (split as VisionZip's 54 + 10 of 64) or dominant= and contextual=, never ignore."""
    given = {name: getattr(args, name) for name in ("dominant", "contextual") if getattr(args, name) is not None}
    budget = context.budget or Budget()
    if budget.ignore is not None or budget.adaptive:
        raise ValueError(f"reduction={'+'.join(context.pipeline)}: {method} is budgeted by keep=N (or dominant= and "
                         f"contextual=), not {budget.describe()}")
    if len(given) == 1 or (not given and budget.keep is None):
        raise ValueError(f"{method} needs either keep=N or both dominant= and contextual=; got keep={budget.keep}, "
                         f"dominant={args.dominant}, contextual={args.contextual}")


def vision_budget(args: VisionZipArguments, request: StageRequest) -> tuple[int, int]:
    """(dominant, contextual) tokens per view of the tower (each image is one view, except a tiled image's base view
    and crops, LLaVA-NeXT's: each view gets the image's budget divided evenly among its views, rounded down, as VisionZip
    gives each of its 5 views 108 + 20 of 640); together at most the image's tokens."""
    if args.dominant is not None:
        dominant, contextual = args.dominant, args.contextual
    else:
        retained = request.budget.count(request.image_tokens)
        if retained < request.views:
            raise ValueError(f"visionzip keeps at least the CLS token of each view: keep={retained} is less than this "
                             f"image's {request.views} views (the base view and its crops)")
        dominant, contextual = split_budget(retained // request.views)
    if (dominant + contextual) * request.views > request.image_tokens:
        views = f" in each of its {request.views} views" if request.views > 1 else ""
        raise ValueError(f"visionzip keeps dominant={dominant} + contextual={contextual} tokens per image{views}, more "
                         f"than the model's {request.image_tokens} image tokens")
    return dominant, contextual


def shorten_in_tower(dominant: int, contextual: int, view) -> torch.Tensor:
    """(I, dominant + contextual, D) tower tokens of each image; view: `engine.views.TowerView`."""
    cls_attention, keys = view.feature_attention()  # (I, H, T), (I, H, T, d)
    return visionzip_tokens(view.feature_states, cls_attention.sum(dim=1), keys.mean(dim=1), dominant, contextual)


def shorten_views_in_tower(dominant: int, contextual: int, view) -> list[torch.Tensor]:
    """Each tiled image's tokens, (V_i * (dominant + contextual), D) in the tower's space: every view shortened on its
    own, then packed as `tiled_image_tokens`; view: `engine.views.TowerView` with its `tiling`."""
    cls_attention, keys = view.feature_attention()  # (V, H, T), (V, H, T, d)
    tokens, kept = visionzip_tokens_and_dominant(view.feature_states, cls_attention.sum(dim=1), keys.mean(dim=1),
                                                 dominant, contextual)
    side = math.isqrt(view.feature_states.shape[1] - 1)  # patches along a view's side (the CLS token aside)
    return [tiled_image_tokens(tokens[image.views], kept[image.views], dominant, image.crop_rows, image.crop_cols, side)
            for image in view.tiling]


def _plan(args: VisionZipArguments, request: StageRequest) -> tuple[VisionStage]:
    dominant, contextual = vision_budget(args, request)
    return (VisionStage("visionzip", (dominant + contextual) * request.views, partial(shorten_in_tower, dominant, contextual),
                        partial(shorten_views_in_tower, dominant, contextual)),)


METHOD = Method(
    name="visionzip",
    title="VisionZip (Yang et al., CVPR 2025)",
    summary="in the vision tower, before the projector. In the feature layer (−2) the CLS token and the patches it "
            "attends to most (attention summed over heads) are *dominant*; the other patches are merged into "
            "*contextual* tokens (every (rest ÷ contextual)-th is a target, each other joins the target whose "
            "head-averaged key is most cosine-similar; a contextual token = target + mean of those that joined). The "
            "image becomes dominant (in order) + contextual tokens, a shorter image at contiguous positions, as "
            "VisionZip's LLaVA code feeds it; on LLaVA-NeXT each view (base view, crops) on its own, packed as its "
            "LLaVA-NeXT code packs them (base view, crops' dominant tokens in raster order over the stitched crops, "
            "crops' CLS, crops' contextual; no unpadding, no newlines)",
    places=(VISION,),
    arguments=VisionZipArguments,
    budget="`keep` per image (split as VisionZip's 64 = 54 + 10, i.e. 5/32 contextual; on LLaVA-NeXT divided evenly "
           "among the image's views: 640 = 5 × (108 + 20)) or `dominant` + `contextual` per view (the CLS token counts "
           "as dominant)",
    positions="contiguous",
    needs=(CLS_ATTENTION, "keys of the tower's feature layer"),
    refuses="towers without a CLS token (SigLIP: OneVision); InternVL (no version by its authors)",
    check=lambda args, context: check_budget("visionzip", args, context),
    plan=_plan,
    own_budget=("dominant", "contextual"),
)
