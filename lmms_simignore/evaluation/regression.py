"""CI accuracy regression: the demo's rows on the held-out split, every prediction compared with a committed file.

    python -m lmms_simignore regression            # compare; exit 1 and list every moved prediction
    python -m lmms_simignore regression --update   # an intentional change: rewrite the expected file

Predictions of the shipped model are deterministic on CPU (greedy decoding, fixed split, fixed seeds),
so they are compared exactly; accuracies and per-layer token counts are compared too.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from lmms_simignore.evaluation.demo import DEMO_ROWS, HELD_OUT_QUESTIONS, HELD_OUT_SEED, MODEL, TASK, run_demo

REGRESSION_QUESTIONS = HELD_OUT_QUESTIONS  # the main job's whole split: lmms-eval's start-up, not the questions, dominates
UPDATE_COMMAND = "python -m lmms_simignore regression --update"


def regression_record(summaries: list[dict], num_questions: int = REGRESSION_QUESTIONS) -> dict:
    """What the expected file holds: the split, and per row its model_args, metrics, tokens per layer and answers."""
    row_args = dict(DEMO_ROWS)
    return {
        "model": MODEL,
        "task": TASK,
        "split": {"seed": HELD_OUT_SEED, "questions": num_questions},
        "update_with": UPDATE_COMMAND,
        "rows": {
            summary["name"]: {
                "model_args": row_args[summary["name"]],
                "metrics": summary["all_metrics"][TASK],
                "visible_per_layer": summary["visible_per_layer"],
                "answers": summary["answers"][TASK],
            }
            for summary in summaries
        },
    }


def dump_record(record: dict) -> str:
    """JSON with one line per row (a row holds a thousand answers), the rest indented."""
    head = json.dumps({key: value for key, value in record.items() if key != "rows"}, indent=1)
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(row)}" for name, row in record["rows"].items())
    return head[: -len("\n}")] + ',\n "rows": {\n' + rows + "\n }\n}\n"


def differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two regression records ([] when they agree)."""
    found = []
    for key in ("model", "task", "split"):
        if expected.get(key) != actual.get(key):
            found.append(f"{key}: expected {expected.get(key)!r}, got {actual.get(key)!r}")
    if list(expected["rows"]) != list(actual["rows"]):
        found.append(f"rows: expected {list(expected['rows'])}, got {list(actual['rows'])}")
    for name in expected["rows"].keys() & actual["rows"].keys():
        want, got = expected["rows"][name], actual["rows"][name]
        if want["model_args"] != got["model_args"]:
            found.append(f"{name}: model_args expected {want['model_args']}, got {got['model_args']}")
        if want["visible_per_layer"] != got["visible_per_layer"]:
            found.append(f"{name}: image tokens per layer expected {want['visible_per_layer']}, got {got['visible_per_layer']}")
        if len(want["answers"]) != len(got["answers"]):
            found.append(f"{name}: expected {len(want['answers'])} answers, got {len(got['answers'])}")
        for doc_id, (a, b) in enumerate(zip(want["answers"], got["answers"])):
            if a != b:
                found.append(f"{name}: doc {doc_id} answer expected {a!r}, got {b!r}")
        for metric in sorted(want["metrics"].keys() | got["metrics"].keys()):
            a, b = want["metrics"].get(metric), got["metrics"].get(metric)
            if a is None or b is None or not math.isclose(a, b, rel_tol=0, abs_tol=1e-9):
                found.append(f"{name}: {metric} expected {a}, got {b}")
    return found


def run_regression(expected_path: str | Path, workdir: str | Path | None = None, update: bool = False, echo=print) -> int:
    """Run the demo rows on the regression split; compare with (or, with `update`, write) the expected file.

    Returns the process exit code: 0 when everything matches (or was written), 1 otherwise.
    """
    expected_path = Path(expected_path)
    if not update and not expected_path.is_file():
        raise FileNotFoundError(f"--expected {expected_path}: no such file (create it with `{UPDATE_COMMAND}`)")
    with tempfile.TemporaryDirectory(prefix="lmms-simignore-regression-") as scratch:
        summaries = run_demo(workdir or scratch, num_questions=REGRESSION_QUESTIONS, echo=echo)
    actual = regression_record(summaries)
    if update:
        expected_path.parent.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(dump_record(actual))
        echo(f"\nwrote {expected_path}: {len(actual['rows'])} rows x {REGRESSION_QUESTIONS} predictions")
        return 0
    found = differences(json.loads(expected_path.read_text()), actual)
    return report_differences(found, expected_path, UPDATE_COMMAND,
                              f"\nregression: all {len(actual['rows'])} rows x {REGRESSION_QUESTIONS} predictions match", echo)


def report_differences(found: list[str], expected_path: Path, update_command: str, matched: str, echo=print) -> int:
    """Echo each difference from an expected file and how to update it (exit code 1), or `matched` (exit code 0)."""
    if found:
        echo(f"\n{len(found)} differences from {expected_path}:")
        for line in found:
            echo(f"  {line}")
        echo(f"If the change is intended, update the file: {update_command}")
        return 1
    echo(f"{matched} {expected_path}")
    return 0
