"""The reduction settings of one run: a pipeline of registered methods, the settings every pipeline has, and each
method's own arguments, validated on creation against the registry (`lmms_simignore.methods.registry`).

A pipeline is spelled with `+` in `reduction=` and visits the places in order: at most one stage in the vision tower,
at most one before the LLM, then any number inside the LLM in layer order (`reduction=a+b`: method a, then method b,
each named by the registry). `keep`/`ignore` are the budget of the first method that takes them and whose own budget
arguments are not given. `plan(image_tokens, num_layers)` resolves every budget and
layer for a model into the stages the engine applies.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lmms_simignore.methods.arguments import check_choice, check_count, check_count_or_fraction, check_int
from lmms_simignore.methods.base import (CLS_ATTENTION, CLS_TOKEN, COMMON_ARGUMENTS, IN_LLM, PLACE_WORDS, PLACES, PRE_LLM, VISION, Budget,
                                         LayerStage, Method, PipelineContext, PreLLMStage, StageRequest, VisionStage)
from lmms_simignore.methods.registry import METHODS, argument_owners

APPLY_MODES = ("drop", "mask")
BUDGET_UNITS = ("image", "tile")
REDUCTION_ARGUMENTS = (*COMMON_ARGUMENTS, *argument_owners())  # every model_arg the reduction settings take
STAGE_POSITIONS = ("original", "repacked")
COMMON_HELP = {
    "reduction": ("`none` | a method | methods joined by `+` in pipeline order", "see Methods"),
    "keep": ("none", "per image: `keep=452` tokens, `keep=0.25` a fraction of the model's image tokens (rounded half up; "
             "`keep=1` is one token, `keep=1.0` all), or `keep=auto` (each image its own number, for a method that "
             "takes it); the budget of the pipeline's first stage that takes it"),
    "ignore": ("none", "per image: image tokens to leave out (`ignore=124` = keep 452 of 576); instead of `keep`"),
    "apply": ("`drop` | `mask`", "how the stage before the LLM hides tokens: `drop` removes them from the sequence (real "
              "compute saving); `mask` sets their attention mask to 0 (the paper). Both keep every token's original "
              "position id, so they give the same answers"),
    "seed": ("`0`", "random choices (each image's depends only on the seed, task, doc and image) and sampling "
             "(`temperature>0`)"),
    "budget_per": ("`image`", "what a count in `keep`/`ignore` is of on tiled images (LLaVA-NeXT, OneVision, InternVL): "
                   "`image` (all its tiles together) or `tile` (`keep=128` keeps 128 per tile: 640 of an image of 5 "
                   "views; a method that selects in each view of the tower then keeps 128 in each); a fraction is the "
                   "same share either way; an image of other models is one tile"),
    "stage_positions": ("the method's", "position ids of the tokens an in-LLM stage leaves: `original` (their own) or "
                        "`repacked` (consecutive); default: each method's own rule (see Methods)"),
}


@dataclass(frozen=True)
class Plan:
    """A pipeline resolved for one model: the stages the engine applies, in order.

    image_tokens: the model's image tokens per image; num_layers: its decoder layers; apply: how the pre-LLM stage
    hides tokens; vision / pre_llm: the stage at that place or None; layers: the in-LLM stages in layer order;
    methods: the pipeline's methods (what they need is checked against the model).
    """

    image_tokens: int
    num_layers: int
    apply: str
    vision: VisionStage | None
    pre_llm: PreLLMStage | None
    layers: tuple[LayerStage, ...]
    methods: tuple[Method, ...]

    @property
    def entering_llm(self) -> int:
        """Image tokens per image in the sequence the first decoder layer gets (masked ones included)."""
        if self.pre_llm is not None and (self.apply == "drop" or self.pre_llm.replaces):
            return self.pre_llm.keep
        return self.vision.tokens if self.vision is not None else self.image_tokens

    @property
    def kept_per_image(self) -> int:
        """Image tokens per image the first decoder layer may attend to (with keep=auto, the most an image may keep)."""
        if self.pre_llm is not None:
            return self.pre_llm.keep
        return self.vision.tokens if self.vision is not None else self.image_tokens

    def needing(self, need: str) -> tuple[str, ...]:
        """The pipeline's methods that need `need` (e.g. CLS_ATTENTION)."""
        return tuple(method.name for method in self.methods if need in method.needs)

    def visible_per_layer(self) -> list[int]:
        """Image tokens per image visible to each decoder layer (the budget that "N tokens" means, layer by layer)."""
        visible = [self.kept_per_image] * self.num_layers
        for stage in self.layers:
            visible[stage.layer:] = [stage.keep] * (self.num_layers - stage.layer)
        return visible

    def computed_per_layer(self) -> list[int]:
        """Image tokens per image each decoder layer computes on: the visible ones, except that `apply=mask` leaves the
        hidden tokens in the sequence (attended to by nobody, still computed) until the first in-LLM stage drops."""
        visible = self.visible_per_layer()
        if self.entering_llm == self.kept_per_image:
            return visible
        masked_layers = self.layers[0].layer if self.layers else self.num_layers
        return [self.entering_llm] * masked_layers + visible[masked_layers:]

    @property
    def changes_positions(self) -> bool:
        """Whether any stage moves the position ids of the tokens left (a shorter image, or re-packed ranks)."""
        return self.vision is not None or (self.pre_llm is not None and self.pre_llm.replaces) or \
            any(stage.positions != "original" for stage in self.layers)


