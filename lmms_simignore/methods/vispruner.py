"""VisPruner (Zhang et al., ICCV 2025): keep the important image tokens and the most diverse of the rest, chosen in the
vision tower by visual cues alone.

As its authors' code does it (Theia-4869/VisPruner, commit aefa01a, `llava/model/llava_arch.py` `encode_images` and
`llava/model/multimodal_encoder/{clip,siglip}_encoder.py`): of a budget of T tokens per image, T_imp = int(T x
`important_ratio`) are *important*: the image tokens with the highest attention in the tower, averaged over heads. On a
CLIP tower that is the CLS token's row in the feature layer (-2) over the patches; on a SigLIP tower (no CLS token) the
attention each token receives in the tower's last layer, averaged over queries. The rest, in descending attention, are
thinned for *diversity* until T - T_imp remain: each round splits them alternately in two (even and odd places), scores
each even-place token by its highest cosine similarity to an odd-place one (the feature layer's states), drops the
min(8, surplus) highest-scoring even-place tokens and lines up the kept even-place ones (descending score) before the
odd-place ones for the next round. The kept tokens stay in their original order, projected, at contiguous positions
(its LLaVA code drops the others from the sequence and passes no position ids).

On LLaVA-NeXT (its `prepare_inputs_labels_for_multimodal`, `spatial_unpad`): T tokens in each view, the base view's
and each crop's chosen alone as above; each crop's kept set, a mask over its patches, is stitched with the crops' grid
and unpadded as the features are, each newline kept; the image's kept tokens, in order, at contiguous positions.

Ties (attention, similarity) go to the lower index here (its code sorts unstably). Its code fails on a shape mismatch
where a round meets an odd number of remaining tokens or would drop more than the even places hold (small budgets: at
T = 8 of 576); here the even places then hold one token more, and a round drops at most all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.arguments import argument, check_fraction
from lmms_simignore.methods.base import (PATCH_ATTENTION, PATCHES_ALONE, VISION, Method, PipelineContext, StageRequest,
                                         VisionStage, require_keep_or_ignore)
from lmms_simignore.methods.selection import descending_order

DROPPED_PER_ROUND = 8  # its code's cap on the duplicates removed in one round


def thin_for_diversity(normalised: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """VisPruner's iterative removal of duplicates: `residual` (I, R) token indices, in order, thinned to `diverse`.

    normalised: (I, N, D) unit-length token states. Each round: even places a = residual[:, 0::2], odd places b =
    residual[:, 1::2]; each a-token's score is its highest cosine similarity to a b-token; the min(8, R - diverse)
    highest-scoring a-tokens go; the next order is the kept a-tokens (descending score) then the b-tokens.
    Returns: (I, diverse) indices (in the order the last round left them).
    """
    rows = torch.arange(residual.shape[0], device=residual.device)[:, None]
    while diverse > 0 and residual.shape[1] > diverse:
        dropped = min(DROPPED_PER_ROUND, residual.shape[1] - diverse)
        even, odd = residual[:, 0::2], residual[:, 1::2]
        scores = (normalised[rows, even] @ normalised[rows, odd].transpose(1, 2)).amax(dim=-1)  # (I, ceil(R/2))
        survivors = descending_order(scores)[:, dropped:]  # the `dropped` highest-scoring go
        residual = torch.cat([even.gather(1, survivors), odd], dim=1)
    return residual if diverse > 0 else residual[:, :0]


def vispruner_indices(states: torch.Tensor, attention: torch.Tensor, keep: int, important_ratio: float) -> torch.Tensor:
    """(I, keep) indices (ascending) of the image tokens VisPruner keeps.

    states: (I, N, D) the feature layer's states of the N image tokens; attention: (I, N) their attention in the tower,
    averaged over heads; keep: T; important_ratio: the share of T chosen by attention (int(T x ratio) tokens).
    """
    tokens = states.shape[1]
    if not 1 <= keep <= tokens:
        raise ValueError(f"vispruner keeps between 1 and the image's {tokens} tokens, got {keep}")
    important = int(keep * important_ratio)
    order = descending_order(attention)  # (I, N)
    normalised = F.normalize(states.float(), dim=-1)
    diverse = thin_for_diversity(normalised, order[:, important:], keep - important)
    return torch.cat([order[:, :important], diverse], dim=1).sort(dim=1).values


def image_token_attention(view) -> torch.Tensor:
    """(I, N) the attention VisPruner ranks the image tokens by, averaged over heads; view: `engine.views.TowerView`.
    CLIP: the CLS row of the feature layer; SigLIP: what each token receives in the last layer (mean over queries)."""
    first = view.first_image_token
    attention = view.feature_attention()[0] if view.cls_token else view.last_layer_attention_received()  # (I, H, T)
    return attention[:, :, first:].mean(dim=1)


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisPrunerArguments:
    important_ratio: float = argument(0.5, "the share of the budget chosen by attention (int(T × ratio) important "
                                      "tokens), the rest for diversity; its scripts' default (its README also runs "
                                      "0.75)")

    def __post_init__(self) -> None:
        check_fraction("important_ratio", self.important_ratio, "(the share of the budget chosen by attention)")


def _check(args: VisPrunerArguments, context: PipelineContext) -> None:
    require_keep_or_ignore("vispruner", context)


def _plan(args: VisPrunerArguments, request: StageRequest) -> tuple[VisionStage]:
    keep = request.budget.count(request.image_tokens)
    if not 1 <= keep <= request.image_tokens:
        raise ValueError(f"vispruner keeps {keep} image tokens per image; between 1 and the model's {request.image_tokens}")
    per_view = keep // request.views  # a tiled image: its code's T in each view (32 x 5 = 160 on LLaVA-NeXT)
    if per_view < 1:
        raise ValueError(f"vispruner keeps T tokens in each view of a tiled image: keep={keep} is less than this image's "
                         f"{request.views} views (the base view and its crops)")
    return (VisionStage("vispruner", keep if request.views == 1 else per_view * request.views,
                        partial(shorten_in_tower, keep, args.important_ratio),
                        select_views=partial(select_in_views, per_view, args.important_ratio)),)


def shorten_in_tower(keep: int, important_ratio: float, view) -> torch.Tensor:
    """(I, keep, D) the kept image tokens' feature-layer states, in order; view: `engine.views.TowerView`."""
    states = view.image_token_states
    kept = vispruner_indices(states, image_token_attention(view), keep, important_ratio)
    return states.gather(1, kept[..., None].expand(-1, -1, states.shape[-1]))


