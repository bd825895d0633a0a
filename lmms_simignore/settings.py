"""The reduction settings of one run: one frozen dataclass, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_simignore.reduction.simignore import SIMILARITIES

REDUCTIONS = ("none", "simignore")
TEXT_SOURCES = ("options", "prompt")
APPLY_MODES = ("mask", "drop")


@dataclass(frozen=True)
class ReductionSettings:
    """What to reduce and how. Budgets are per image.

    reduction:  "none" | "simignore"
    keep:       image tokens kept per image: an int count, or a float fraction in [0, 1] (rounded half up)
    ignore:     image tokens ignored per image (int); exactly one of keep / ignore for a reduction
    similarity: "cosine" (default) | "euclidean" | "manhattan" (distances keep the *closest* tokens)
    text:       "options" (answer-option text, as the published code) | "prompt" (the user's prompt text)
    apply:      "drop" (remove tokens, keep original position ids; real speed-up) |
                "mask" (attention mask 0 on ignored tokens, as the paper)
    """

    reduction: str = "none"
    keep: int | float | None = None
    ignore: int | None = None
    similarity: str = "cosine"
    text: str = "options"
    apply: str = "drop"

    def __post_init__(self) -> None:
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("text", self.text, TEXT_SOURCES)
        _check_choice("apply", self.apply, APPLY_MODES)
        if self.reduction == "none":
            if self.keep is not None or self.ignore is not None:
                raise ValueError("keep/ignore have no effect with reduction=none; drop them or choose a reduction")
            return
        if (self.keep is None) == (self.ignore is None):
            raise ValueError(
                f"reduction={self.reduction} needs exactly one of keep=N (or a fraction keep=0.25) and ignore=N, "
                f"got keep={self.keep}, ignore={self.ignore}"
            )
        if self.ignore is not None and (_is_bool(self.ignore) or not _is_whole(self.ignore) or self.ignore < 0):
            raise ValueError(f"ignore must be a non-negative integer number of image tokens, got {self.ignore!r}")
        if self.keep is not None:
            if _is_bool(self.keep) or not isinstance(self.keep, (int, float)) or self.keep < 0:
                raise ValueError(f"keep must be a non-negative integer count or a fraction in [0, 1], got {self.keep!r}")
            if isinstance(self.keep, float) and self.keep > 1:
                raise ValueError(
                    f"keep={self.keep} is a float above 1: use an integer for a token count (keep=452) "
                    f"or a fraction in [0, 1] (keep=0.25)"
                )

    @property
    def reduces(self) -> bool:
        return self.reduction != "none"

    def kept_per_image(self, image_tokens: int) -> int:
        """Image tokens kept per image for a model with `image_tokens` tokens per image."""
        if not self.reduces:
            return image_tokens
        if self.ignore is not None:
            if self.ignore > image_tokens:
                raise ValueError(f"ignore={self.ignore} exceeds the model's {image_tokens} image tokens per image")
            return image_tokens - int(self.ignore)
        if isinstance(self.keep, float):
            return math.floor(self.keep * image_tokens + 0.5)  # round half up
        if self.keep > image_tokens:
            raise ValueError(f"keep={self.keep} exceeds the model's {image_tokens} image tokens per image")
        return int(self.keep)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
