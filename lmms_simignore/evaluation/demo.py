"""The offline main job: the shipped shapes model through the real lmms-eval CLI, once per reduction.

It generates the model card's held-out split of the shapes benchmark (seed 10000; the first
`num_questions` of its 1000 questions), evaluates `shipped:shapes-llava` for `none` and every
reduction at 50%, 25% and 12.5% of its 64 image tokens (PyramidDrop with its defaults), and prints accuracy per question type and per
object count with the image tokens each decoder layer saw. The CI accuracy regression runs the same
rows on the same split (see `lmms_simignore.evaluation.regression`).
"""

from __future__ import annotations

from pathlib import Path

from lmms_simignore.engine.accounting import layer_runs
from lmms_simignore.evaluation.leaderboard import line_styles
from lmms_simignore.evaluation.sweep import SweepConfig, SweepRow, run_sweep
from lmms_simignore.markdown import table
from lmms_simignore.methods.base import IN_LLM
from lmms_simignore.methods.registry import METHODS
from lmms_simignore.testbed.shapes import HELD_OUT_SEED, MAX_OBJECTS, QUESTION_TYPES

MODEL = "shipped:shapes-llava"
TASK = "shapes_heldout"
HELD_OUT_QUESTIONS = 1000

IMAGE_TOKENS = 64
BUDGETS = (32, 16, 8)  # 50%, 25% and 12.5% of the image tokens (the peers' 192/128/64 of 576 are 33/22/11%)
FASTV_LAYER = 2  # of the model's 4 decoder layers


def _rows() -> tuple[tuple[str, dict], ...]:
    rows = [("none", {"reduction": "none"})]
    for keep in BUDGETS:
        rows += [(f"simignore_{keep}", {"reduction": "simignore", "keep": keep}),
                 (f"random_{keep}", {"reduction": "random", "keep": keep}),
                 (f"visionzip_{keep}", {"reduction": "visionzip", "keep": keep}),
                 (f"fastv_{keep}", {"reduction": "fastv", "fastv_layer": FASTV_LAYER, "fastv_keep": keep}),
                 (f"dart_{keep}", {"reduction": "dart", "dart_layer": FASTV_LAYER, "keep": keep}),
                 (f"visiondrop_{keep}", {"reduction": "visiondrop", "keep": keep}),
                 (f"divprune_{keep}", {"reduction": "divprune", "keep": keep}),
                 (f"vispruner_{keep}", {"reduction": "vispruner", "keep": keep}),
                 (f"prumerge_plus_{keep}", {"reduction": "prumerge_plus", "keep": keep}),
                 (f"sparsevlm_{keep}", {"reduction": "sparsevlm", "keep": keep})]
    rows += [
        ("pdrop", {"reduction": "pdrop"}),
        ("simignore_16_prompt", {"reduction": "simignore", "keep": 16, "text": "prompt"}),
        ("simignore_16_mask", {"reduction": "simignore", "keep": 16, "apply": "mask"}),
        ("simignore_32+fastv_8", {"reduction": "simignore+fastv", "keep": 32, "fastv_layer": FASTV_LAYER, "fastv_keep": 8}),
        ("random_32+fastv_8", {"reduction": "random+fastv", "keep": 32, "fastv_layer": FASTV_LAYER, "fastv_keep": 8}),
        ("pool_16", {"reduction": "pool", "keep": 16}),  # the 8 x 8 grid pooled 2 x 2
        ("pool_4", {"reduction": "pool", "keep": 4}),  # and 4 x 4
    ]
    return tuple(rows)


# none; Simignore, random, VisionZip (in the vision tower), FastV and DART (both from layer 2 of 4) at each budget,
# VisionDrop at each budget as its average over layers (its published schedule scaled), DivPrune (projector outputs),
# VisPruner and PruMerge+ (its fixed budget; both in the vision tower) at each budget, SparseVLM (its schedule for the
# budget, scaled from its 64-token one; inside the LLM);
# PyramidDrop with its defaults (64 -> 32 -> 16 -> 8 over layers 0-3); Simignore comparing with the whole prompt,
# and applied as an attention mask (must answer as dropping does); two stacked rows; pooling at 16 and 4 (the whole
# strides of the 8 x 8 grid).
DEMO_ROWS = _rows()


