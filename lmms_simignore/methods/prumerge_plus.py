"""PruMerge+ (Shang et al., "LLaVA-PruMerge", arXiv 2403.15388): keep the patches the CLS token singles out, plus a
spatially spread sample, each merged with its most similar patches, in the vision tower.

As its authors' code does it (42Shawn/LLaVA-PruMerge, commit 097c041, `llava/model/multimodal_encoder/clip_encoder.py`
`token_prune_merge_advanced_plus`): in the tower's last layer (CLIP-L's layer 23, hooked on `q_proj`/`k_proj`), the CLS
query's attention over the tokens taken as one head over the full width (softmax(q·kᵀ/√D), projection biases included),
read on the patches. The *outlier share* is the fraction of patches whose attention is above Q3 + 1.5·IQR (linear
percentiles). The kept patches are the int(N·share) highest, then the patches 0, s, 2s, ... below N − 1 (s =
int(int(1/share) / 3)) not already kept. Each kept patch's feature-layer state (-2) gains the sum of its 32 most
key-similar other patches' states (cosine of the last layer's keys) weighted by their raw CLS attention, and one more
token, the attention-weighted sum of every patch not kept, follows them. The image is then [kept patches in that order
(by attention, then the spatial ones ascending), the extra token], projected, at contiguous positions.

Budgets: `keep=auto` is that adaptive count (each image its own, at most N + 1; refused on an image where its code
fails: no outlier, whose share 1/0 it divides by. Its other failure, a stride of 0 for a ratio above 1/3, belongs to its
fixed-ratio path: an outlier share stays below about a quarter). `keep=N` is the fixed budget as EffiVLM-Bench enforces it
(`token_prune_merge_advanced_prumerge_plus`): of the N − 1 patches chosen, max(1, int(N_patches·share)) by attention
(all N − 1 when they are fewer), the rest from the patches 0, t, 2t, ... (t = max(1, int(N_patches / (N − 1)))) not
already chosen, in order; here N counts the extra token, so the LLM sees N tokens (EffiVLM-Bench's budget counts the
chosen ones only and passes one token more). Ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.base import (CLS_TOKEN, PATCHES_ALONE, VISION, Method, PipelineContext, StageRequest,
                                         VisionStage, require_keep_or_ignore)
from lmms_simignore.methods.selection import descending_order

MERGED_NEIGHBOURS = 32  # its code's topk(cos_sim_matrix, k=32)
FENCE = 1.5  # Tukey's outlier fence: above Q3 + 1.5 IQR


def outlier_share(attention: torch.Tensor) -> torch.Tensor:
    """(I, N) attention -> (I,) float64 the fraction of each image's N values above Q3 + 1.5·IQR (linear percentiles on
    float32, as numpy's default; the count divided by N in double precision, as its code's Python division)."""
    values = attention.float()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device), dim=1)  # (I,), (I,)
    return (values > (q3 + FENCE * (q3 - q1))[:, None]).sum(dim=1).double() / values.shape[1]


def spread_not_in(start_stop_step: tuple[int, int, int], taken: torch.Tensor) -> torch.Tensor:
    """The indices range(start, stop, step) that are not in `taken`, ascending."""
    spread = torch.arange(*start_stop_step, device=taken.device)
    return spread[~torch.isin(spread, taken)]


def adaptive_indices(attention: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s own choice on one image's (N,) patch attention: the int(N·share) highest, then every s-th patch below
    N − 1 (s = int(int(1/share) / 3)) not among them. Raises where its code fails (a share of 0)."""
    tokens = attention.shape[0]
    share = float(outlier_share(attention[None])[0])
    if share == 0:
        raise ValueError("prumerge_plus keep=auto: no patch's CLS attention is an outlier (above Q3 + 1.5 IQR) on this "
                         "image, and its code divides by that share (1/0); use a fixed budget, keep=N")
    stride = int(int(1 / share) / 3)  # >= 1: above Q3 + 1.5 IQR lie at most about a quarter of the values
    top = descending_order(attention)[: int(tokens * share)]
    return torch.cat([top, spread_not_in((0, tokens - 1, stride), top)])


