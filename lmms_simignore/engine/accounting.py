"""Token accounting: how many image tokens each decoder layer saw, per sample, and their summaries."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TokenAccounting:
    """Per sample: image tokens in the prompt and how many each decoder layer could see, in request order."""

    records: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, paths: list[Path]) -> "TokenAccounting":
        """Records written by `write` (one file per process)."""
        return cls([json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line])

    def add(self, **record) -> None:
        self.records.append(record)

    @property
    def with_images(self) -> list[dict]:
        return [r for r in self.records if r["image_tokens"]]

    def image_tokens_per_sample(self) -> float:
        """Mean image tokens in the prompt over samples with images (0 when there are none)."""
        with_images = self.with_images
        return sum(r["image_tokens"] for r in with_images) / len(with_images) if with_images else 0.0

    def visible_per_layer(self) -> list[float]:
        """Mean image tokens visible at each layer over samples with images ([] when there are none)."""
        with_images = self.with_images
        return [sum(column) / len(with_images) for column in zip(*(r["visible_per_layer"] for r in with_images))]

    def mean_visible(self) -> float:
        """Image tokens visible per sample, averaged over layers (0 when no sample has an image)."""
        per_layer = self.visible_per_layer()
        return sum(per_layer) / len(per_layer) if per_layer else 0.0

    def summary(self) -> str:
        if not self.with_images:
            return f"{len(self.records)} samples, none with an image"
        total, per_layer, average = self.image_tokens_per_sample(), self.visible_per_layer(), self.mean_visible()
        return (
            f"{len(self.with_images)}/{len(self.records)} samples with images, {total:.1f} image tokens per sample; "
            f"visible per layer: {layer_runs(per_layer)}; average over layers {average:.1f} ({100 * average / total:.1f}%)"
        )

    def write(self, path: str) -> None:
        """Write one JSON line per sample (doc_id, task, prompt tokens, image tokens, visible per layer and mean)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            for record in self.records:
                handle.write(json.dumps(record) + "\n")


def layer_runs(values: list[float]) -> str:
    """[452, 452, 144, 144, 144] -> 'layers 0-1: 452, layers 2-4: 144'."""
    runs, start = [], 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            span = f"layer {start}" if index - 1 == start else f"layers {start}-{index - 1}"
            runs.append(f"{span}: {values[start]:g}")
            start = index
    return ", ".join(runs)