class ReductionSettings:
    """What to reduce and how: frozen, validated on creation. Budgets are per image.

    reduction: "none" or registered methods joined by "+" in pipeline order; keep / ignore: the budget of the first
    method that takes it (an int count, a float fraction in [0, 1] of the model's image tokens, "auto" for a method
    that takes an adaptive budget; or ignore=N); apply: "drop" | "mask" (how a stage before the LLM hides tokens); seed: random choices;
    stage_positions: "original" | "repacked" | None (each in-LLM method's own rule); **arguments: the methods' own
    model_args (each method's `arguments` dataclass; an argument of a method not in the pipeline is refused).
    """

    __slots__ = ("reduction", "budget", "apply", "seed", "stage_positions", "budget_per", "given", "_methods",
                 "_budget_owner")

    def __init__(self, reduction: str = "none", keep: int | float | str | None = None, ignore: int | None = None,
                 apply: str = "drop", seed: int = 0, stage_positions: str | None = None, budget_per: str = "image",
                 **arguments) -> None:
        methods = parse_pipeline(reduction)
        names = tuple(method.name for method in methods)
        check_choice("apply", apply, APPLY_MODES)
        check_int("seed", seed, 0)
        owners = argument_owners()
        for name in arguments:
            if name not in owners:
                raise ValueError(unknown_argument_message(name, (*COMMON_ARGUMENTS, *owners), "reduction settings"))
            if owners[name] not in names:
                raise ValueError(f"{name} belongs to {owners[name]}, which is not in reduction={reduction}")
        if keep is not None and ignore is not None:
            raise ValueError(f"give one of keep and ignore, not both (keep={keep}, ignore={ignore})")
        if keep != "auto":
            check_count_or_fraction("keep", keep)
        check_count("ignore", ignore)
        budget = Budget(keep, ignore)
        check_choice("budget_per", budget_per, BUDGET_UNITS)
        if budget_per != "image" and not budget.given:
            raise ValueError(f"budget_per={budget_per} says what keep/ignore count per; give keep=N or ignore=N with it")
        if not methods and budget.given:
            raise ValueError("keep/ignore have no effect with reduction=none; drop them or choose a reduction")
        if stage_positions is not None:
            check_choice("stage_positions", stage_positions, STAGE_POSITIONS)
            if not any(IN_LLM in method.places for method in methods):
                raise ValueError(f"stage_positions applies to a stage inside the language model "
                                 f"({', '.join(methods_at(IN_LLM))}); reduction={reduction} has none")
        if apply == "mask" and methods and not any(PRE_LLM in method.places for method in methods):
            raise ValueError(f"apply=mask applies to a stage before the LLM ({', '.join(methods_at(PRE_LLM))}); "
                             f"reduction={reduction} has none")

        owner = next((method.name for method in methods if method.takes_keep
                      and not any(name in arguments for name in method.own_budget)), None)
        if budget.given and owner is None:
            how = "; ".join(f"{method.name} by {', '.join(method.own_budget) or 'its own arguments'}" for method in methods)
            raise ValueError(f"{budget.describe()}: no stage of reduction={reduction} takes them ({how}); drop keep/ignore "
                             f"or the other budget")
        if budget.adaptive and not METHODS[owner].adaptive_budget:
            takers = [name for name, method in METHODS.items() if method.adaptive_budget]
            who = takers[0] if len(takers) == 1 else f"{', '.join(takers[:-1])} and {takers[-1]}"
            raise ValueError(f"keep=auto is an adaptive budget (each image its own number), which only {who} "
                             f"{'takes' if len(takers) == 1 else 'take'}, not {owner}: reduction={reduction}")
        parsed = []
        for method in methods:
            args = method.arguments(**{name: value for name, value in arguments.items() if owners[name] == method.name})
            if method.check is not None:
                method.check(args, PipelineContext(budget if method.name == owner else None, names, apply, stage_positions))
            parsed.append((method, args))
        for name, value in (("reduction", reduction), ("budget", budget), ("apply", apply), ("seed", seed),
                            ("stage_positions", stage_positions), ("budget_per", budget_per), ("given", tuple(sorted(arguments.items(), key=lambda kv: kv[0]))),
                            ("_methods", tuple(parsed)), ("_budget_owner", owner)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"ReductionSettings are frozen; make new ones (cannot set {name})")

    def _key(self) -> tuple:
        return self.reduction, self.budget, self.apply, self.seed, self.stage_positions, self.budget_per, self.given

    def __eq__(self, other) -> bool:
        return isinstance(other, ReductionSettings) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [f"reduction={self.reduction}"]
        parts += [f"{name}={getattr(self.budget, name)}" for name in ("keep", "ignore") if getattr(self.budget, name) is not None]
        if self.reduces:
            parts += [f"apply={self.apply}", f"seed={self.seed}"]
        if self.stage_positions is not None:
            parts.append(f"stage_positions={self.stage_positions}")
        if self.budget_per != "image":
            parts.append(f"budget_per={self.budget_per}")
        parts += [f"{name}={value}" for name, value in self.given]
        return f"ReductionSettings({', '.join(parts)})"

    @property
    def keep(self):
        return self.budget.keep

    @property
    def ignore(self):
        return self.budget.ignore

    @property
    def stages(self) -> tuple[str, ...]:
        """The pipeline's method names, in order."""
        return tuple(method.name for method, _ in self._methods)

    @property
    def reduces(self) -> bool:
        return bool(self._methods)

    def methods_at(self, place: str) -> tuple[str, ...]:
        """The pipeline's methods acting at `place` (VISION, PRE_LLM, IN_LLM)."""
        return tuple(method.name for method, _ in self._methods if place in method.places)

    def arguments_of(self, name: str):
        """The arguments dataclass of the pipeline's method `name`."""
        for method, args in self._methods:
            if method.name == name:
                return args
        raise ValueError(f"reduction={self.reduction} has no {name} stage")

    @property
    def reads_text(self) -> bool:
        """Whether a stage embeds a comparison text."""
        return any(method.text_style is not None for method, _ in self._methods)

    @property
    def text_style(self) -> str:
        """The comparison text a stage embeds: "options" (the answer options), "options_lettered" or "prompt"."""
        return next((method.text_style(args) for method, args in self._methods if method.text_style is not None), "options")

    @property
    def needs_cls_attention(self) -> tuple[str, ...]:
        """The pipeline's methods that read the CLS token's attention in the tower."""
        return tuple(method.name for method, _ in self._methods if {CLS_ATTENTION, CLS_TOKEN} & set(method.needs))

    def plan(self, image_tokens: int, num_layers: int, grid: tuple[int, int] | None = None,
             tiles: tuple[tuple[int, int], ...] | None = None, views: int = 1) -> Plan:
        """The stages for a model with `image_tokens` per image (on a `grid` of rows x cols, where they form one; on the
        grids `tiles`, in token order, where they form several) of `views` tiles (views of the tower) and `num_layers`
        decoder layers; raises, naming the argument, on budgets or layers the model cannot take."""
        stages, available, after = [], image_tokens, 0
        budget = self.budget.per_image_of(views) if self.budget_per == "tile" else self.budget
        for method, args in self._methods:
            request = StageRequest(budget if method.name == self._budget_owner else None, available, image_tokens,
                                   grid, num_layers, after, self.stage_positions, tiles, views)
            for stage in method.plan(args, request):
                if isinstance(stage, LayerStage):
                    if stage.keep > available:
                        raise ValueError(f"{stage.method}'s stage at layer {stage.layer} keeps {stage.keep} image tokens "
                                         f"per image, but only {available} are left before it")
                    available, after = stage.keep, stage.layer
                else:
                    available = stage.tokens if isinstance(stage, VisionStage) else stage.keep
                stages.append(stage)
        return Plan(
            image_tokens=image_tokens, num_layers=num_layers, apply=self.apply,
            vision=next((stage for stage in stages if isinstance(stage, VisionStage)), None),
            pre_llm=next((stage for stage in stages if isinstance(stage, PreLLMStage)), None),
            layers=tuple(stage for stage in stages if isinstance(stage, LayerStage)),
            methods=tuple(method for method, _ in self._methods),
        )

    def visible_per_layer(self, image_tokens: int, num_layers: int, grid: tuple[int, int] | None = None) -> list[int]:
        return self.plan(image_tokens, num_layers, grid).visible_per_layer()


