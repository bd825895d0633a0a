"""What a reduction method declares (`Method`) and what its planning returns (the stages the engine applies).

A method acts at one or more *places*, which a pipeline (`reduction=a+b+...`) visits in this order:
  "vision":  in the vision tower, before the projector (it returns a shorter image in the tower's space);
  "pre-LLM": after the projector, before the first decoder layer (it keeps some image tokens, or returns a shorter
             image in the LLM's input space);
  "in-LLM":  at decoder layers, in layer order (it keeps some of the image tokens still present from a layer on).
Planning a pipeline for a model (`Method.plan`) turns each method's arguments into *stages* (`VisionStage`,
`PreLLMStage`, `LayerStage`): budgets resolved to tokens per image, layers to decoder layers, and the function the
engine calls at that place with a view of what the model computed there (`lmms_simignore.engine.views`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from lmms_simignore.methods.arguments import resolve_count

VISION, PRE_LLM, IN_LLM = "vision", "pre-LLM", "in-LLM"
PLACES = (VISION, PRE_LLM, IN_LLM)
PLACE_WORDS = {VISION: "in the vision tower", PRE_LLM: "before the LLM", IN_LLM: "inside the LLM"}
POSITION_RULES = ("original", "repacked", "contiguous")
# what a method may need that not every model can give (the engine checks these before any compute)
CLS_ATTENTION = "the CLS token's attention in the tower's feature layer"
CLS_TOKEN = "a CLS token in the tower (CLIP)"
PATCH_ATTENTION = ("each image token's attention in the tower (CLIP: the CLS row of the feature layer; SigLIP: the "
                   "attention it receives in the last layer)")
PATCHES_ALONE = "the patches alone as the image tokens (on CLIP: vision_feature_select_strategy=default)"
# the settings every pipeline has (not a method's): the pipeline, its budget, how a pre-LLM stage hides tokens, the seed
# of random choices, and the position rule after in-LLM stages
COMMON_ARGUMENTS = ("reduction", "keep", "ignore", "apply", "seed", "stage_positions", "budget_per")


@dataclass(frozen=True)
class Budget:
    """The pipeline's `keep` / `ignore` (per image), which its first stage takes.

    keep: an int count, a float fraction in [0, 1] of the model's image tokens (rounded half up), or "auto" (a
    method that supports it chooses per image); ignore: an int count of image tokens to leave out.
    """

    keep: int | float | str | None = None
    ignore: int | None = None

    @property
    def given(self) -> bool:
        return self.keep is not None or self.ignore is not None

    @property
    def adaptive(self) -> bool:
        return self.keep == "auto"

    def describe(self) -> str:
        return f"keep={self.keep}, ignore={self.ignore}"

    def per_image_of(self, tiles: int) -> Budget:
        """This budget given per tile, as the budget of an image of `tiles` tiles: a count (or `ignore`) times the tiles;
        a fraction and `auto` as they are."""
        scale = lambda value: value * tiles if isinstance(value, int) and not isinstance(value, bool) else value  # noqa: E731
        return Budget(scale(self.keep), scale(self.ignore))

    def count(self, image_tokens: int) -> int:
        """Tokens per image this budget keeps of the model's `image_tokens`."""
        if self.ignore is not None:
            if self.ignore > image_tokens:
                raise ValueError(f"ignore={self.ignore} exceeds the model's {image_tokens} image tokens per image")
            return image_tokens - int(self.ignore)
        return resolve_count("keep", self.keep, image_tokens)


@dataclass(frozen=True)
class PipelineContext:
    """What a method's arguments are checked against when the settings are made (before any model is known).

    budget: the pipeline's keep/ignore when this method is the first stage, else None (the budget is another's);
    pipeline: the method names in order; apply: "drop" | "mask"; positions: stage_positions, when given.
    """

    budget: Budget | None
    pipeline: tuple[str, ...]
    apply: str
    positions: str | None


def require_keep_or_ignore(method: str, context: PipelineContext, alternative: str = "", adaptive: bool = False) -> Budget:
    """The pipeline's budget for `method`: exactly one of keep and ignore (keep=auto only with `adaptive`), which it
    takes as the first stage that takes them; `alternative` names its own budget argument, if it has one."""
    budget = context.budget
    if budget is None or (budget.keep is None) == (budget.ignore is None) or (budget.adaptive and not adaptive):
        raise ValueError(f"{method} needs exactly one of keep=N (or a fraction keep=0.25) and ignore=N (as the first stage "
                         f"that takes them){alternative}; got {budget.describe() if budget else 'none for it'} in "
                         f"reduction={'+'.join(context.pipeline)}")
    return budget


@dataclass(frozen=True)
class StageRequest:
    """What a method is told when its stages are planned for a model.

    budget: as in `PipelineContext`; available: image tokens per image entering the method's first stage;
    image_tokens: the model's image tokens per image (fractions are of this); grid: (rows, cols) of each image's tokens
    where they form one grid, else None; num_layers: decoder layers; after_layer: the layer of the in-LLM stage before
    (0 without one: a stage's layer must be larger); positions: stage_positions, when given (else the method's rule);
    tiles: the grids an image's tokens form in token order, where they form several (a tiled image), else None;
    views: the tiles (views) the tower saw of each image (LLaVA-NeXT: the base view and its crops), 1 for most models.
    """

    budget: Budget | None
    available: int
    image_tokens: int
    grid: tuple[int, int] | None
    num_layers: int
    after_layer: int = 0
    positions: str | None = None
    tiles: tuple[tuple[int, int], ...] | None = None
    views: int = 1

    @property
    def grids(self) -> tuple[tuple[int, int], ...] | None:
        """The grids of an image's tokens in token order (one where they form one), or None where they form none."""
        return self.tiles if self.tiles is not None else (None if self.grid is None else (self.grid,))


