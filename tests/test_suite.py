"""configs/suite.yaml end to end: its rows through the real lmms-eval CLI on the paper-shaped fixture (LLaVA-1.5's 576
image tokens) with a local copy of every suite task (synthetic docs in each task's schema), then the leaderboard's
measures against `none`; and the local copies' round trip (save-task-data, local-tasks)."""

import json
import re
from pathlib import Path

import pytest

from lmms_simignore.evaluation.leaderboard import write_leaderboard
from lmms_simignore.evaluation.sweep import load_config, local_task_names, run_sweep

SUITE = Path(__file__).resolve().parents[1] / "configs" / "suite.yaml"
ROWS = ["none", "zero_image_tokens", "pool_25"]


@pytest.fixture(scope="module")
def suite_fixture(tmp_path_factory):
    """`python -m lmms_simignore fixtures DIR --paper-shaped --suite`: the toy LLaVA and the suite's local copies."""
    from lmms_simignore import cli

    folder = tmp_path_factory.mktemp("paper_suite")  # (--num-docs: the fixture's own ScienceQA-like docs)
    assert cli.main(["fixtures", str(folder), "--paper-shaped", "--suite", "--num-docs", "2"]) == 0
    return folder


@pytest.fixture(scope="module")
def suite_sweep(suite_fixture, tmp_path_factory):
    """Three rows of the suite over every suite task (and seedbench_ppl, a log-likelihood task, in the same chat-class
    run), 2 docs each."""
    config = load_config(SUITE, overrides={"pretrained": str(suite_fixture / "tiny-llava")}, only_rows=",".join(ROWS))
    tasks = local_task_names(config.tasks + ",seedbench_ppl", suite_fixture / "suite-tasks")
    output = tmp_path_factory.mktemp("suite_sweep")
    from dataclasses import replace

    summaries = run_sweep(replace(config, tasks=tasks), output, include_path=suite_fixture / "suite-tasks",
                          extra_args=("--limit", "2"), echo=lambda line: None, show_table=False)
    write_leaderboard(output, echo=lambda line: None)
    return output, tasks.split(","), {summary["name"]: summary for summary in summaries}


def test_every_suite_row_runs_every_suite_task_from_its_local_copy(suite_sweep):
    _, tasks, rows = suite_sweep
    assert list(rows) == ROWS and len(tasks) == 12
    for row in rows.values():
        assert set(row["metrics"]) == set(tasks)
        assert all(len(answers) == 2 for answers in row["answers"].values())
    # a log-likelihood task's answers are its options' losses and whether each was greedy
    losses = rows["none"]["answers"]["seedbench_ppl_local"][0]
    assert len(losses) == 4 and all(greedy in ("True", "False") and float(loss) > 0 for loss, greedy in losses)
    assert rows["none"]["visible_per_layer"][0] > 576  # SEED-Bench's video docs and MMMU's bring several images
    assert rows["zero_image_tokens"]["visible_per_layer"] == [0.0] * 6


def test_the_pool_row_keeps_a_quarter_of_each_image_and_none_everything(suite_sweep):
    output, _, _ = suite_sweep
    for name, per_image in (("none", 576), ("pool_25", 144)):
        for line in (output / name / "tokens.jsonl").read_text().splitlines():
            record = json.loads(line)
            images = record["image_tokens"] // 576
            assert record["image_tokens"] == 576 * images >= 576
            assert record["visible_per_layer"] == [per_image * images] * 6


def test_the_leaderboard_measures_each_suite_task_against_none(suite_sweep):
    output, tasks, _ = suite_sweep
    markdown = (output / "leaderboard.md").read_text()
    dependence = markdown.split("| model | task | metric | none | zero-image row |")[1].split("\n\n")[0]
    for task in tasks:  # the zero-image row is found by what it computed; the pool row splits every task (or says why not)
        assert f"| {task} | " in dependence
        assert re.search(rf"by pool_25 \([\d.]+ image tokens per layer\) on {task}: ", markdown) or f"split by pool_25 ({task}): " in markdown
    assert dependence.count("| zero_image_tokens |") == len(tasks)
    assert "split by pool_25 (mmbench_en_dev_static_local): the task's gpt_eval_score does not say per sample" in markdown
    assert (output / "pareto.png").stat().st_size > 10_000


def test_a_saved_local_copy_reads_back_as_the_same_docs(suite_fixture, tmp_path):
    """save-task-data writes what a task's test split holds; local-tasks turns that into the task again."""
    import pyarrow.parquet as parquet

    from lmms_simignore import cli

    from lmms_simignore.local_data import save_task_data

    saved = save_task_data("pope_local", tmp_path / "saved", include_path=suite_fixture / "suite-tasks")
    original = parquet.read_table(suite_fixture / "suite-data" / "pope.parquet")
    assert parquet.read_table(saved).select(["question_id", "question", "answer"]).to_pylist() == \
        original.select(["question_id", "question", "answer"]).to_pylist()
    (tmp_path / "data").mkdir()
    saved.rename(tmp_path / "data" / "pope.parquet")
    assert cli.main(["local-tasks", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "tasks")]) == 0
    assert local_task_names("pope", tmp_path / "tasks") == "pope_local"