def fixed_indices(attention: torch.Tensor, chosen: int) -> torch.Tensor:
    """EffiVLM-Bench's fixed budget on one image's (N,) patch attention: `chosen` indices, max(1, int(N·share)) highest
    first (all `chosen` when they are fewer), then every t-th patch (t = max(1, int(N / chosen))) not among them."""
    tokens = attention.shape[0]
    by_attention = max(int(tokens * float(outlier_share(attention[None])[0])), 1)
    if chosen <= by_attention:
        return descending_order(attention)[:chosen]
    top = descending_order(attention)[:by_attention]
    return torch.cat([top, spread_not_in((0, tokens, max(1, tokens // chosen)), top)[: chosen - by_attention]])


def merge_into_kept(states: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """One image's tokens after PruMerge+: (K + 1, D).

    states: (N, D) the feature layer's patch states; keys: (N, d) the last layer's patch keys; attention: (N,) the
    patches' CLS attention; kept: (K,) indices in the order they are placed. Each kept patch's state + the sum of its 32
    most key-similar other patches' states (cosine), weighted by their attention; then the attention-weighted sum of
    the patches not kept.
    """
    tokens, width = states.shape
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit[kept] @ unit.T  # (K, N)
    similarity[torch.arange(len(kept), device=kept.device), kept] = float("-inf")  # a patch is not its own neighbour
    neighbours = descending_order(similarity)[:, : min(MERGED_NEIGHBOURS, tokens - 1)]  # (K, n)
    weights = attention[neighbours].to(states.dtype)[..., None]  # (K, n, 1)
    merged = states[kept] + (weights * states[neighbours]).sum(dim=1)
    rest = torch.ones(tokens, dtype=torch.bool, device=states.device)
    rest[kept] = False
    extra = (attention[rest].to(states.dtype)[:, None] * states[rest]).sum(dim=0, keepdim=True)
    return torch.cat([merged, extra])


def patch_quantities(view) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I, N, D) the feature layer's patch states, (I, N, d) the last layer's patch keys, (I, N) their CLS attention;
    view: `engine.views.TowerView` (a CLIP tower, its patches the image tokens)."""
    attention, keys = view.last_layer_single_head_cls_attention()  # (I, T), (I, T, d)
    first = view.first_image_token
    return view.image_token_states, keys[:, first:], attention[:, first:]


def shorten_fixed(chosen: int, view) -> torch.Tensor:
    """(I, chosen + 1, D) each image after PruMerge+ at a fixed budget."""
    states, keys, attention = patch_quantities(view)
    return torch.stack([merge_into_kept(s, k, a, fixed_indices(a, chosen)) for s, k, a in zip(states, keys, attention)])


def shorten_adaptive(view) -> tuple[torch.Tensor, torch.Tensor]:
    """((I, K_max, D), (I,) lengths) each image after PruMerge+ with its own adaptive count (+ the extra token): at
    most N + 1 tokens, one more than the image had, where the spread sample takes every patch the outliers left."""
    states, keys, attention = patch_quantities(view)
    images = [merge_into_kept(s, k, a, adaptive_indices(a)) for s, k, a in zip(states, keys, attention)]
    lengths = torch.tensor([len(image) for image in images], device=states.device)  # at most N + 1 (the extra token)
    padded = states.new_zeros(len(images), int(lengths.max()) if images else 0, states.shape[-1])
    for row, image in enumerate(images):
        padded[row, : len(image)] = image
    return padded, lengths


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruMergePlusArguments:
    """None of its own: `keep=auto` (its adaptive count) or `keep=N` (a fixed budget)."""


TILES_REFUSAL = ("its authors' code is LLaVA-1.5's single view (EffiVLM-Bench's OneVision version averages the outlier "
                 "share over the views of SigLIP: another rule, not built)")


def _check(args: PruMergePlusArguments, context: PipelineContext) -> None:
    budget = require_keep_or_ignore("prumerge_plus", context, alternative=", or keep=auto (its adaptive count)",
                                    adaptive=True)
    if budget.adaptive and context.pipeline != ("prumerge_plus",):
        raise ValueError(f"keep=auto (each image its own number of tokens) needs reduction=prumerge_plus alone, got "
                         f"reduction={'+'.join(context.pipeline)}")


def _plan(args: PruMergePlusArguments, request: StageRequest) -> tuple[VisionStage]:
    if request.budget.adaptive:
        return (VisionStage("prumerge_plus", request.image_tokens, shorten_adaptive, views_refusal=TILES_REFUSAL,
                            adaptive=True),)
    keep = request.budget.count(request.image_tokens)
    if not 2 <= keep <= request.image_tokens:
        raise ValueError(f"prumerge_plus keeps {keep} tokens per image; between 2 (a patch and the merged rest) and the "
                         f"model's {request.image_tokens}")
    return (VisionStage("prumerge_plus", keep, partial(shorten_fixed, keep - 1), views_refusal=TILES_REFUSAL),)


METHOD = Method(
    name="prumerge_plus",
    title="PruMerge+ (Shang et al., arXiv 2403.15388)",
    summary="in the vision tower: the patches whose CLS attention (the last layer, one head over the full width) is an "
            "outlier (above Q3 + 1.5 IQR), plus a spatially spread sample, each merged with its 32 most key-similar "
            "patches weighted by their CLS attention, then one token summing the patches not kept; placed by "
            "attention, then the spread ones, then that token, at contiguous positions, as its LLaVA code feeds them",
    places=(VISION,),
    arguments=PruMergePlusArguments,
    budget="`keep=auto`: its adaptive count per image (+ 1 merged token), as its code; `keep=N` (or `ignore`): N tokens "
           "reach the LLM, N − 1 chosen as EffiVLM-Bench enforces a budget (outliers first, then a uniform fill) + the "
           "merged one; required",
    positions="contiguous",
    needs=(CLS_TOKEN, PATCHES_ALONE, "the CLS query and the keys of the tower's last layer"),
    refuses="towers without a CLS token (SigLIP); tiled images (its code is LLaVA-1.5's); keep=auto on an image where "
            "its code fails (no outlier: it divides by the share)",
    check=_check,
    plan=_plan,
    adaptive_budget=True,
)
