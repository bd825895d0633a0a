"""Random token choice: the plain baseline, and Simignore's `order=random` ablation."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import partial

import torch

from lmms_simignore.methods.base import PRE_LLM, Method, PipelineContext, PreLLMStage, StageRequest, require_keep_or_ignore
from lmms_simignore.methods.selection import select_top_k


def sample_seed(seed: int, task: str, doc_id: int, image_index: int) -> int:
    """A seed that depends only on the run's seed and which image it is (not on batching or process rank)."""
    return zlib.crc32(f"{seed}/{task}/{doc_id}/{image_index}".encode())


def random_scores(seeds: list[int], tokens_per_image: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(I, N) uniform scores, row i drawn from its own generator seeded with `seeds[i]`."""
    rows = [torch.rand(tokens_per_image, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    if not rows:
        return torch.zeros(0, tokens_per_image, device=device)
    return torch.stack(rows).to(device)


# -- declaration -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomArguments:
    """None of its own: `seed` (a common setting) makes each image's choice."""


def _check(args: RandomArguments, context: PipelineContext) -> None:
    require_keep_or_ignore("random", context)


def _plan(args: RandomArguments, request: StageRequest) -> tuple[PreLLMStage]:
    keep = request.budget.count(request.image_tokens)
    if keep > request.available:
        raise ValueError(f"random keeps {keep} image tokens per image but only {request.available} reach it")
    return (PreLLMStage("random", keep, partial(_choose, keep)),)


def _choose(keep: int, view) -> torch.Tensor:
    """(I, keep) indices: the top `keep` of each image's own uniform draws (`view.image_seeds`)."""
    features = view.image_features  # (I, N, D)
    images, tokens = features.shape[:2]
    if images == 0 or keep == tokens:
        return torch.arange(tokens, device=features.device).expand(images, -1)
    return select_top_k(random_scores(view.image_seeds, tokens, features.device), keep)


METHOD = Method(
    name="random",
    title="random selection (the plain baseline)",
    summary="before the LLM, keeps K random image tokens per image",
    places=(PRE_LLM,),
    arguments=RandomArguments,
    budget="`keep`/`ignore` per image (count or fraction of the model's image tokens), required",
    positions="original",
    needs=("per-image seeds",),
    check=_check,
    plan=_plan,
)