def demo_config(num_questions: int, batch_size: int = 32) -> SweepConfig:
    """The demo rows on the first `num_questions` held-out questions (the sweep generates that split)."""
    return SweepConfig(
        name="shapes testbed",
        model="llava_simignore",
        tasks=TASK,
        batch_size=batch_size,
        model_args={"pretrained": MODEL},
        rows=tuple(SweepRow(name, model_args) for name, model_args in DEMO_ROWS),
        overrides={},
        shapes_task={"name": TASK, "questions": num_questions, "seed": HELD_OUT_SEED},
    )


def run_demo(workdir: str | Path, num_questions: int = HELD_OUT_QUESTIONS, batch_size: int = 32, echo=print) -> list[dict]:
    """Generate the split, run every row through lmms-eval (finished rows are reused), print and save the tables."""
    if not 1 <= num_questions <= HELD_OUT_QUESTIONS:
        raise ValueError(f"num_questions must be in 1..{HELD_OUT_QUESTIONS} (a prefix of the held-out split); got {num_questions}")
    runs_dir = Path(workdir).resolve() / f"n{num_questions}" / "runs"
    config = demo_config(num_questions, batch_size)
    echo(f"Offline demo: {MODEL} on {TASK} ({num_questions} held-out questions, seed {HELD_OUT_SEED}), "
         f"{len(config.rows)} lmms-eval runs")
    summaries = run_sweep(config, runs_dir, echo=echo, show_table=False)
    tables = f"{per_type_table(summaries)}\n\n{per_count_table(summaries)}\n\n{curve_table(summaries)}"
    (runs_dir / "tables.md").write_text(tables + "\n")
    plot_curve(summaries, runs_dir / "curve.png")
    echo(f"\nAccuracy per question type (chance: colour 0.25, shape 0.33, exists 0.5, count 0.17, spatial 0.5)\n\n{tables}")
    mask, drop = (next(s for s in summaries if s["name"] == name)["answers"][TASK] for name in ("simignore_16_mask", "simignore_16"))
    echo(f"\nthe accuracy-retained tokens curve: {runs_dir / 'curve.png'}")
    echo(f"\nmask vs drop at keep 16: {sum(a == b for a, b in zip(mask, drop))}/{len(drop)} identical answers (they must all agree)")
    return summaries


def _cell(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.3f}" if name in metrics else "-"


def per_type_table(summaries: list[dict], task: str = TASK) -> str:
    """Markdown: overall and per-type accuracy, image tokens per decoder layer, answers equal to the first row."""
    header = ["row", "overall", *QUESTION_TYPES, "image tokens per layer", "mean", "answers = " + summaries[0]["name"]]
    body = []
    reference = summaries[0]["answers"][task]
    for summary in summaries:
        metrics = summary["all_metrics"][task]
        same = sum(a == b for a, b in zip(summary["answers"][task], reference))
        cells = [summary["name"], _cell(metrics, "exact_match"), *(_cell(metrics, f"acc_{t}") for t in QUESTION_TYPES)]
        cells += [layer_runs([round(v, 1) for v in summary["visible_per_layer"]]), f"{summary['mean_visible']:.1f}", f"{same}/{len(reference)}"]
        body.append(cells)
    return table(header, body, align="l" + "r" * (len(QUESTION_TYPES) + 1) + "lrr")


def per_count_table(summaries: list[dict], task: str = TASK) -> str:
    """Markdown: accuracy by the number of objects in the image (the benchmark's difficulty axis)."""
    counts = range(1, MAX_OBJECTS + 1)
    header = ["row", *(f"{n} object{'s' * (n > 1)}" for n in counts)]
    body = [[summary["name"], *(_cell(summary["all_metrics"][task], f"acc_objects_{n}") for n in counts)] for summary in summaries]
    return table(header, body, align="l" + "r" * len(counts))


def _curve_rows(summaries: list[dict]) -> list[tuple[str, int, dict]]:
    """(method, retained image tokens, summary) of every row named `method_keep` after a registered method."""
    found = []
    for summary in summaries:
        method, _, keep = summary["name"].rpartition("_")
        if method in METHODS and keep.isdigit():
            found.append((method, int(keep), summary))
    return found