def select_in_views(keep: int, important_ratio: float, view) -> torch.Tensor:
    """(V, P) bool: the patches VisPruner keeps in each view of tiled images (LLaVA-NeXT's base view and crops), `keep`
    (T) in each, chosen in each view alone as in one image (its LLaVA-NeXT code); view: `engine.views.TowerView`."""
    states = view.image_token_states
    if keep > states.shape[1]:
        raise ValueError(f"vispruner keeps {keep} tokens in each view, more than a view's {states.shape[1]} patches")
    kept = vispruner_indices(states, image_token_attention(view), keep, important_ratio)
    return torch.zeros(states.shape[:2], dtype=torch.bool, device=states.device).scatter_(1, kept, True)


METHOD = Method(
    name="vispruner",
    title="VisPruner (Zhang et al., ICCV 2025)",
    summary="in the vision tower, by visual cues alone: of T tokens per image, int(T × important_ratio) *important* "
            "ones by the tower's attention (CLIP: the CLS row of the feature layer; SigLIP: the attention received in "
            "the last layer), the rest thinned for *diversity* by its rounds of even/odd matching (cosine of the "
            "feature layer's states, up to 8 duplicates dropped a round); kept tokens in order, at contiguous "
            "positions, as its LLaVA code feeds them; on LLaVA-NeXT each view (base view, crops) on its own, the crops' "
            "kept patches carried through the unpadding, every newline kept, as its LLaVA-NeXT code",
    places=(VISION,),
    arguments=VisPrunerArguments,
    budget="`keep`/`ignore` per image (count or fraction of the model's image tokens), required: the final count T; on "
           "LLaVA-NeXT T in each view, the image's budget divided evenly among its views as its code's 32 × 5 = 160 "
           "(the crops' kept patches in their padding leave with the unpadding, so at most that many reach the LLM)",
    positions="contiguous",
    needs=(PATCH_ATTENTION, PATCHES_ALONE, "the feature layer's states"),
    refuses="OneVision (its anyres_max shrinks large grids, which the views' masks cannot follow; its code refuses "
            "that aspect setting); InternVL and Qwen-VL (no version by its authors); a CLIP tower whose CLS token is "
            "itself an image token (vision_feature_select_strategy=full)",
    check=_check,
    plan=_plan,
)
