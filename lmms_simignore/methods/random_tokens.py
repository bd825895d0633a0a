"""Random token choice: the plain baseline, and Simignore's `order=random` ablation."""

from __future__ import annotations

import zlib

import torch


def sample_seed(seed: int, task: str, doc_id: int, image_index: int) -> int:
    """A seed that depends only on the run's seed and which image it is (not on batching or process rank)."""
    return zlib.crc32(f"{seed}/{task}/{doc_id}/{image_index}".encode())


def random_scores(seeds: list[int], tokens_per_image: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(I, N) uniform scores, row i drawn from its own generator seeded with `seeds[i]`."""
    rows = [torch.rand(tokens_per_image, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    if not rows:
        return torch.zeros(0, tokens_per_image, device=device)
    return torch.stack(rows).to(device)
