"""Sweeps over the offline testbed config and the leaderboard: provenance, resume after a kill, several processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmms_simignore.bench.flops import DecoderShape, layer_flops, prefill_flops, sample_prefill_flops
from lmms_simignore.evaluation.sweep import load_config, row_runs
from lmms_simignore.settings import ReductionSettings

TESTBED = Path(__file__).resolve().parents[1] / "configs" / "testbed.yaml"
LIMIT = ("--limit", "40")
# the leaderboard's mechanics on a few of the testbed config's rows (every method runs through lmms-eval in the
# main job's regression test; every row of every config is checked against its model in test_sweep)
ROWS = ["none", "simignore_16", "simignore_8", "fastv_8"]


def sweep(config, output, *extra, timeout=1200):
    return subprocess.run([sys.executable, "-m", "lmms_simignore", "sweep", str(config), "--output", str(output), *LIMIT, *extra],
                          capture_output=True, text=True, timeout=timeout)


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# columns that depend on when and where a row ran, not on what it computed
RUN_SPECIFIC = {"wall_s", "date", "command", "git_commit"}
# columns that depend on which other rows the sweep has: whether a row is on the Pareto frontier among them
AMONG_ROWS = {"flops_frontier", "time_frontier"}


def comparable(rows):
    return [{key: value for key, value in row.items() if key not in RUN_SPECIFIC | AMONG_ROWS} for row in rows]


def config_rows(folder, names):
    """The testbed config cut down to some of its rows (the same split and arguments)."""
    config = yaml.safe_load(TESTBED.read_text())
    config["rows"] = [row for row in config["rows"] if row["name"] in names]
    path = folder / "rows.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, [row["name"] for row in config["rows"]]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    output = tmp_path_factory.mktemp("testbed")
    config, names = config_rows(tmp_path_factory.mktemp("config"), ROWS)
    assert names == ROWS
    completed = sweep(config, output)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output


# -- FLOP estimate -----------------------------------------------------------------------------------


def test_layer_flops_follow_the_counting_rule():
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4)
    n = 10
    projections = 2 * n * 8 * (2 * 2 * 4 + 2 * 1 * 4)
    mlp = 3 * 2 * n * 8 * 16
    attention = 2 * 2 * n * n * 2 * 4
    assert layer_flops(shape, n) == projections + mlp + attention
    assert prefill_flops(shape, [10, 10, 4]) == 2 * layer_flops(shape, 10) + layer_flops(shape, 4)


def test_masked_tokens_are_computed_until_fastv_drops_them():
    mask = ReductionSettings(reduction="simignore+fastv", keep=8, apply="mask", fastv_layer=2, fastv_keep=4)
    drop = ReductionSettings(reduction="simignore+fastv", keep=8, apply="drop", fastv_layer=2, fastv_keep=4)
    assert mask.visible_per_layer(16, 4) == drop.visible_per_layer(16, 4) == [8, 8, 4, 4]
    assert mask.plan(16, 4).computed_per_layer() == [16, 16, 4, 4]
    assert drop.plan(16, 4).computed_per_layer() == [8, 8, 4, 4]
    assert ReductionSettings(reduction="simignore", keep=8, apply="mask").plan(16, 4).computed_per_layer() == [16] * 4
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4)
    record = {"prompt_tokens": 30, "image_tokens": 16, "visible_per_layer": [8, 8, 4, 4], "computed_per_layer": [16, 16, 4, 4]}
    assert sample_prefill_flops(shape, record) == prefill_flops(shape, [30, 30, 18, 18])


# -- the leaderboard -----------------------------------------------------------------------------------


def test_leaderboard_lists_every_row_with_tokens_flops_and_provenance(finished_sweep):
    rows = read_csv(finished_sweep / "leaderboard.csv")
    assert [row["row"] for row in rows] == ROWS
    by_name = {row["row"]: row for row in rows}
    assert by_name["none"]["visible_per_layer"] == "64 64 64 64" and float(by_name["none"]["flops_vs_baseline"]) == 1.0
    assert by_name["fastv_8"]["visible_per_layer"] == "64 64 8 8" and float(by_name["fastv_8"]["mean_visible"]) == 36.0
    assert 0 < float(by_name["simignore_8"]["flops_vs_baseline"]) < float(by_name["simignore_16"]["flops_vs_baseline"]) < 1
    assert {"acc_colour", "acc_spatial", "acc_objects_6"} <= set(rows[0])
    # the exact command the sweep builds for each row (with the config's generated split and the --limit)
    runs = row_runs(load_config(TESTBED), finished_sweep.resolve(), include_path=finished_sweep.resolve() / "tasks", extra_args=LIMIT)
    commands = {run.name: run.command() for run in runs}
    for row in rows:
        provenance = json.loads((finished_sweep / row["row"] / "provenance.json").read_text())
        command = commands[row["row"]]
        assert row["command"] == " ".join(command) == " ".join(provenance["command"])
        assert row["lmms_eval"] == provenance["versions"]["lmms-eval"] != "not installed"
        assert row["git_commit"] and row["date"].startswith("20")
        samples = list((finished_sweep / row["row"]).rglob("*_samples_shapes_heldout.jsonl"))
        assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 40  # every doc once
        # the score and the measures against none come from the samples lmms-eval logged
        scores = [json.loads(line)["exact_match"] for line in samples[0].read_text().splitlines()]
        assert float(row["value"]) == pytest.approx(sum(scores) / 40)
        assert float(row["relative_accuracy"]) == pytest.approx(100 * float(row["value"]) / float(by_name["none"]["value"]))
        assert row["compared_samples"] == "40"
    assert (by_name["none"]["agreement"], by_name["none"]["kept"]) == ("1.0", "1.0")
    markdown = (finished_sweep / "leaderboard.md").read_text()
    assert "| row | method | task | metric | value | acc_colour |" in markdown and "Provenance" in markdown
    assert "| shipped:shapes-llava | shapes_heldout | exact_match |" in markdown and "no zero-image row" in markdown
    assert "no `pool` row, no split" in markdown
    for figure in ("leaderboard.png", "pareto.png"):
        assert (finished_sweep / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reported_figures_stay_in_their_own_labelled_column(finished_sweep, tmp_path):
    import shutil

    from lmms_simignore.evaluation.leaderboard import write_leaderboard

    copy = shutil.copytree(finished_sweep, tmp_path / "copy")
    (copy / "reported.json").write_text(json.dumps({"none": {"value": 99.9, "source": "a paper"}}))
    rows = write_leaderboard(copy, echo=lambda line: None)
    measured = next(row for row in rows if row["row"] == "none")
    assert measured["value"] != 99.9 and measured["reported"] == {"value": 99.9, "source": "a paper"}
    markdown = (copy / "leaderboard.md").read_text()
    assert "reported (published, not measured here)" in markdown and "99.9 (a paper; protocol unknown)" in markdown
    assert {row["row"]: row["reported_value"] for row in read_csv(copy / "leaderboard.csv")}["none"] == "99.9"


def test_leaderboard_command_refuses_a_folder_without_finished_rows(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "leaderboard", str(tmp_path)], capture_output=True, text=True)
    assert completed.returncode != 0 and "no finished rows" in completed.stderr


def test_a_killed_sweep_resumes_to_the_same_leaderboard(finished_sweep, tmp_path):
    output = tmp_path / "killed"
    config, names = config_rows(tmp_path, ("none", "simignore_8", "fastv_8"))
    command = [sys.executable, "-m", "lmms_simignore", "sweep", str(config), "--output", str(output), *LIMIT]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    # wait until the second row is half-written, then kill the whole process group mid-row
    while not ((output / names[0] / "provenance.json").exists() and (output / f"{names[1]}.partial").exists()):
        assert process.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output / names[1]).exists()  # the half-written row is not taken for a finished one
    first_row_results = sorted((output / names[0]).rglob("*_results.json"))

    resumed = sweep(config, output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[1/{len(names)}] {names[0]}: done, reading" in resumed.stdout
    assert sorted((output / names[0]).rglob("*_results.json")) == first_row_results  # not run again
    assert not list(output.glob("*.partial"))
    whole = [row for row in read_csv(finished_sweep / "leaderboard.csv") if row["row"] in names]
    assert comparable(read_csv(output / "leaderboard.csv")) == comparable(whole)  # as the uninterrupted sweep


def test_two_processes_evaluate_every_doc_once_with_the_one_process_scores(finished_sweep, tmp_path):
    path, _ = config_rows(tmp_path, ("none", "fastv_8"))
    completed = sweep(path, tmp_path / "two", "--processes", "2")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "x 2 processes" in completed.stdout
    one = {row["row"]: row for row in read_csv(finished_sweep / "leaderboard.csv")}
    for row in read_csv(tmp_path / "two" / "leaderboard.csv"):
        assert comparable([row]) == comparable([one[row["row"]]])
        samples = next((tmp_path / "two" / row["row"]).rglob("*_samples_shapes_heldout.jsonl")).read_text().splitlines()
        assert sorted(json.loads(line)["doc_id"] for line in samples) == list(range(40))
        assert len(list((tmp_path / "two" / row["row"]).glob("tokens.jsonl.rank*"))) == 2


def test_tokens_by_object_count_come_from_the_generated_split_and_each_samples_count(tmp_path):
    """doc 0 and 2 have 1 object, doc 1 has 3: the per-count means of what each sample kept (mean over layers)."""
    import pyarrow
    import pyarrow.parquet

    from lmms_simignore.engine.accounting import TokenAccounting
    from lmms_simignore.evaluation.leaderboard import _tokens_by_objects

    data = tmp_path / "split.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"num_objects": [1, 3, 1]}), data)
    (tmp_path / "shapes_x.yaml").write_text(json.dumps({"dataset_kwargs": {"data_files": {"test": str(data)}}}))
    accounting = TokenAccounting()
    for doc_id, kept in ((0, [4, 4]), (1, [10, 6]), (2, [6, 6])):
        accounting.add(doc_id=doc_id, task="shapes_x", prompt_tokens=90, image_tokens=64, visible_per_layer=kept,
                       mean_visible=sum(kept) / 2, computed_per_layer=kept)
    assert _tokens_by_objects(tmp_path, "shapes_x", accounting) == {"1": 5.0, "3": 8.0}
    assert _tokens_by_objects(tmp_path, "scienceqa_img", accounting) is None  # no generated split: not a shapes task
