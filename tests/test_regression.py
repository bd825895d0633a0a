"""The README's main job and the CI accuracy regression: the shipped shapes model through the real lmms-eval CLI.

One demo run on the model card's 1000 held-out questions serves both: its tables are checked, and every row's
predictions are compared exactly with the committed expected-results file. After an intentional change:

    python -m lmms_simignore regression --update
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_simignore.evaluation.demo import DEMO_ROWS, TASK
from lmms_simignore.evaluation.regression import REGRESSION_QUESTIONS, differences, regression_record
from lmms_simignore.shipped import shipped_model_dir
from lmms_simignore.testbed.shapes import OPTIONS

EXPECTED = Path(__file__).parent / "expected" / "shapes_regression.json"


def python_m(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "lmms_simignore", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    completed = python_m("demo", "--workdir", str(workdir))  # the README's main job, as is
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    summaries = json.loads((workdir / f"n{REGRESSION_QUESTIONS}" / "runs" / "summary.json").read_text())
    return workdir, completed.stdout, summaries


def table_rows(stdout: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `header_start`, by their first cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[cells[0]] = cells[1:]
    return rows


def test_every_prediction_and_accuracy_equals_the_expected_file(demo_run):
    _, _, summaries = demo_run
    expected = json.loads(EXPECTED.read_text())
    found = differences(expected, regression_record(summaries))
    assert found == [], "\n".join(found[:40]) + "\n(intentional? python -m lmms_simignore regression --update)"


def test_main_job_reproduces_the_model_card(demo_run):
    """The `none` row equals the held-out accuracy recorded at training time, overall, per type and per object count."""
    _, _, summaries = demo_run
    metrics = next(s for s in summaries if s["name"] == "none")["all_metrics"][TASK]
    card = json.loads((shipped_model_dir("shapes-llava") / "training.json").read_text())["held_out"]
    assert metrics["exact_match"] == pytest.approx(card["overall"], abs=1e-12)
    for question_type, accuracy in card["per_type"].items():
        assert metrics[f"acc_{question_type}"] == pytest.approx(accuracy, abs=1e-12), question_type
    for count, accuracy in card["per_count"].items():
        assert metrics[f"acc_objects_{count}"] == pytest.approx(accuracy, abs=1e-12), count
    model_card = (shipped_model_dir("shapes-llava") / "README.md").read_text()
    assert f"| **overall** | **{card['overall']:.3f}** | 0.350 |" in model_card


def test_main_job_prints_accuracy_per_question_type_and_object_count(demo_run):
    _, stdout, _ = demo_run
    header = next(line for line in stdout.splitlines() if line.startswith("| row | overall"))
    assert header == "| row | overall | colour | shape | exists | count | spatial | image tokens per layer | mean | answers = none |"
    per_type = table_rows(stdout, "| row | overall")
    assert list(per_type) == [name for name, _ in DEMO_ROWS]
    assert per_type["none"][6:] == ["layers 0-3: 64", "64.0", f"{REGRESSION_QUESTIONS}/{REGRESSION_QUESTIONS}"]
    assert per_type["simignore_8"][6:8] == ["layers 0-3: 8", "8.0"]
    assert per_type["fastv_8"][6:8] == ["layers 0-1: 64, layers 2-3: 8", "36.0"]
    assert per_type["simignore_32+fastv_8"][6:8] == ["layers 0-1: 32, layers 2-3: 8", "20.0"]
    per_count = table_rows(stdout, "| row | 1 object")
    assert list(per_count) == list(per_type) and all(len(cells) == 6 for cells in per_count.values())
    assert f"mask vs drop at keep 16: {REGRESSION_QUESTIONS}/{REGRESSION_QUESTIONS} identical answers" in stdout


def test_the_unreduced_shipped_model_meets_the_testbed_bar(demo_run):
    """0.95 overall, and every question type at least three quarters of the way from chance to perfect."""
    _, _, summaries = demo_run
    metrics = next(s for s in summaries if s["name"] == "none")["all_metrics"][TASK]
    assert metrics["exact_match"] >= 0.95
    for question_type, options in OPTIONS.items():
        chance = 1 / len(options)
        assert metrics[f"acc_{question_type}"] >= chance + 0.75 * (1 - chance), question_type


def test_text_guided_selection_beats_random_selection_on_the_testbed(demo_run):
    """What the testbed is for: its image tokens are aligned with text, so Simignore's choice is better than chance's
    at 25% and 12.5% of the image tokens, by at least 0.05."""
    _, _, summaries = demo_run
    accuracy = {s["name"]: s["all_metrics"][TASK]["exact_match"] for s in summaries}
    for keep in (16, 8):
        assert accuracy[f"simignore_{keep}"] >= accuracy[f"random_{keep}"] + 0.05, keep


def test_regression_command_passes_on_the_same_outputs_and_fails_on_a_moved_prediction(demo_run, tmp_path):
    workdir, _, _ = demo_run  # finished rows are read back, not run again
    passed = python_m("regression", "--workdir", str(workdir), "--expected", str(EXPECTED))
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert f"all {len(DEMO_ROWS)} rows x {REGRESSION_QUESTIONS} predictions match" in passed.stdout

    moved = json.loads(EXPECTED.read_text())
    answer = moved["rows"]["random_8"]["answers"][7]
    moved["rows"]["random_8"]["answers"][7] = "Z" if answer != "Z" else "Y"
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    failed = python_m("regression", "--workdir", str(workdir), "--expected", str(tmp_path / "moved.json"))
    assert failed.returncode == 1
    assert f"random_8: doc 7 answer expected {moved['rows']['random_8']['answers'][7]!r}, got {answer!r}" in failed.stdout
    assert "python -m lmms_simignore regression --update" in failed.stdout

    updated = python_m("regression", "--workdir", str(workdir), "--expected", str(tmp_path / "moved.json"), "--update")
    assert updated.returncode == 0
    assert json.loads((tmp_path / "moved.json").read_text()) == json.loads(EXPECTED.read_text())


def test_differences_name_rows_docs_metrics_and_token_counts():
    record = {
        "model": "m", "task": "t", "split": {"seed": 1, "questions": 2},
        "rows": {"none": {"model_args": {"reduction": "none"}, "metrics": {"exact_match": 0.5},
                          "visible_per_layer": [16.0, 16.0], "answers": ["A", "B"]}},
    }
    assert differences(record, copy.deepcopy(record)) == []
    changed = copy.deepcopy(record)
    changed["rows"]["none"].update(metrics={"exact_match": 1.0}, visible_per_layer=[16.0, 8.0], answers=["A", "A"])
    assert differences(record, changed) == [
        "none: image tokens per layer expected [16.0, 16.0], got [16.0, 8.0]",
        "none: doc 1 answer expected 'B', got 'A'",
        "none: exact_match expected 0.5, got 1.0",
    ]
    renamed = copy.deepcopy(record)
    renamed["rows"] = {"other": renamed["rows"]["none"]}
    assert differences(record, renamed) == ["rows: expected ['none'], got ['other']"]
