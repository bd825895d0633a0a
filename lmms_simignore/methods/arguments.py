"""Checks and parsers shared by the methods' argument dataclasses: each error names the argument and what is allowed."""

from __future__ import annotations

import math
from dataclasses import field


def argument(default, help: str, values: str | None = None):
    """A method argument: its default, what it means (with the source of the default) and, for the docs, the values it
    takes when they are not obvious from the default."""
    return field(default=default, metadata={"help": help, "values": values})


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def is_bool(value: object) -> bool:
    return isinstance(value, bool)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_int(name: str, value, low: int) -> None:
    if is_bool(value) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_count(name: str, value) -> None:
    """None, or a whole number of image tokens >= 0."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if value is not None and (is_bool(value) or not whole or value < 0):
        raise ValueError(f"{name} must be a non-negative integer number of image tokens, got {value!r}")


def check_count_or_fraction(name: str, value) -> None:
    """None, an int count >= 0, or a float fraction in [0, 1]."""
    if value is None:
        return
    if is_bool(value) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer count or a fraction in [0, 1], got {value!r}")
    if isinstance(value, float) and value > 1:
        raise ValueError(f"{name}={value} is a float above 1: use an integer for a token count ({name}=452) "
                         f"or a fraction in [0, 1] ({name}=0.25)")


def check_fraction(name: str, value, meaning: str, low_open: bool = False) -> None:
    """None, or a number in [0, 1] ((0, 1] with low_open)."""
    if value is None:
        return
    inside = isinstance(value, (int, float)) and not is_bool(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not inside:
        raise ValueError(f"{name} must be a fraction in {'(0, 1]' if low_open else '[0, 1]'} {meaning}, got {value!r}")


def resolve_count(name: str, value, image_tokens: int) -> int:
    """A count, or a fraction of the model's `image_tokens` (rounded half up), as tokens per image."""
    if isinstance(value, float):
        return round_half_up(value * image_tokens)
    if value > image_tokens:
        raise ValueError(f"{name}={value} exceeds the model's {image_tokens} image tokens per image")
    return int(value)


def parse_layers(name: str, given, lowest: int = 1, examples: tuple[str, str] = ("8/16/24", "0.25/0.5/0.75")
                 ) -> tuple[int, ...] | tuple[float, ...]:
    """'8/16/24' (or an int, or a tuple) -> (8, 16, 24), increasing decoder layers >= `lowest`; '0.25/0.5/0.75' ->
    (0.25, 0.5, 0.75), increasing fractions of the depth in (0, 1) ([0, 1) where `lowest` is 0), resolved per model
    (`resolve_layers`). `examples`: a layers and a fractions example for the error message."""
    layers = given
    if isinstance(layers, (int, float)) and not is_bool(layers):
        layers = (layers,)
    elif isinstance(layers, str):
        try:
            layers = tuple(float(part) if "." in part else int(part) for part in layers.split("/"))
        except ValueError:
            layers = None
    valid = isinstance(layers, (tuple, list)) and bool(layers) and list(layers) == sorted(set(layers)) and (
        all(isinstance(x, int) and not is_bool(x) and x >= lowest for x in layers)
        or all(isinstance(x, float) and (0 <= x if lowest == 0 else 0 < x) and x < 1 for x in layers))
    if not valid:
        raise ValueError(f"{name} must be increasing decoder layers >= {lowest} separated by '/', e.g. {examples[0]}, or "
                         f"increasing fractions of the depth, e.g. {examples[1]}; got {given!r}")
    return tuple(layers)


def resolve_layers(name: str, layers: tuple, num_layers: int) -> tuple[int, ...]:
    """Layers as given, or fractions of the depth as layers: round half up, at least 1 (0.25/0.5/0.75 of 32 -> 8/16/24,
    of 6 -> 2/3/5); refuses fractions that land on the same layer."""
    if all(isinstance(x, int) for x in layers):
        return tuple(layers)
    resolved = tuple(max(1, round_half_up(fraction * num_layers)) for fraction in layers)
    if list(resolved) != sorted(set(resolved)):
        raise ValueError(f"{name}={'/'.join(map(str, layers))} gives layers {'/'.join(map(str, resolved))} on this "
                         f"{num_layers}-layer language model; each stage needs its own layer")
    return resolved


def check_stage_layers(name: str, layers: tuple[int, ...], num_layers: int, after: int) -> None:
    """Stage layers must leave a decoder layer before and after each, and come after the previous in-LLM stage's."""
    if not layers or layers[0] <= after or layers[-1] >= num_layers:
        previous = f" and after layer {after}, where the stage before it acts" if after else ""
        raise ValueError(f"{name}={'/'.join(map(str, layers)) or '(none)'} is outside the language model's layers: it has "
                         f"{num_layers} decoder layers, so each stage must be in [1, {num_layers - 1}]{previous}")


def layers_text(layers) -> str:
    return "/".join(map(str, layers))