@dataclass(frozen=True)
class VisionStage:
    """A stage in the vision tower: `shorten(view: TowerView) -> (I, tokens, D_tower)`, which the engine projects
    and places where the image was, at contiguous positions; when `adaptive` (each image its own number, at most
    `tokens`), `shorten(view) -> ((I, K, D_tower), (I,) lengths)`, image i's first K_i rows. On images the tower sees as several views (LLaVA-NeXT's
    base view and crops, `TowerView.tiling`): `shorten_views(view) -> [(tokens, D_tower)]`, each image's views shortened
    and arranged as the method's authors do for such images; or `select_views(view) -> (V, P) bool`, the patches kept
    in each view, which the engine carries to the image's tokens as the model packs them (`TiledImage.token_views`) and
    keeps in order at contiguous positions, the model's separators kept; None of both where there is no such version
    (refused there, with `views_refusal`, why)."""

    method: str
    tokens: int
    shorten: Callable
    shorten_views: Callable | None = None
    select_views: Callable | None = None
    views_refusal: str = "its authors' code gives no version for an image in tiles"
    adaptive: bool = False


@dataclass(frozen=True)
class PreLLMStage:
    """A stage after the projector: `choose(view: ImageTokensView)` returns (I, keep) indices of the kept tokens
    (ascending), or (I, N) bool flags when `adaptive` (each image its own number); with `replaces`, a `ShorterImage`
    instead: new image features, placed where the image was, at contiguous positions. `positions`: "original" (each
    kept token at its own position, hidden ones leave gaps) or "contiguous" (the positions counted anew over what is
    left, as a shorter prompt; 1-D positions only)."""

    method: str
    keep: int
    choose: Callable
    adaptive: bool = False
    replaces: bool = False
    positions: str = "original"


@dataclass
class ShorterImage:
    """What a stage that replaces each image returns: `features` (I, K, D), the shorter image's tokens; `grid` (rows,
    cols) of those K tokens, row-major, where they form one (a model with multimodal rotary positions places the
    shorter image on it, as it would place an image of that grid); `same((I, N, D')) -> (I, K, D')`: the same reduction
    applied to other rows of each image's tokens (Qwen3-VL's DeepStack levels), None where the stage has none; `tiles`:
    the grids of the K tokens in token order, where the image's tokens formed several (a tiled image's, each shortened
    on its own), which the family lays out with its separators."""

    features: torch.Tensor
    grid: tuple[int, int] | None = None
    same: Callable | None = None
    tiles: tuple[tuple[int, int], ...] | None = None


@dataclass
class LayerChoice:
    """What an in-LLM stage keeps: `kept` (I, K) indices into the image tokens still present (ascending), and
    optionally `rebuild((I, M, D) their hidden states) -> (I, K, D)`, the content of the K kept slots when the stage
    makes new tokens (merging); None leaves each kept token as it is."""

    kept: torch.Tensor
    rebuild: Callable | None = None


@dataclass(frozen=True)
class LayerStage:
    """A stage inside the LLM: layers >= `layer` see `keep` image tokens per image, chosen by `choose(view:
    LayerView) -> LayerChoice` from what the layers before computed; positions "original" (each token keeps its
    position id) or "repacked" (the tokens left close ranks); `merges`: its choice makes new tokens (a `rebuild`)."""

    method: str
    layer: int
    keep: int
    choose: Callable
    positions: str = "original"
    merges: bool = False


@dataclass(frozen=True)
class Method:
    """A reduction method's declaration.

    name: its `reduction=` name; title: the paper (authors, venue); summary: what it does, for the methods table;
    places: where it acts (a subset of PLACES, in order); arguments: a frozen dataclass of its own model_args, with
    defaults from its paper or code (each field's metadata: help, values), validated in `__post_init__`;
    budget: its budget convention, stated; positions: its position rule after it drops tokens (a POSITION_RULES entry,
    or several joined by " then " when its places differ); needs: what it reads from the model; refuses: what it
    cannot run on (the engine refuses a model that cannot give what `needs` names, e.g. CLS_ATTENTION). check(
    arguments, PipelineContext) raises on combinations its arguments cannot express; plan(arguments, StageRequest) ->
    its stages; text_style(arguments) -> the comparison text it embeds ("options" / "options_lettered" / "prompt"), for methods
    that read text. takes_keep: whether the pipeline's keep/ignore can be its budget; own_budget: its own budget
    arguments, which state one budget together (a user's value for one replaces a preset's for all). The pipeline's
    keep/ignore go to the first method that takes them and whose own budget is not given. adaptive_budget: whether it
    takes keep=auto (each image its own number).
    """

    name: str
    title: str
    summary: str
    places: tuple[str, ...]
    arguments: type
    budget: str
    positions: str
    needs: tuple[str, ...]
    plan: Callable
    check: Callable | None = None
    refuses: str = ""
    text_style: Callable | None = None
    takes_keep: bool = True
    own_budget: tuple[str, ...] = ()
    adaptive_budget: bool = False

    def __post_init__(self) -> None:
        if not self.places or any(place not in PLACES for place in self.places) or \
                list(self.places) != sorted(self.places, key=PLACES.index):
            raise ValueError(f"method {self.name}: places must be some of {', '.join(PLACES)} in that order, got {self.places}")
        if not (dataclasses.is_dataclass(self.arguments) and self.arguments.__dataclass_params__.frozen):
            raise ValueError(f"method {self.name}: arguments must be a frozen dataclass")

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.arguments))

    def where(self) -> str:
        return " and ".join(PLACE_WORDS[place] for place in self.places)
