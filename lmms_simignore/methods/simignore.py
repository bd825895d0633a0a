"""Simignore: score image tokens by their embedding similarity to text tokens (Zeng et al., AAAI 2025).

Each image token gets the similarity to its *most similar* text token; the least similar image tokens
are the ones to ignore. Distances are turned into scores by negation, so "most similar" always means
"highest score" (the published code's commented-out distance variants kept the most distant tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
