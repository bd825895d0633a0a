"""Simignore: score image tokens by their embedding similarity to text tokens (Zeng et al., AAAI 2025).

Each image token gets the similarity to its *most similar* text token; the least similar image tokens
are the ones to ignore. Distances are turned into scores by negation, so "most similar" always means
"highest score" (the published code's commented-out distance variants kept the most distant tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from lmms_simignore.methods.arguments import argument, check_choice, check_int, is_bool
from lmms_simignore.methods.base import PRE_LLM, Method, PipelineContext, PreLLMStage, StageRequest, require_keep_or_ignore
from lmms_simignore.methods.random_tokens import random_scores
from lmms_simignore.methods.selection import ORDERS, select_by_order, within_margin_of_best

SIMILARITIES = ("cosine", "euclidean", "manhattan")


def pairwise_similarity(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """Similarity of every image token to every valid text token of the same row.

    image_embeds: (B, N, D) image features in the LLM input space (after the projector).
    text_embeds:  (B, T, D) LLM input embeddings of the text tokens.
    text_mask:    (B, T) bool, True on real text tokens (each row needs at least one).
    Returns: (B, N, T) float32, higher = more similar (cosine, or minus the L2 / L1 distance); -inf on padding.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if image_embeds.dim() != 3 or text_embeds.dim() != 3 or image_embeds.shape[::2] != text_embeds.shape[::2]:
        raise ValueError(
            f"expected image (B, N, D) and text (B, T, D) with equal B and D, "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if text_mask.shape != text_embeds.shape[:2]:
        raise ValueError(f"text_mask must be {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}")
    empty_rows = (~text_mask.bool()).all(dim=1)
    if empty_rows.any():
        raise ValueError(f"rows {empty_rows.nonzero().flatten().tolist()} have no text token to compare with")

    image = image_embeds.float()
    text = text_embeds.float()
    if similarity == "cosine":
        pairwise = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).transpose(1, 2)  # (B, N, T)
    else:
        p = 2.0 if similarity == "euclidean" else 1.0
        pairwise = -torch.cdist(image, text, p=p)  # (B, N, T)
    return pairwise.masked_fill(~text_mask.bool()[:, None, :], float("-inf"))


