"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse image tokens, before the LLM.

As its authors' code does it (vbdi/divprune, commit 799e2d9, `LLaVA/llava/model/llava_arch.py`: `DivPrune` and the end
of `prepare_inputs_labels_for_multimodal`): on each image's projector outputs, the distance of two tokens is 1 - their
cosine similarity; the first token kept is the one whose nearest other token is farthest; then, until K are kept, the
token whose distance to the nearest kept one is largest (ties: the lowest index). The kept tokens stay in their
original order and the LLM sees them at contiguous positions (its LLaVA code drops them from the sequence and passes no
position ids). No attention is read, so it runs under any attention backend.

Its code takes K = round(ratio x N) with Python's round (half to even) from `SUBSET_RATIO` (0.098 by default); here the
budget is `keep`/`ignore` per image as for every method (a fraction rounded half up: the two differ only at exact
halves). Its LLaVA-NeXT run ranks the whole image span, the row newlines included; here the newlines are never chosen
or dropped (they stay, and the kept image tokens close up around them). Where tokens are exact duplicates (a plain
image through a tower without absolute position embeddings: Qwen-VL's), every unchosen one ties at distance 0 with the
chosen ones and its code's `argmax` picks a chosen token again (feeding it twice); here the lowest-index unchosen one.
Its code has no Qwen-VL version, and contiguous positions are not defined on M-RoPE's: `divprune_positions=original` keeps each kept token at its own position, as
LightCompress's Qwen2.5-VL DivPrune keeps the original M-RoPE ids (the only positions Qwen-VL takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.arguments import argument, check_choice
from lmms_simignore.methods.base import PRE_LLM, Method, PipelineContext, PreLLMStage, StageRequest, require_keep_or_ignore

POSITION_RULES = ("contiguous", "original")


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(I, N, D) -> (I, N, N) float32: 1 - the cosine similarity of every pair of an image's tokens."""
    normalised = F.normalize(features.float(), dim=-1)
    return 1.0 - normalised @ normalised.transpose(1, 2)


def most_diverse(distances: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy max-min choice of `keep` of N tokens per image, in the order chosen.

    distances: (I, N, N) symmetric pairwise distances. The first is the token whose nearest other token is farthest
    (each token's second-smallest distance, the smallest being its own); each next one maximises its distance to the
    nearest already chosen. Returns: (I, keep) int64.
    """
    images, tokens, _ = distances.shape
    if not 1 <= keep <= tokens:
        raise ValueError(f"divprune keeps between 1 and the image's {tokens} tokens, got {keep}")
    rows = torch.arange(images, device=distances.device)
    nearest_other = distances.topk(min(2, tokens), dim=1, largest=False).values[:, -1]  # (I, N)
    chosen = [nearest_other.argmax(dim=1)]  # (I,)
    to_chosen = distances[rows, chosen[0]].clone()  # (I, N) each token's distance to the nearest chosen one
    for _ in range(keep - 1):
        to_chosen[rows, chosen[-1]] = float("-inf")  # never again, even where exact duplicates tie with it at 0
        chosen.append(to_chosen.argmax(dim=1))
        to_chosen = torch.minimum(to_chosen, distances[rows, chosen[-1]])
    return torch.stack(chosen, dim=1)


def divprune_indices(features: torch.Tensor, keep: int) -> torch.Tensor:
    """(I, N, D) projector outputs -> (I, keep) indices of the kept tokens, ascending."""
    return most_diverse(cosine_distances(features), keep).sort(dim=1).values


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DivPruneArguments:
    """`keep`/`ignore` give K."""

    divprune_positions: str = argument(
        "contiguous", "the kept tokens' positions: `contiguous` (counted anew, as its LLaVA code feeds them) or `original` "
                      "(each its own, as LightCompress's Qwen2.5-VL DivPrune; what Qwen-VL's M-RoPE takes)",
        " | ".join(POSITION_RULES))

    def __post_init__(self) -> None:
        check_choice("divprune_positions", self.divprune_positions, POSITION_RULES)


def _check(args: DivPruneArguments, context: PipelineContext) -> None:
    require_keep_or_ignore("divprune", context)


def _plan(args: DivPruneArguments, request: StageRequest) -> tuple[PreLLMStage]:
    keep = request.budget.count(request.image_tokens)
    if not 1 <= keep <= request.available:
        raise ValueError(f"divprune keeps {keep} image tokens per image; between 1 and the {request.available} that reach "
                         f"it")
    return (PreLLMStage("divprune", keep, partial(_choose, keep), positions=args.divprune_positions),)


def _choose(keep: int, view) -> torch.Tensor:
    """(I, keep) indices; view: `engine.views.ImageTokensView`."""
    return divprune_indices(view.image_features, keep)


METHOD = Method(
    name="divprune",
    title="DivPrune (Alvar et al., CVPR 2025)",
    summary="before the LLM, on the projector outputs: keeps the K most diverse image tokens by greedy max-min "
            "selection on 1 − cosine (first the token whose nearest other is farthest, then each time the token "
            "farthest from the nearest kept one); kept tokens in order, at contiguous positions, as its LLaVA code "
            "feeds them",
    places=(PRE_LLM,),
    arguments=DivPruneArguments,
    budget="`keep`/`ignore` per image (count or fraction of the model's image tokens), required",
    positions="contiguous",
    needs=("projected image tokens",),
    refuses="contiguous positions on multimodal rotary ones (Qwen-VL: pass divprune_positions=original)",
    check=_check,
    plan=_plan,
)
