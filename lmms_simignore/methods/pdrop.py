"""PyramidDrop (Xing et al., CVPR 2025): prune image tokens inside the LLM stage by stage.

At the end of each stage (its code: after layers 8, 16 and 24 of LLaVA-1.5's 32) the image tokens still present are
ranked by the attention the last instruction token pays them in the layer before (mean over heads, FastV's rule), and
a fraction λ of them (0.5 in its code) is kept for the layers after, so the budget shrinks geometrically: 576, 288,
144, 72. Its code re-packs the positions of the tokens left after each stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmms_simignore.methods.arguments import (argument, check_fraction, check_stage_layers, parse_layers, resolve_layers,
                                              round_half_up)
from lmms_simignore.methods.base import IN_LLM, LayerStage, Method, StageRequest
from lmms_simignore.methods.fastv import choose_by_last_token_attention

DEFAULT_RATIO = 0.5  # λ, its code's
DEPTHS = (0.25, 0.5, 0.75)  # its stages after layers 8, 16, 24 of LLaVA-1.5's 32


def depth_layers(num_layers: int, depths: tuple[float, ...] = DEPTHS) -> tuple[int, ...]:
    """A quarter, a half and three quarters of the decoder depth (8/16/24 of 32; 1/2/3 of 4; 1/2 of 3): those inside
    [1, num_layers - 1], each once."""
    return tuple(sorted({layer for layer in (round_half_up(depth * num_layers) for depth in depths) if 1 <= layer < num_layers}))


@dataclass(frozen=True)
class PyramidDropArguments:
    pdrop_layers: str | tuple | None = argument(
        None, "the stage layers, `/`-separated and increasing: decoder layers (`8/16/24`, its paper's on 32 layers) or "
              "fractions of the depth (`0.25/0.5/0.75` = 8/16/24 of 32, 2/3/5 of 6: rounded half up, at least 1); each "
              "must leave a layer on each side", "`0.25/0.5/0.75`")
    pdrop_ratio: float = argument(DEFAULT_RATIO, "λ: the fraction of the remaining image tokens each stage keeps "
                                  "(rounded half up; its code's 0.5)")

    def __post_init__(self) -> None:
        check_fraction("pdrop_ratio", self.pdrop_ratio, "of the remaining image tokens to keep", low_open=True)
        if self.pdrop_layers is not None:
            object.__setattr__(self, "pdrop_layers", parse_layers("pdrop_layers", self.pdrop_layers))

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.pdrop_layers is None:
            return depth_layers(num_layers)
        return resolve_layers("pdrop_layers", self.pdrop_layers, num_layers)


def _plan(args: PyramidDropArguments, request: StageRequest) -> tuple[LayerStage, ...]:
    layers = args.stage_layers(request.num_layers)
    check_stage_layers("pdrop_layers", layers, request.num_layers, request.after_layer)
    keeps, remaining = [], request.available
    for _ in layers:
        remaining = round_half_up(float(args.pdrop_ratio) * remaining)
        keeps.append(remaining)
    return pdrop_stages(tuple(zip(layers, keeps)), request.positions or "repacked")


METHOD = Method(
    name="pdrop",
    title="PyramidDrop (Xing et al., CVPR 2025)",
    summary="inside the LLM, at each stage layer L ranks the image tokens still present by the attention the last "
            "prompt token pays them in layer L−1 (mean over heads) and keeps a fraction λ of them for layers ≥ L, so "
            "the budget shrinks stage by stage (16 tokens, λ 0.5, two stages: 8, then 4)",
    places=(IN_LLM,),
    arguments=PyramidDropArguments,
    budget="λ (`pdrop_ratio`) of the tokens present at each stage; \"N tokens\" in its tables is the average over the "
           "layers (the token accounting reports both)",
    positions="repacked",
    needs=("one attention row (the last prompt token's) at the layer before each stage",),
    plan=_plan,
    takes_keep=False,
    own_budget=("pdrop_ratio",),
)


def pdrop_stages(layer_keeps: tuple[tuple[int, int], ...], positions: str = "original") -> tuple[LayerStage, ...]:
    """Stages at the given (layer, keep) pairs ranked by PyramidDrop's (FastV's) rule (what its plan gives)."""
    return tuple(LayerStage("pdrop", layer, keep, choose_by_last_token_attention, positions=positions) for layer, keep in layer_keeps)