def similarity_scores(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """Per image token, its best similarity over the valid text tokens of the same row: (B, N) float32.

    Shapes as `pairwise_similarity`. Higher = more similar.
    """
    return pairwise_similarity(image_embeds, text_embeds, text_mask, similarity).amax(dim=-1)  # (B, N)


def walk_scores(pairwise: torch.Tensor, start: int = 0, step: int = 1) -> torch.Tensor:
    """Rank image tokens the way the published code did: walk the sorted (image, text) pairs.

    The published loop sorts all N*T similarities in descending order, visits entries start, start+step, ...
    and collects image tokens in order of first visit (7B run: start=1, step=1, which skips the single best
    pair; 13B run: start=0, step=2). With start=0, step=1 this equals ranking by best similarity.
    Tokens the walk never reaches come after all reached ones, ordered by their best similarity.

    pairwise: (B, N, T) from `pairwise_similarity` (-inf on text padding, which is never visited).
    Returns: (B, N) float32 scores, higher = visited earlier.
    """
    batch, tokens, texts = pairwise.shape
    flat = pairwise.flatten(1)  # (B, N*T)
    ranking = torch.sort(flat, dim=1, descending=True, stable=True).indices  # (B, N*T)
    visited = ranking[:, start::step]  # (B, W)
    visit_order = torch.arange(visited.shape[1], device=pairwise.device).expand(batch, -1)  # (B, W)
    never = visited.shape[1] + tokens  # larger than any visit order
    visit_order = visit_order.masked_fill(torch.gather(flat, 1, visited) == float("-inf"), never)
    first_visit = torch.full((batch, tokens), never, dtype=torch.long, device=pairwise.device)
    first_visit = first_visit.scatter_reduce(1, visited // texts, visit_order, reduce="amin")  # (B, N)
    best = pairwise.amax(dim=-1)  # (B, N)
    by_best = torch.sort(best, dim=1, descending=True, stable=True).indices.argsort(dim=1)  # (B, N) rank
    key = torch.where(first_visit < never, first_visit, never + by_best)  # (B, N), lower = earlier
    return -key.float()


# -- declaration -----------------------------------------------------------------------------------------------------
TEXT_SOURCES = ("options", "options_lettered", "prompt")
AUTO_MARGIN = 0.2  # keep=auto: within 0.2 cosine similarity of the image's best token


@dataclass(frozen=True)
class SimignoreArguments:
    similarity: str = argument("cosine", "the score: best similarity to any text token; distances keep the *closest* "
                               "tokens (the published code's commented-out distances kept the farthest)",
                               " | ".join(SIMILARITIES))
    text: str = argument("options", "compare with the doc's answer options (`choices`/`options`) joined by spaces (the "
                         "published 7B run), as `Options: (A) x (B) y` (the published 13B run), or with the user's prompt "
                         "text (the paper's prose). Docs without options fall back to `prompt`, logged once per task",
                         " | ".join(TEXT_SOURCES))
    text_bos: bool = argument(False, "also compare with the BOS embedding (the published 7B run)")
    order: str = argument("unimportant", "which part of the similarity ranking is ignored: the least similar (the "
                          "method), the most similar, the middle band (the top ⌈K/2⌉ and bottom ⌊K/2⌋ kept) or random",
                          " | ".join(ORDERS))
    simignore_start: int = argument(0, "the published walk over the sorted (image, text) pairs: 7B start 1 (skips the "
                                    "best pair); 0 and step 1 rank each token by its best similarity")
    simignore_step: int = argument(1, "the walk's step: 13B takes every other pair (2)")
    auto_margin: float | None = argument(None, "`keep=auto`: keep every image token whose score (best cosine similarity "
                                         "to the text) is within this margin of the image's best (default 0.2)")

    def __post_init__(self) -> None:
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("text", self.text, TEXT_SOURCES)
        check_choice("order", self.order, ORDERS)
        if not isinstance(self.text_bos, bool):
            raise ValueError(f"text_bos must be true or false, got {self.text_bos!r}")
        check_int("simignore_start", self.simignore_start, 0)
        check_int("simignore_step", self.simignore_step, 1)
        margin = self.auto_margin
        if margin is not None and (is_bool(margin) or not isinstance(margin, (int, float)) or margin < 0):
            raise ValueError(f"auto_margin must be a non-negative number (a cosine-similarity margin), got {margin!r}")

    @property
    def uses_walk(self) -> bool:
        """Whether the ranking is the published walk over sorted pairs instead of each token's best similarity."""
        return (self.simignore_start, self.simignore_step) != (0, 1)


def _check(args: SimignoreArguments, context: PipelineContext) -> None:
    budget = require_keep_or_ignore("simignore", context, adaptive=True)
    if budget.adaptive:
        if context.pipeline != ("simignore",):
            raise ValueError(f"keep=auto (each image its own number, from its similarity scores) needs reduction=simignore "
                             f"alone, got reduction={'+'.join(context.pipeline)}")
        if args.order != "unimportant" or args.uses_walk:
            raise ValueError("keep=auto keeps the tokens closest to the text: it takes neither order= nor the published walk")
    elif args.auto_margin is not None:
        raise ValueError(f"auto_margin applies to keep=auto only, not keep={budget.keep}")


def _plan(args: SimignoreArguments, request: StageRequest) -> tuple[PreLLMStage]:
    budget = request.budget
    if budget.adaptive:
        margin = AUTO_MARGIN if args.auto_margin is None else args.auto_margin
        return (PreLLMStage("simignore", request.available, partial(_choose_adaptive, args, margin), adaptive=True),)
    keep = budget.count(request.image_tokens)
    if keep > request.available:
        raise ValueError(f"simignore keeps {keep} image tokens per image but only {request.available} reach it")
    return (PreLLMStage("simignore", keep, partial(_choose, args, keep)),)


def _choose(args: SimignoreArguments, keep: int, view) -> torch.Tensor:
    """(I, keep) indices of each image's kept tokens; view: `engine.views.ImageTokensView`."""
    features = view.image_features  # (I, N, D)
    images, tokens = features.shape[:2]
    if images == 0 or keep == tokens:
        return torch.arange(tokens, device=features.device).expand(images, -1)
    if args.order == "random":
        scores = random_scores(view.image_seeds, tokens, features.device)  # (I, N)
    else:
        text, text_mask = view.text_embeddings(with_bos=args.text_bos)  # (I, T, D), (I, T)
        pairwise = pairwise_similarity(features, text, text_mask, args.similarity)  # (I, N, T)
        scores = walk_scores(pairwise, args.simignore_start, args.simignore_step) if args.uses_walk else pairwise.amax(dim=-1)
    return select_by_order(scores, keep, args.order)


def _choose_adaptive(args: SimignoreArguments, margin: float, view) -> torch.Tensor:
    """(I, N) bool: each image's tokens within `margin` of its best score."""
    features = view.image_features
    if features.shape[0] == 0:
        return torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
    text, text_mask = view.text_embeddings(with_bos=args.text_bos)
    return within_margin_of_best(pairwise_similarity(features, text, text_mask, args.similarity).amax(dim=-1), margin)


METHOD = Method(
    name="simignore",
    title="Simignore (Zeng et al., AAAI 2025)",
    summary="before the LLM, scores each image token (after the projector) by its best similarity to the text tokens' "
            "input embeddings and keeps the top K per image",
    places=(PRE_LLM,),
    arguments=SimignoreArguments,
    budget="`keep`/`ignore` per image (count, fraction of the model's image tokens, or `keep=auto`: each image its own "
           "number), required",
    positions="original",
    needs=("projected image tokens", "text embeddings"),
    check=_check,
    plan=_plan,
    text_style=lambda args: args.text,
    adaptive_budget=True,
)
