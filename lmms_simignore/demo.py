"""The offline main job: the shipped shapes model through the real lmms-eval CLI, once per reduction.

It generates the model card's held-out split of the shapes benchmark (seed 10000; the first
`num_questions` of its 1000 questions), evaluates `shipped:shapes-llava` for `none` and every
reduction at fixed budgets of its 16 image tokens, and prints accuracy per question type and per
object count with the image tokens each decoder layer saw. The CI accuracy regression runs the same
rows on the same split (see `lmms_simignore.regression`).
"""

from __future__ import annotations

from pathlib import Path

from lmms_simignore.shapes import HELD_OUT_SEED, MAX_OBJECTS, QUESTION_TYPES
from lmms_simignore.accounting import layer_runs
from lmms_simignore.sweep import SweepConfig, SweepRow, run_sweep

MODEL = "shipped:shapes-llava"
TASK = "shapes_heldout"
HELD_OUT_QUESTIONS = 1000

# Every reduction at fixed budgets of the model's 16 image tokens (4 decoder layers; FastV after layer 2).
DEMO_ROWS = (
    ("none", {"reduction": "none"}),
    ("simignore_8", {"reduction": "simignore", "keep": 8, "apply": "drop"}),
    ("simignore_8_mask", {"reduction": "simignore", "keep": 8, "apply": "mask"}),
    ("simignore_8_prompt", {"reduction": "simignore", "keep": 8, "text": "prompt"}),
    ("random_8", {"reduction": "random", "keep": 8}),
    ("fastv_8", {"reduction": "fastv", "fastv_layer": 2, "fastv_keep": 8}),
    ("simignore_4", {"reduction": "simignore", "keep": 4}),
    ("random_4", {"reduction": "random", "keep": 4}),
    ("fastv_4", {"reduction": "fastv", "fastv_layer": 2, "fastv_keep": 4}),
    ("simignore_12+fastv_4", {"reduction": "simignore+fastv", "keep": 12, "fastv_layer": 2, "fastv_keep": 4}),
    ("random_12+fastv_4", {"reduction": "random+fastv", "keep": 12, "fastv_layer": 2, "fastv_keep": 4}),
)


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
    tables = f"{per_type_table(summaries)}\n\n{per_count_table(summaries)}"
    (runs_dir / "tables.md").write_text(tables + "\n")
    echo(f"\nAccuracy per question type (chance: colour 0.25, shape 0.33, exists 0.5, count 0.17, spatial 0.5)\n\n{tables}")
    mask, drop = (next(s for s in summaries if s["name"] == name)["answers"][TASK] for name in ("simignore_8_mask", "simignore_8"))
    echo(f"\nmask vs drop at keep 8: {sum(a == b for a, b in zip(mask, drop))}/{len(drop)} identical answers (they must all agree)")
    return summaries


def _cell(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.3f}" if name in metrics else "-"


def per_type_table(summaries: list[dict], task: str = TASK) -> str:
    """Markdown: overall and per-type accuracy, image tokens per decoder layer, answers equal to the first row."""
    header = ["row", "overall", *QUESTION_TYPES, "image tokens per layer", "mean", "answers = " + summaries[0]["name"]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(QUESTION_TYPES) + 1) + "---|---:|---:|"]
    reference = summaries[0]["answers"][task]
    for summary in summaries:
        metrics = summary["all_metrics"][task]
        same = sum(a == b for a, b in zip(summary["answers"][task], reference))
        cells = [summary["name"], _cell(metrics, "exact_match"), *(_cell(metrics, f"acc_{t}") for t in QUESTION_TYPES)]
        cells += [layer_runs([round(v, 1) for v in summary["visible_per_layer"]]), f"{summary['mean_visible']:.1f}", f"{same}/{len(reference)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_count_table(summaries: list[dict], task: str = TASK) -> str:
    """Markdown: accuracy by the number of objects in the image (the benchmark's difficulty axis)."""
    counts = range(1, MAX_OBJECTS + 1)
    lines = ["| row | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    for summary in summaries:
        metrics = summary["all_metrics"][task]
        lines.append(f"| {summary['name']} | " + " | ".join(_cell(metrics, f"acc_objects_{n}") for n in counts) + " |")
    return "\n".join(lines)
