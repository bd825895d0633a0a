"""What the speed benchmark times: its rows (none and every method at 50% and 25% of the image tokens) and budgets."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_simignore.methods.base import CLS_ATTENTION
from lmms_simignore.methods.pool import stride_of_fraction, valid_budgets
from lmms_simignore.settings import ReductionSettings, parse_pipeline

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


def _method_rows(percent: int, keep: int | float, fastv_layer: int, cls_token: bool) -> list[BenchRow]:
    """Every method but pooling at the budget `keep` (a count, or a fraction of each image's tokens), named `..._{percent}`;
    without a CLS token in the tower, none of the methods the registry declares as ranking by its attention."""
    arguments = {
        f"simignore_drop_{percent}": {"reduction": "simignore", "keep": keep, "apply": "drop"},
        f"simignore_mask_{percent}": {"reduction": "simignore", "keep": keep, "apply": "mask"},
        f"random_drop_{percent}": {"reduction": "random", "keep": keep, "apply": "drop"},
        f"fastv_{percent}": {"reduction": "fastv", "fastv_layer": fastv_layer, "fastv_keep": keep},
        f"visionzip_{percent}": {"reduction": "visionzip", "keep": keep},
        f"dart_{percent}": {"reduction": "dart", "dart_layer": fastv_layer, "keep": keep},
        f"visiondrop_{percent}": {"reduction": "visiondrop", "keep": keep},  # keep: its average
    }
    return [BenchRow(name, ReductionSettings(**settings)) for name, settings in arguments.items()
            if cls_token or not _reads_cls_attention(settings["reduction"])]


def _reads_cls_attention(reduction: str) -> bool:
    """Whether a method of `reduction` ranks by the CLS token's attention in the tower (VisionZip, VisionDrop)."""
    return any(CLS_ATTENTION in method.needs for method in parse_pipeline(reduction))


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
        if grid is not None and keep in valid_budgets(grid):  # pooling needs a whole stride of the image's grid
            rows.append(BenchRow(f"pool_{int(fraction * 100)}", ReductionSettings(reduction="pool", keep=keep)))
    return rows + [BenchRow("pdrop", ReductionSettings(reduction="pdrop")),
                   BenchRow("simignore_auto", ReductionSettings(reduction="simignore", keep="auto"))]


def per_image_bench_rows(num_layers: int) -> list[BenchRow]:
    """The rows of a model whose images have their own sizes and whose ViT has no CLS token (Qwen-VL): none, every
    method at 50% and 25% of each image's own tokens (`keep=0.5`, `0.25`: rounded half up), pooling where the fraction
    is 1/s² (25%: stride 2, a partial last window where 2 does not divide a side of the image's grid), PyramidDrop with
    its defaults but each kept token at its own position (`stage_positions=original`: re-packing is not defined on
    M-RoPE) and Simignore's adaptive budget; no VisionZip or VisionDrop rows."""
    fastv_layer = bench_fastv_layer(num_layers)
    rows = [BenchRow("none", ReductionSettings())]
    for fraction in FRACTIONS:
        rows += _method_rows(int(fraction * 100), fraction, fastv_layer, cls_token=False)
        if stride_of_fraction(fraction) is not None:
            rows.append(BenchRow(f"pool_{int(fraction * 100)}", ReductionSettings(reduction="pool", keep=fraction)))
    return rows + [
        BenchRow("pdrop", ReductionSettings(reduction="pdrop", stage_positions="original")),
        BenchRow("simignore_auto", ReductionSettings(reduction="simignore", keep="auto"))]
