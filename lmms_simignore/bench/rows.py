"""What the speed benchmark times: its rows (none and every method at 50% and 25% of the image tokens) and budgets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from lmms_simignore.methods.base import CLS_ATTENTION, CLS_TOKEN
from lmms_simignore.methods.pool import valid_budgets
from lmms_simignore.settings import Plan, ReductionSettings, parse_pipeline

FRACTIONS = (0.5, 0.25)  # of each image's tokens


@dataclass(frozen=True)
class BenchRow:
    name: str
    settings: ReductionSettings


def bench_fastv_layer(num_layers: int) -> int:
    """FastV's layer in the benchmarks: 2 (its paper's K), or 1 for models too shallow for that."""
    return 2 if num_layers > 2 else 1


def kept_tokens(image_tokens: int, fraction: float) -> int:
    """The benchmarks' budget: `fraction` of the image tokens, at least one."""
    return max(1, round(image_tokens * fraction))


def _method_arguments(percent: int, keep: int | float, fastv_layer: int) -> dict[str, dict]:
    """Every method but pooling at the budget `keep` (a count, or a fraction of each image's tokens): row name
    `..._{percent}` -> its `ReductionSettings` arguments."""
    return {
        f"simignore_drop_{percent}": {"reduction": "simignore", "keep": keep, "apply": "drop"},
        f"simignore_mask_{percent}": {"reduction": "simignore", "keep": keep, "apply": "mask"},
        f"random_drop_{percent}": {"reduction": "random", "keep": keep, "apply": "drop"},
        f"fastv_{percent}": {"reduction": "fastv", "fastv_layer": fastv_layer, "fastv_keep": keep},
        f"visionzip_{percent}": {"reduction": "visionzip", "keep": keep},
        f"dart_{percent}": {"reduction": "dart", "dart_layer": fastv_layer, "keep": keep},
        f"visiondrop_{percent}": {"reduction": "visiondrop", "keep": keep},  # keep: its average
        f"divprune_{percent}": {"reduction": "divprune", "keep": keep},
        f"vispruner_{percent}": {"reduction": "vispruner", "keep": keep},
        f"prumerge_plus_{percent}": {"reduction": "prumerge_plus", "keep": keep},
        f"sparsevlm_{percent}": {"reduction": "sparsevlm", "keep": keep},  # keep: its schedule for it
    }


def _method_rows(percent: int, keep: int, fastv_layer: int, cls_token: bool) -> list[BenchRow]:
    """Every method but pooling at `keep` image tokens, named `..._{percent}`; without a CLS token in the tower, none of
    the methods the registry declares as ranking by its attention."""
    return [BenchRow(name, ReductionSettings(**arguments)) for name, arguments in _method_arguments(percent, keep, fastv_layer).items()
            if cls_token or not _reads_cls_attention(arguments["reduction"])]


def _reads_cls_attention(reduction: str) -> bool:
    """Whether a method of `reduction` ranks by the CLS token's attention in the tower (VisionZip, VisionDrop, PruMerge+)."""
    return any({CLS_ATTENTION, CLS_TOKEN} & set(method.needs) for method in parse_pipeline(reduction))


def bench_rows(image_tokens: int, num_layers: int, cls_token: bool = True, grid: tuple[int, int] | None = None) -> list[BenchRow]:
    """none, every method at 50% and 25% of the image tokens, PyramidDrop with its defaults (lambda 0.5 at a quarter, a
    half and three quarters of the depth) and Simignore's adaptive budget (keep=auto, margin 0.2: each image its own
    number, dropped rows padded to the largest); pooling where the budget is a whole stride of the image's `grid` (25%
    of 8 x 8 or 24 x 24: 2 x 2 windows); without a CLS token in the tower (SigLIP), no VisionZip or VisionDrop rows (they
    rank by the CLS token's attention)."""
    fastv_layer = bench_fastv_layer(num_layers)
    rows = [BenchRow("none", ReductionSettings())]
    for fraction in FRACTIONS:
        keep = kept_tokens(image_tokens, fraction)
        rows += _method_rows(int(fraction * 100), keep, fastv_layer, cls_token)
        if grid is not None and keep in valid_budgets((grid,)):  # pooling needs a whole stride of the image's grid
            rows.append(BenchRow(f"pool_{int(fraction * 100)}", ReductionSettings(reduction="pool", keep=keep)))
    return rows + [BenchRow("pdrop", ReductionSettings(reduction="pdrop")),
                   BenchRow("simignore_auto", ReductionSettings(reduction="simignore", keep="auto"))]


# where a family refuses a method's own position rule (closing up or re-packing M-RoPE positions): each kept token at its own
ORIGINAL_POSITIONS = {"divprune": ({"divprune_positions": "original"},), "sparsevlm": ({"stage_positions": "original"},)}


def per_image_bench_rows(num_layers: int, nominal_plan: Callable[[ReductionSettings], Plan]) -> list[BenchRow]:
    """The rows of a model whose images have their own sizes (Qwen-VL, LLaVA-NeXT, LLaVA-OneVision): of none, every
    method at 50% and 25% of each image's own tokens (`keep=0.5`, `0.25`: rounded half up), pooling at both (a stride
    where the fraction is 1/s²), PyramidDrop with its defaults (where the family refuses re-packing its positions, as on
    M-RoPE: each kept token at its own, `stage_positions=original`; DivPrune and SparseVLM likewise, `ORIGINAL_POSITIONS`)
    and Simignore's adaptive budget, those whose settings
    build and that the family plans for the model's largest image: `nominal_plan` (settings -> Plan; raises ValueError
    on what the family refuses, such as VisionZip without a CLS token; VisionDrop's
    settings refuse a fraction)."""
    fastv_layer = bench_fastv_layer(num_layers)
    choices: list[tuple[str, tuple[dict, ...]]] = [("none", ({},))]  # each row's settings arguments, by preference
    for fraction in FRACTIONS:
        percent = int(fraction * 100)
        choices += [(name, (arguments, *({**arguments, **own} for own in ORIGINAL_POSITIONS.get(arguments["reduction"], ()))))
                    for name, arguments in _method_arguments(percent, fraction, fastv_layer).items()]
        choices.append((f"pool_{percent}", ({"reduction": "pool", "keep": fraction},)))
    choices += [("pdrop", ({"reduction": "pdrop"}, {"reduction": "pdrop", "stage_positions": "original"})),
                ("simignore_auto", ({"reduction": "simignore", "keep": "auto"},))]
    rows = (_planned_row(name, alternatives, nominal_plan) for name, alternatives in choices)
    return [row for row in rows if row is not None]


def _planned_row(name: str, alternatives: tuple[dict, ...], nominal_plan: Callable[[ReductionSettings], Plan]) -> BenchRow | None:
    """Row `name` with the first of `alternatives` (`ReductionSettings` arguments) whose settings build and plan, or None;
    each refusal is logged with its reason."""
    for arguments in alternatives:
        try:
            settings = ReductionSettings(**arguments)
            nominal_plan(settings)
        except ValueError as error:
            logger.info(f"bench: no {name} row with {arguments}: {error}")
            continue
        return BenchRow(name, settings)
    return None
