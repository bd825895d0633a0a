"""What the speed benchmark times: its rows (none and every method at 50% and 25% of the image tokens) and budgets."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_simignore.methods.pool import valid_budgets
from lmms_simignore.settings import ReductionSettings


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


def bench_rows(image_tokens: int, num_layers: int, cls_token: bool = True, grid: tuple[int, int] | None = None) -> list[BenchRow]:
    """none, every method at 50% and 25% of the image tokens, PyramidDrop with its defaults (lambda 0.5 at a quarter, a
    half and three quarters of the depth) and Simignore's adaptive budget (keep=auto, margin 0.2: each image its own
    number, dropped rows padded to the largest); pooling where the budget is a whole stride of the image's `grid` (25%
    of 8 x 8 or 24 x 24: 2 x 2 windows); without a CLS token in the tower (SigLIP), no VisionZip or VisionDrop rows (they
    rank by the CLS token's attention)."""
    fastv_layer = bench_fastv_layer(num_layers)
    rows = [BenchRow("none", ReductionSettings())]
    for fraction in (0.5, 0.25):
        keep = kept_tokens(image_tokens, fraction)
        percent = int(fraction * 100)
        rows += [
            BenchRow(f"simignore_drop_{percent}", ReductionSettings(reduction="simignore", keep=keep, apply="drop")),
            BenchRow(f"simignore_mask_{percent}", ReductionSettings(reduction="simignore", keep=keep, apply="mask")),
            BenchRow(f"random_drop_{percent}", ReductionSettings(reduction="random", keep=keep, apply="drop")),
            BenchRow(f"fastv_{percent}", ReductionSettings(reduction="fastv", fastv_layer=fastv_layer, fastv_keep=keep)),
            BenchRow(f"visionzip_{percent}", ReductionSettings(reduction="visionzip", keep=keep)),
            BenchRow(f"dart_{percent}", ReductionSettings(reduction="dart", dart_layer=fastv_layer, keep=keep)),
            BenchRow(f"visiondrop_{percent}", ReductionSettings(reduction="visiondrop", keep=keep)),  # keep: its average
        ]
        if grid is not None and keep in valid_budgets(grid):  # pooling needs a whole stride of the image's grid
            rows.append(BenchRow(f"pool_{percent}", ReductionSettings(reduction="pool", keep=keep)))
    if not cls_token:
        rows = [row for row in rows if not row.settings.needs_cls_attention]
    return rows + [BenchRow("pdrop", ReductionSettings(reduction="pdrop")),
                   BenchRow("simignore_auto", ReductionSettings(reduction="simignore", keep="auto"))]