def methods_at(place: str) -> tuple[str, ...]:
    """The registered methods that act at `place`."""
    return tuple(name for name, method in METHODS.items() if place in method.places)


def parse_pipeline(reduction) -> tuple[Method, ...]:
    """'a+b' -> the registry's methods a and b; refuses unknown names, repeats and orders the places do not allow."""
    if not isinstance(reduction, str) or not reduction:
        raise ValueError(f"reduction must be none or method names joined by '+'; got {reduction!r}")
    if reduction == "none":
        return ()
    names = reduction.split("+")
    for name in names:
        if name not in METHODS:
            close = difflib.get_close_matches(name, list(METHODS), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"reduction: unknown method {name!r}{hint}; reduction is none or methods joined by '+' "
                             f"from: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"reduction={reduction} names a method twice")
    methods = tuple(METHODS[name] for name in names)
    where = "; ".join(f"{method.name} acts {method.where()}" for method in methods)
    for before, after in zip(methods, methods[1:]):
        if PLACES.index(before.places[-1]) > PLACES.index(after.places[0]):
            raise ValueError(f"reduction={reduction} is not in pipeline order ({where}): stages go from the vision tower "
                             f"to before the LLM to inside it, in-LLM stages in layer order")
    for place in (VISION, PRE_LLM):
        at = [method.name for method in methods if place in method.places]
        if len(at) > 1:
            raise ValueError(f"reduction={reduction} has {len(at)} stages {PLACE_WORDS[place]} ({', '.join(at)}); a pipeline "
                             f"has at most one there")
    return methods


def unknown_argument_message(name: str, valid, what: str) -> str:
    """An error for a misspelt argument, with the closest valid name."""
    stems = [other for other in valid if name.startswith(f"{other}_")]  # keep_ratio -> keep
    close = stems[:1] or difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"unknown model_arg {name!r} for {what}: {hint}valid: {', '.join(sorted(valid))}"
