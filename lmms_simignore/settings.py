"""The reduction settings of one run: one frozen dataclass, validated on creation.

A reduction is a pipeline of at most two stages, spelled with `+` in `reduction=`:
  a *vision-side* stage (`visionzip`) shortens each image in the vision tower, before the projector, or
  a *pre-LLM* stage (`simignore` or `random`) chooses image tokens before the first decoder layer,
  then an *in-LLM* stage prunes them inside the language model: `fastv` at layer `fastv_layer`,
  `pdrop` (PyramidDrop) at each of `pdrop_layers`, keeping `pdrop_ratio` of what is left each time, or
  `dart` at `dart_layer`, keeping the tokens least similar to a few pivots.
`visiondrop` is both: VisionZip's stage in the tower, then stages inside the LLM that keep the image tokens
the image attends to most and merge the rest.
So `reduction=simignore+fastv` is the published Simignore recipe; `reduction=fastv` is FastV alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_simignore.methods.dart import DEFAULT_LAYER as DART_LAYER, DEFAULT_PIVOTS as DART_PIVOTS
from lmms_simignore.methods.selection import ORDERS
from lmms_simignore.methods.simignore import SIMILARITIES
from lmms_simignore.methods.visiondrop import DEFAULT_SCHEDULE as VISIONDROP_SCHEDULE
from lmms_simignore.methods.visiondrop import scaled_schedule
from lmms_simignore.methods.visionzip import split_budget

VISION_STAGES = ("visionzip", "visiondrop")
PRE_LLM_STAGES = ("simignore", "random")
IN_LLM_STAGES = ("fastv", "pdrop", "dart", "visiondrop")
PIPELINES = ("none", "simignore", "random", "fastv", "pdrop", "simignore+fastv", "random+fastv", "simignore+pdrop", "random+pdrop",
             "visionzip", "visionzip+pdrop", "dart", "visiondrop")
TEXT_SOURCES = ("options", "options_lettered", "prompt")
STAGE_POSITIONS = ("original", "repacked")
APPLY_MODES = ("mask", "drop")
DEFAULT_FASTV_RATIO = 0.5
DEFAULT_PDROP_RATIO = 0.5  # PyramidDrop's lambda
PDROP_DEPTHS = (0.25, 0.5, 0.75)
AUTO_MARGIN = 0.2  # keep=auto: within 0.2 cosine similarity of the image's best token  # PyramidDrop's stages after layers 8, 16, 24 of LLaVA-1.5's 32


@dataclass(frozen=True)
class ReductionSettings:
    """What to reduce and how. Budgets are per image.

    reduction:       "none" | "simignore" | "random" | "fastv" | "pdrop" | "simignore+fastv" | "random+fastv" |
                     "simignore+pdrop" | "random+pdrop" | "visionzip" | "visionzip+pdrop" | "dart" | "visiondrop"
    keep:            image tokens the pre-LLM or vision-side stage keeps per image (FastV's budget when it is the
                     only stage): an int count, or a float fraction in [0, 1] (rounded half up); for visionzip,
                     split into dominant and contextual tokens in VisionZip's proportion (64 = 54 + 10); "auto"
                     (reduction=simignore): per image, every token whose score is within `auto_margin` of the best
    auto_margin:     keep=auto's margin on the cosine similarity (default 0.2)
    ignore:          image tokens ignored per image (int); exactly one of keep / ignore for a pre-LLM stage
    apply:           how the pre-LLM stage hides tokens: "drop" (remove them, keep the original position
                     ids; real speed-up) | "mask" (attention mask 0, as the paper)
    similarity:      simignore: "cosine" | "euclidean" | "manhattan" (distances keep the *closest* tokens)
    text:            simignore compares with: "options" (answer options joined by spaces, as the published
                     7B run) | "options_lettered" ("Options: (A) x (B) y", as the published 13B run) |
                     "prompt" (the user's prompt text, as the paper's prose)
    text_bos:        simignore: also compare with the BOS embedding (the published 7B run did)
    order:           which part of the similarity ranking simignore ignores: "unimportant" (the least
                     similar, default) | "important" (the most similar) | "middle" (the middle band) | "random"
    simignore_start, simignore_step: the published walk over the sorted (image, text) similarity pairs
                     (7B: start 1 skips the single best pair; 13B: step 2 takes every other pair);
                     0 and 1 mean "rank each image token by its best similarity"
    seed:            seed of `random` choices (each sample's choice depends only on seed, task, doc and image)
    fastv_layer:     K: FastV ranks image tokens by the last prompt token's attention in layer K-1 and
                     drops the rest for layers >= K
    fastv_keep:      image tokens FastV keeps per image (int, or fraction of the model's image tokens)
    fastv_ratio:     R: FastV drops this fraction of the model's image tokens (keeps round((1 - R) * N));
                     default 0.5 when no FastV budget is given
    pdrop_layers:    PyramidDrop's stages, "8/16/24": a stage at L ranks the image tokens still present by the
                     last prompt token's attention in layer L-1 (mean over heads) and keeps `pdrop_ratio` of
                     them for layers >= L; or fractions of the depth, "0.25/0.5/0.75" (each layer = fraction x
                     depth, rounded half up, at least 1); default 0.25/0.5/0.75 (8/16/24 of LLaVA-1.5's 32 layers)
    pdrop_ratio:     the fraction of the remaining image tokens each PyramidDrop stage keeps (rounded half
                     up; default 0.5)
    dominant, contextual: visionzip's budget per image instead of keep: the CLS token and the patches it
                     attends to most (dominant, CLS included), plus the rest merged into `contextual` tokens
    dart_layer:      DART prunes for layers >= dart_layer, from layer dart_layer - 1's keys and output (default 2)
    dart_pivots:     DART's pivot tokens per image, half image and half text tokens (default 8); its budget is keep
    visiondrop_schedule: "42+6/30+5/22+4/16+3": dominant+contextual tokens per image of VisionDrop's vision stage,
                     then of each LLM stage (default: its code's schedule, an average of 32 over LLaVA-1.5's
                     layers); `keep=N` instead scales that schedule to an average of N
    visiondrop_layers: the LLM stages' layers, "8/16/24", or fractions of the depth as pdrop_layers; default
                     0.25/0.5/0.75
    stage_positions: the position ids of the tokens left after an in-LLM stage: "original" (their own; FastV's and
                     DART's code) | "repacked" (each drops by the number of tokens the stage dropped before it, so
                     they sit at consecutive positions; PyramidDrop's and VisionDrop's code); default: the method's
    """

    reduction: str = "none"
    keep: int | float | str | None = None
    ignore: int | None = None
    apply: str = "drop"
    similarity: str = "cosine"
    text: str = "options"
    text_bos: bool = False
    order: str = "unimportant"
    simignore_start: int = 0
    simignore_step: int = 1
    seed: int = 0
    fastv_layer: int = 2
    fastv_keep: int | float | None = None
    fastv_ratio: float | None = None
    pdrop_layers: str | tuple[int, ...] | tuple[float, ...] | None = None
    pdrop_ratio: float | None = None
    dominant: int | None = None
    contextual: int | None = None
    dart_layer: int | None = None
    dart_pivots: int | None = None
    visiondrop_schedule: str | tuple[tuple[int, int], ...] | None = None
    visiondrop_layers: str | tuple[int, ...] | tuple[float, ...] | None = None
    stage_positions: str | None = None
    auto_margin: float | None = None

    def __post_init__(self) -> None:
        _check_choice("reduction", self.reduction, PIPELINES)
        _check_choice("apply", self.apply, APPLY_MODES)
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("text", self.text, TEXT_SOURCES)
        _check_choice("order", self.order, ORDERS)
        for name, low in (("simignore_start", 0), ("simignore_step", 1), ("seed", 0), ("fastv_layer", 1)):
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.text_bos, bool):
            raise ValueError(f"text_bos must be true or false, got {self.text_bos!r}")

        self._check_vision()
        self._check_dart()
        self._check_visiondrop()
        if self.pre_llm is None and self.vision is None and not self.dart:
            if self.keep is not None and self.ignore is not None:
                raise ValueError(f"give one of keep and ignore, not both (keep={self.keep}, ignore={self.ignore})")
        elif self.pre_llm is not None and (self.keep is None) == (self.ignore is None):
            raise ValueError(
                f"reduction={self.reduction} needs exactly one of keep=N (or a fraction keep=0.25) and ignore=N "
                f"for its {self.pre_llm} stage, got keep={self.keep}, ignore={self.ignore}"
            )
        if not self.reduces and (self.keep is not None or self.ignore is not None):
            raise ValueError("keep/ignore have no effect with reduction=none; drop them or choose a reduction")
        if self.adaptive:
            self._check_adaptive()
        else:
            if self.auto_margin is not None:
                raise ValueError(f"auto_margin applies to keep=auto only, not keep={self.keep}")
            _check_count_or_fraction("keep", self.keep)
        _check_count("ignore", self.ignore)

        fastv_budgets = {
            name: value
            for name, value in (("fastv_keep", self.fastv_keep), ("fastv_ratio", self.fastv_ratio))
            if value is not None
        }
        if not self.fastv and fastv_budgets:
            raise ValueError(f"{', '.join(fastv_budgets)} only apply to reduction=fastv or <stage>+fastv, not {self.reduction}")
        if self.fastv and self.pre_llm is None and (self.keep is not None or self.ignore is not None) and fastv_budgets:
            raise ValueError(
                f"reduction=fastv got two budgets (keep/ignore and {', '.join(fastv_budgets)}); give one"
            )
        if len(fastv_budgets) > 1:
            raise ValueError(f"give one of fastv_keep and fastv_ratio, not both ({fastv_budgets})")
        _check_count_or_fraction("fastv_keep", self.fastv_keep)
        if self.fastv_ratio is not None and (
            _is_bool(self.fastv_ratio) or not isinstance(self.fastv_ratio, (int, float)) or not 0 <= self.fastv_ratio <= 1
        ):
            raise ValueError(f"fastv_ratio must be a fraction in [0, 1] of image tokens to drop, got {self.fastv_ratio!r}")

        self._check_pdrop()
        if self.stage_positions is not None:
            _check_choice("stage_positions", self.stage_positions, STAGE_POSITIONS)
            if self.in_llm is None:
                raise ValueError(f"stage_positions applies to a stage inside the language model ({', '.join(IN_LLM_STAGES)}); "
                                 f"reduction={self.reduction} has none")
        if self.apply == "mask" and self.vision is not None:
            raise ValueError(f"apply=mask cannot express {self.vision}: it merges image tokens into new ones, which only "
                             f"apply=drop can place in the sequence")
        if self.apply == "mask" and self.pre_llm is None and self.reduces:
            raise ValueError(f"apply=mask applies to a pre-LLM stage (simignore, random); reduction={self.reduction} has none")
        defaults = ReductionSettings.__dataclass_fields__
        simignore_only = ("similarity", "text", "text_bos", "order", "simignore_start", "simignore_step")
        if self.pre_llm != "simignore":
            changed = [name for name in simignore_only if getattr(self, name) != defaults[name].default]
            if changed:
                raise ValueError(
                    f"{', '.join(f'{name}={getattr(self, name)}' for name in changed)} only affect simignore; "
                    f"reduction={self.reduction} has no simignore stage"
                )

    def _check_adaptive(self) -> None:
        if self.reduction != "simignore":
            raise ValueError(f"keep=auto is Simignore's adaptive budget (from each image's similarity scores): it needs "
                             f"reduction=simignore alone, got reduction={self.reduction}")
        if self.order != "unimportant" or self.uses_walk:
            raise ValueError("keep=auto keeps the tokens closest to the text: it takes neither order= nor the published walk")
        margin = self.margin
        if _is_bool(margin) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"auto_margin must be a non-negative number (a cosine-similarity margin), got {self.auto_margin!r}")

    def _check_dart(self) -> None:
        given = [name for name in ("dart_layer", "dart_pivots") if getattr(self, name) is not None]
        if not self.dart:
            if given:
                raise ValueError(f"{', '.join(given)} only apply to reduction=dart, not {self.reduction}")
            return
        if (self.keep is None) == (self.ignore is None):
            raise ValueError(f"reduction=dart needs exactly one of keep=N (or a fraction keep=0.25) and ignore=N, got "
                             f"keep={self.keep}, ignore={self.ignore}")
        for name, low in (("dart_layer", 1), ("dart_pivots", 1)):
            value = getattr(self, name)
            if value is not None and (_is_bool(value) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def _check_visiondrop(self) -> None:
        given = [name for name in ("visiondrop_schedule", "visiondrop_layers") if getattr(self, name) is not None]
        if self.reduction != "visiondrop":
            if given:
                raise ValueError(f"{', '.join(given)} only apply to reduction=visiondrop, not {self.reduction}")
            return
        if self.keep is not None and self.visiondrop_schedule is not None:
            raise ValueError("reduction=visiondrop takes keep=N (the published schedule scaled to an average of N) or "
                             "visiondrop_schedule=, not both")
        if self.visiondrop_schedule is not None:
            object.__setattr__(self, "visiondrop_schedule", _parse_schedule(self.visiondrop_schedule))
        if self.visiondrop_layers is not None:
            object.__setattr__(self, "visiondrop_layers", _parse_layers("visiondrop_layers", self.visiondrop_layers))

    def _check_vision(self) -> None:
        given = {name: getattr(self, name) for name in ("dominant", "contextual") if getattr(self, name) is not None}
        if self.reduction == "visiondrop":
            if given or self.ignore is not None:
                raise ValueError("reduction=visiondrop is budgeted by keep=N or visiondrop_schedule=, not "
                                 f"{', '.join([*given, *(['ignore'] if self.ignore is not None else [])])}")
            return
        if self.vision is None:
            if given:
                raise ValueError(f"{', '.join(given)} only apply to reduction=visionzip, not {self.reduction}")
            return
        if self.ignore is not None:
            raise ValueError(f"reduction={self.reduction} is budgeted by keep=N (or dominant= and contextual=), not ignore")
        if given and (len(given) != 2 or self.keep is not None):
            raise ValueError(f"reduction={self.reduction} needs either keep=N or both dominant= and contextual=; got "
                             f"keep={self.keep}, dominant={self.dominant}, contextual={self.contextual}")
        if not given and self.keep is None:
            raise ValueError(f"reduction={self.reduction} needs a budget: keep=N (split as VisionZip's 54 + 10 of 64) or "
                             f"dominant= and contextual=")
        if given:
            if _is_bool(self.dominant) or not isinstance(self.dominant, int) or self.dominant < 1:
                raise ValueError(f"dominant must be an integer >= 1 (the CLS token counts), got {self.dominant!r}")
            _check_count("contextual", self.contextual)

    def _check_pdrop(self) -> None:
        given = [name for name in ("pdrop_layers", "pdrop_ratio") if getattr(self, name) is not None]
        if not self.pdrop:
            if given:
                raise ValueError(f"{', '.join(given)} only apply to reduction=pdrop or <stage>+pdrop, not {self.reduction}")
            return
        if self.pre_llm is None and self.vision is None and (self.keep is not None or self.ignore is not None):
            raise ValueError("reduction=pdrop is budgeted by pdrop_ratio (the fraction each stage keeps); keep/ignore "
                             "belong to a pre-LLM stage (simignore+pdrop, random+pdrop)")
        ratio = self.pdrop_ratio
        if ratio is not None and (_is_bool(ratio) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"pdrop_ratio must be a fraction in (0, 1] of the remaining image tokens to keep, got {ratio!r}")
        if self.pdrop_layers is not None:
            object.__setattr__(self, "pdrop_layers", _parse_layers("pdrop_layers", self.pdrop_layers))

    # -- the pipeline --------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[str, ...]:
        return () if self.reduction == "none" else tuple(self.reduction.split("+"))

    @property
    def reduces(self) -> bool:
        return bool(self.stages)

    @property
    def vision(self) -> str | None:
        """The stage that acts in the vision tower ("visionzip"), if any."""
        return next((stage for stage in self.stages if stage in VISION_STAGES), None)

    @property
    def pre_llm(self) -> str | None:
        """The stage that acts before the language model ("simignore" / "random"), if any."""
        return next((stage for stage in self.stages if stage in PRE_LLM_STAGES), None)

    @property
    def fastv(self) -> bool:
        return "fastv" in self.stages

    @property
    def pdrop(self) -> bool:
        return "pdrop" in self.stages

    @property
    def dart(self) -> bool:
        return "dart" in self.stages

    @property
    def prune_rule(self) -> str:
        """How the in-LLM stage ranks image tokens (`engine.LanguageModelRun`): "dart", "visiondrop" or "attention"."""
        return "dart" if self.dart else "visiondrop" if self.reduction == "visiondrop" else "attention"

    @property
    def dart_pivot_count(self) -> int:
        return DART_PIVOTS if self.dart_pivots is None else self.dart_pivots

    @property
    def positions_after_stages(self) -> str:
        """`stage_positions`, or the method's own: "repacked" for PyramidDrop and VisionDrop, else "original"."""
        if self.stage_positions is not None:
            return self.stage_positions
        return "repacked" if self.pdrop or self.reduction == "visiondrop" else "original"

    def in_llm_options(self) -> dict:
        """How `engine.LanguageModelRun` prunes, besides the stages themselves (`in_llm_stages`)."""
        return {"prune_rule": self.prune_rule, "dart_pivots": self.dart_pivot_count, "merge_counts": self.merge_counts(),
                "stage_positions": self.positions_after_stages}

    @property
    def in_llm(self) -> str | None:
        """The stage that prunes inside the language model ("fastv" / "pdrop"), if any."""
        return next((stage for stage in self.stages if stage in IN_LLM_STAGES), None)

    @property
    def uses_walk(self) -> bool:
        """Whether simignore ranks by the published walk over sorted pairs instead of each token's best similarity."""
        return (self.simignore_start, self.simignore_step) != (0, 1)

    @property
    def adaptive(self) -> bool:
        """keep=auto: the number of kept tokens is chosen per image."""
        return self.keep == "auto"

    @property
    def margin(self) -> float:
        return AUTO_MARGIN if self.auto_margin is None else self.auto_margin

    # -- budgets -------------------------------------------------------------------------------------
    def kept_per_image(self, image_tokens: int) -> int:
        """Image tokens per image the LLM sees before any in-LLM stage (all of them without a pre-LLM or vision stage;
        with keep=auto, the most it may keep: each image's own count is observed)."""
        if self.adaptive:
            return image_tokens
        if self.vision is not None:
            return sum(self.vision_budget(image_tokens))
        if self.pre_llm is None:
            return image_tokens
        return _resolve_budget("keep", self.keep, "ignore", self.ignore, image_tokens)

    def visiondrop_schedule_resolved(self) -> tuple[tuple[int, int], ...]:
        """VisionDrop's ((dominant, contextual) of the vision stage, then of each LLM stage)."""
        if self.visiondrop_schedule is not None:
            return tuple(self.visiondrop_schedule)
        if self.keep is not None:
            if isinstance(self.keep, float):
                raise ValueError("reduction=visiondrop takes keep=N as an average number of image tokens per layer, not a fraction")
            return scaled_schedule(self.keep)
        return VISIONDROP_SCHEDULE

    def merge_counts(self) -> tuple[int, ...]:
        """Contextual (merged) tokens per image made by each in-LLM stage (VisionDrop); () for the other methods."""
        return tuple(contextual for _, contextual in self.visiondrop_schedule_resolved()[1:]) if self.reduction == "visiondrop" else ()

    def vision_budget(self, image_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) tokens per image of the vision stage; together at most the model's image tokens."""
        if self.vision is None:
            raise ValueError(f"reduction={self.reduction} has no vision-side stage")
        if self.reduction == "visiondrop":
            dominant, contextual = self.visiondrop_schedule_resolved()[0]
        elif self.keep is not None:
            dominant, contextual = split_budget(_resolve_budget("keep", self.keep, "", None, image_tokens))
        else:
            dominant, contextual = self.dominant, self.contextual
        if dominant + contextual > image_tokens:
            raise ValueError(f"visionzip keeps dominant={dominant} + contextual={contextual} tokens per image, more than "
                             f"the model's {image_tokens} image tokens")
        return dominant, contextual

    def fastv_kept_per_image(self, image_tokens: int) -> int:
        """Image tokens per image FastV keeps for layers >= fastv_layer."""
        if not self.fastv:
            raise ValueError(f"reduction={self.reduction} has no fastv stage")
        if self.fastv_keep is not None:
            kept = _resolve_budget("fastv_keep", self.fastv_keep, "", None, image_tokens)
        elif self.pre_llm is None and self.vision is None and (self.keep is not None or self.ignore is not None):
            kept = _resolve_budget("keep", self.keep, "ignore", self.ignore, image_tokens)
        else:
            ratio = DEFAULT_FASTV_RATIO if self.fastv_ratio is None else float(self.fastv_ratio)
            kept = _round_half_up((1 - ratio) * image_tokens)
        available = self.kept_per_image(image_tokens)
        if kept > available:
            raise ValueError(
                f"fastv keeps {kept} image tokens per image but only {available} of the model's {image_tokens} "
                f"are left by {self.pre_llm} (keep={self.keep}, ignore={self.ignore}); lower fastv_keep or raise keep"
            )
        return kept

    @property
    def dart_stage_layer(self) -> int:
        return DART_LAYER if self.dart_layer is None else self.dart_layer

    def visiondrop_stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """VisionDrop's LLM stage layers: `visiondrop_layers`, or a quarter, a half and three quarters of the depth."""
        if self.visiondrop_layers is not None:
            return _resolve_layers("visiondrop_layers", self.visiondrop_layers, num_layers)
        return _depth_layers(num_layers)

    def pdrop_stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """PyramidDrop's stage layers: `pdrop_layers`, or a quarter, a half and three quarters of the depth
        (8/16/24 of 32; 1/2 of 3), those inside [1, num_layers - 1]."""
        if self.pdrop_layers is not None:
            return _resolve_layers("pdrop_layers", self.pdrop_layers, num_layers)
        return _depth_layers(num_layers)

    def in_llm_stages(self, image_tokens: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        """((layer, image tokens kept per image from that layer on), ...) of the in-LLM stage; () without one."""
        self.check_layers(num_layers)
        if self.fastv:
            return ((self.fastv_layer, self.fastv_kept_per_image(image_tokens)),)
        if self.dart:
            return ((self.dart_stage_layer, _resolve_budget("keep", self.keep, "ignore", self.ignore, image_tokens)),)
        if self.reduction == "visiondrop":
            schedule, layers = self.visiondrop_schedule_resolved(), self.visiondrop_stage_layers(num_layers)
            if len(layers) != len(schedule) - 1:
                raise ValueError(f"visiondrop has {len(schedule) - 1} LLM stages in its schedule "
                                 f"({'/'.join(f'{d}+{c}' for d, c in schedule)}) but {len(layers)} stage layers "
                                 f"({'/'.join(map(str, layers))}); give as many of each")
            return tuple((layer, dominant + contextual) for layer, (dominant, contextual) in zip(layers, schedule[1:]))
        if not self.pdrop:
            return ()
        ratio = DEFAULT_PDROP_RATIO if self.pdrop_ratio is None else float(self.pdrop_ratio)
        stages, remaining = [], self.kept_per_image(image_tokens)
        for layer in self.pdrop_stage_layers(num_layers):
            remaining = _round_half_up(ratio * remaining)
            stages.append((layer, remaining))
        return tuple(stages)

    def visible_per_layer(self, image_tokens: int, num_layers: int) -> list[int]:
        """Image tokens per image visible to each decoder layer (the budget that "N tokens" means, layer by layer)."""
        visible = [self.kept_per_image(image_tokens)] * num_layers
        for layer, keep in self.in_llm_stages(image_tokens, num_layers):
            visible[layer:] = [keep] * (num_layers - layer)
        return visible

    def computed_per_layer(self, image_tokens: int, num_layers: int) -> list[int]:
        """Image tokens per image each decoder layer computes on: the visible ones, except that `apply=mask`
        leaves the hidden tokens in the sequence (attended to by nobody, still computed) until the first in-LLM
        stage drops."""
        visible = self.visible_per_layer(image_tokens, num_layers)
        if self.pre_llm is None or self.apply != "mask":
            return visible
        stages = self.in_llm_stages(image_tokens, num_layers)
        masked_layers = stages[0][0] if stages else num_layers
        return [image_tokens] * masked_layers + visible[masked_layers:]

    def check_layers(self, num_layers: int) -> None:
        """An in-LLM stage's layer must leave at least one layer before and after it."""
        if self.fastv and not 1 <= self.fastv_layer < num_layers:
            raise ValueError(
                f"fastv_layer={self.fastv_layer} is outside the language model's layers: it has {num_layers} "
                f"decoder layers, so fastv_layer must be in [1, {num_layers - 1}]"
            )
        if self.dart and not 1 <= self.dart_stage_layer < num_layers:
            raise ValueError(
                f"dart_layer={self.dart_stage_layer} is outside the language model's layers: it has {num_layers} "
                f"decoder layers, so dart_layer must be in [1, {num_layers - 1}]"
            )
        if self.reduction == "visiondrop":
            layers = self.visiondrop_stage_layers(num_layers)
            if not layers or layers[-1] >= num_layers:
                raise ValueError(f"visiondrop_layers={'/'.join(map(str, layers))} must be decoder layers in [1, {num_layers - 1}] "
                                 f"(the model has {num_layers})")
        if self.pdrop:
            layers = self.pdrop_stage_layers(num_layers)
            if not layers:
                raise ValueError(f"pdrop needs a decoder layer between the first and the last; the model has {num_layers}")
            if layers[-1] >= num_layers:
                raise ValueError(f"pdrop_layers={'/'.join(map(str, layers))} is outside the language model's layers: it has "
                                 f"{num_layers} decoder layers, so each stage must be in [1, {num_layers - 1}]")


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _depth_layers(num_layers: int) -> tuple[int, ...]:
    """A quarter, a half and three quarters of the decoder depth (8/16/24 of 32; 1/2/3 of 4; 1/2 of 3)."""
    return tuple(sorted({layer for layer in (_round_half_up(depth * num_layers) for depth in PDROP_DEPTHS) if 1 <= layer < num_layers}))


def _parse_layers(name: str, given) -> tuple[int, ...] | tuple[float, ...]:
    """'8/16/24' (or an int, or a tuple) -> (8, 16, 24), increasing decoder layers >= 1; '0.25/0.5/0.75' -> (0.25, 0.5,
    0.75), increasing fractions of the depth in (0, 1) (resolved per model by `_resolve_layers`)."""
    layers = given
    if isinstance(layers, (int, float)) and not _is_bool(layers):
        layers = (layers,)
    elif isinstance(layers, str):
        try:
            layers = tuple(float(part) if "." in part else int(part) for part in layers.split("/"))
        except ValueError:
            layers = None
    valid = isinstance(layers, (tuple, list)) and bool(layers) and list(layers) == sorted(set(layers)) and (
        all(isinstance(x, int) and not _is_bool(x) and x >= 1 for x in layers)
        or all(isinstance(x, float) and 0 < x < 1 for x in layers))
    if not valid:
        raise ValueError(f"{name} must be increasing decoder layers >= 1 separated by '/', e.g. 8/16/24, or increasing "
                         f"fractions of the depth, e.g. 0.25/0.5/0.75; got {given!r}")
    return tuple(layers)


def _resolve_layers(name: str, layers: tuple, num_layers: int) -> tuple[int, ...]:
    """Layers as given, or fractions of the depth as layers: round half up, at least 1 (0.25/0.5/0.75 of 32 -> 8/16/24,
    of 6 -> 2/3/5); refuses fractions that land on the same layer."""
    if all(isinstance(x, int) for x in layers):
        return tuple(layers)
    resolved = tuple(max(1, _round_half_up(fraction * num_layers)) for fraction in layers)
    if list(resolved) != sorted(set(resolved)):
        raise ValueError(f"{name}={'/'.join(map(str, layers))} gives layers {'/'.join(map(str, resolved))} on this "
                         f"{num_layers}-layer language model; each stage needs its own layer")
    return resolved


def _parse_schedule(schedule) -> tuple[tuple[int, int], ...]:
    """'42+6/30+5/22+4/16+3' -> ((42, 6), (30, 5), (22, 4), (16, 3)): at least two stages, dominant >= 1, contextual
    >= 0, and no stage keeping more than the one before."""
    try:
        stages = tuple(tuple(int(x) for x in part.split("+")) for part in schedule.split("/")) if isinstance(schedule, str) \
            else tuple(tuple(part) for part in schedule)
    except (ValueError, TypeError, AttributeError):
        stages = ()
    totals = [sum(stage) for stage in stages]
    if len(stages) < 2 or any(len(stage) != 2 or stage[0] < 1 or stage[1] < 0 for stage in stages) \
            or totals != sorted(totals, reverse=True):
        raise ValueError(f"visiondrop_schedule must be dominant+contextual per stage, the vision stage first, each stage "
                         f"keeping at most what the one before kept, e.g. 42+6/30+5/22+4/16+3; got {schedule!r}")
    return stages


def _resolve_budget(keep_name: str, keep, ignore_name: str, ignore, image_tokens: int) -> int:
    if ignore is not None:
        if ignore > image_tokens:
            raise ValueError(f"{ignore_name}={ignore} exceeds the model's {image_tokens} image tokens per image")
        return image_tokens - int(ignore)
    if isinstance(keep, float):
        return _round_half_up(keep * image_tokens)
    if keep > image_tokens:
        raise ValueError(f"{keep_name}={keep} exceeds the model's {image_tokens} image tokens per image")
    return int(keep)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_count(name: str, value) -> None:
    if value is not None and (_is_bool(value) or not _is_whole(value) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer number of image tokens, got {value!r}")


def _check_count_or_fraction(name: str, value) -> None:
    if value is None:
        return
    if _is_bool(value) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer count or a fraction in [0, 1], got {value!r}")
    if isinstance(value, float) and value > 1:
        raise ValueError(
            f"{name}={value} is a float above 1: use an integer for a token count ({name}=452) "
            f"or a fraction in [0, 1] ({name}=0.25)"
        )


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