def curve_budgets(summaries: list[dict]) -> list[int]:
    """The budgets some method's row is named after, largest first."""
    return sorted({keep for _, keep, _ in _curve_rows(summaries)}, reverse=True)


def curve(summaries: list[dict], task: str = TASK) -> dict[str, list[tuple[int, float]]]:
    """Accuracy per method at each budget, [(retained image tokens, exact_match)], from rows named `method_keep`."""
    points: dict[str, list[tuple[int, float]]] = {}
    for method, keep, summary in _curve_rows(summaries):
        points.setdefault(method, []).append((keep, summary["all_metrics"][task]["exact_match"]))
    return {method: sorted(values) for method, values in points.items()}


def kept_from_a_layer(method: str) -> bool:
    """Whether the method's budget holds from a decoder layer on (all image tokens before it): it acts inside the LLM only."""
    return METHODS[method].places == (IN_LLM,)


def curve_label(method: str, rows: list[dict]) -> str:
    """The method's name in the curve's legend; for a method inside the LLM, the layer from which its budget holds (all
    image tokens before it), counted from its rows' tokens per layer, and whether the budget names a schedule."""
    if not kept_from_a_layer(method):
        return method
    seen = [[int(count) for count in row["visible_per_layer"]] for row in rows]
    first = min(next((layer for layer, count in enumerate(counts) if count < IMAGE_TOKENS), len(counts)) for counts in seen)
    schedule = any(len(set(counts[first:])) > 1 for counts in seen)
    return f"{method} ({'its schedule ' if schedule else ''}from layer {first}; all {IMAGE_TOKENS} before)"


def curve_table(summaries: list[dict], task: str = TASK) -> str:
    """Markdown: overall accuracy of each method at each budget of the rows (share of the image tokens), and `none`."""
    none = next(s for s in summaries if s["name"] == "none")["all_metrics"][task]["exact_match"]
    budgets = curve_budgets(summaries)
    header = ["method", *(f"{keep} of {IMAGE_TOKENS} ({keep / IMAGE_TOKENS:.1%})" for keep in budgets)]
    body = [[method, *(f"{dict(points)[keep]:.3f}" if keep in dict(points) else "-" for keep in budgets)]
            for method, points in curve(summaries, task).items()]
    body.append([f"none (all {IMAGE_TOKENS})", *(f"{none:.3f}" for _ in budgets)])
    return table(header, body, align="l" + "r" * len(budgets))


def plot_curve(summaries: list[dict], path: Path, task: str = TASK) -> None:
    """Accuracy against the share of image tokens kept (FastV, DART: kept after their layer), `none` dashed, chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmms_simignore.testbed.shapes import OPTIONS

    figure, axis = plt.subplots(figsize=(9, 4.2), constrained_layout=True)
    methods = {method: points for method, points in curve(summaries, task).items() if points}
    for (method, points), (colour, marker) in zip(methods.items(), line_styles(len(methods))):
        label = curve_label(method, [summary for name, _, summary in _curve_rows(summaries) if name == method])
        axis.plot([100 * keep / IMAGE_TOKENS for keep, _ in points], [value for _, value in points], marker=marker,
                  color=colour, label=label)
    none = next(s for s in summaries if s["name"] == "none")["all_metrics"][task]["exact_match"]
    axis.axhline(none, linestyle="--", color="grey", linewidth=1, label=f"none (all {IMAGE_TOKENS} tokens)")
    chance = sum(1 / len(options) for options in OPTIONS.values()) / len(OPTIONS)
    axis.axhline(chance, linestyle=":", color="black", linewidth=1, label="chance")
    axis.set_xscale("log", base=2)
    budgets = curve_budgets(summaries)
    axis.set_xticks([100 * keep / IMAGE_TOKENS for keep in budgets], [f"{100 * keep / IMAGE_TOKENS:g}%" for keep in budgets])
    axis.set_xlabel(f"image tokens kept (of {IMAGE_TOKENS})")
    axis.set_ylabel("accuracy (held-out shapes questions)")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot: no line hidden
    figure.savefig(path, dpi=120)
    plt.close(figure)
