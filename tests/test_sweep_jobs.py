"""Sweeps as jobs through submitit: each row one job (Slurm, or a background process here), resumable after a kill,
each row's state on demand, the leaderboard once every row is in; the dry run prints each job's sbatch script."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lmms_simignore import cli
from lmms_simignore.evaluation import jobs, sweep
from lmms_simignore.evaluation.jobs import JobSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Stands in for `python -m lmms_eval` (given as the launcher): writes a results and a samples file and logs its row;
# it blocks while the file `block` next to it names its row, and fails for a row named in `fail`.
FAKE_LMMS_EVAL = '''import json, sys, time
from pathlib import Path

here = Path(__file__).parent
args = sys.argv[sys.argv.index("lmms_eval") + 1:]
output, task = Path(args[args.index("--output_path") + 1]), args[args.index("--tasks") + 1]
row = output.parent.name.removesuffix(".partial")
with open(here / "runs.log", "a") as log:
    log.write(row + "\\n")
while (here / "block").exists() and (here / "block").read_text() == row:
    time.sleep(0.2)
if (here / "fail").exists() and (here / "fail").read_text() == row:
    sys.exit("ValueError: visiondrop is budgeted by keep=N")
(output / "fake").mkdir(parents=True)
(output / "fake" / "x_results.json").write_text(json.dumps({"results": {task: {"exact_match,none": 1.0}}}))
(output / "fake" / f"x_samples_{task}.jsonl").write_text(json.dumps({"doc_id": 0, "filtered_resps": [row]}) + "\\n")
'''


@pytest.fixture
def fake_rows(tmp_path, monkeypatch):
    """A config of rows a, b, c whose lmms-eval is the fake above: (config path, scripts folder, output folder)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake_lmms_eval.py").write_text(FAKE_LMMS_EVAL)
    config = tmp_path / "config.yaml"
    config.write_text("name: fake\nmodel: fake\ntasks: fake_task\nslurm: {time: 10}\n"
                      "rows: [{name: a}, {name: b, model_args: {keep: 2}}, {name: c, model_args: {keep: 3}}]\n")
    monkeypatch.setattr(sweep, "launcher", lambda processes: (sys.executable, str(scripts / "fake_lmms_eval.py")))
    return config, scripts, tmp_path / "out"


def ran(scripts: Path) -> list[str]:
    log = scripts / "runs.log"
    return sorted(log.read_text().split()) if log.exists() else []


def status(capsys, config: Path, output: Path) -> dict[str, tuple[str, str]]:
    """`sweep --status`: {row: (state, detail)} as printed."""
    capsys.readouterr()
    assert cli.main(["sweep", str(config), "--output", str(output), "--status"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    return {cells[0]: (cells[1], cells[3]) for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)}


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def kill_tree(pid: int) -> None:
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds a job's processes in /proc")
def test_a_killed_row_shows_as_failed_and_a_second_submission_queues_only_it(fake_rows, capsys):
    """Three rows as local jobs; row b's job is killed mid-row (its whole process tree, as a lost node): --status says
    so, the other rows are done; submitting again runs b alone, and once it is in, the leaderboard is written."""
    config, scripts, output = fake_rows
    (scripts / "block").write_text("b")
    assert cli.main(["sweep", str(config), "--output", str(output), "--launcher", "local-jobs"]) == 0
    records = json.loads((output / "jobs.json").read_text())
    assert sorted(records) == ["a", "b", "c"] and {record["launcher"] for record in records.values()} == {"local-jobs"}
    try:
        wait_until(lambda: (output / "a").is_dir() and (output / "c").is_dir() and (output / "b.partial" / "lmms_eval.log").is_file())
        wait_until(lambda: ran(scripts) == ["a", "b", "c"])
        states = status(capsys, config, output)
        assert [states[row][0] for row in "abc"] == ["done", "running", "done"]
        assert not (output / "leaderboard.md").exists()
    finally:
        kill_tree(int(records["b"]["job_id"]))
    (scripts / "block").unlink()
    wait_until(lambda: status(capsys, config, output)["b"][0] == "failed")
    assert "process is gone" in status(capsys, config, output)["b"][1]

    capsys.readouterr()
    assert cli.main(["sweep", str(config), "--output", str(output), "--launcher", "local-jobs", "--wait", "--poll-seconds", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "[1/3] a: done, not submitted again" in printed and "[3/3] c: done, not submitted again" in printed
    assert "[2/3] b: submitted as local-jobs job" in printed and "(was failed: the job's process is gone" in printed
    assert ran(scripts) == ["a", "b", "b", "c"]  # b twice, the others once
    assert json.loads((output / "jobs.json").read_text())["b"]["job_id"] != records["b"]["job_id"]
    assert [summary["name"] for summary in json.loads((output / "summary.json").read_text())] == ["a", "b", "c"]
    assert (output / "leaderboard.md").is_file()
    assert {name: state for name, (state, _) in status(capsys, config, output).items()} == {"a": "done", "b": "done", "c": "done"}

    provenance = output / "a" / "provenance.json"  # row a as if produced at another commit: its ended job is no failure
    provenance.write_text(json.dumps({**json.loads(provenance.read_text()), "git_commit": "0" * 40}))
    state, detail = status(capsys, config, output)["a"]
    assert state == "not submitted" and detail.startswith("finished at commit 0000000, now "), detail


def test_a_failed_row_shows_its_first_error_line_and_wait_exits_1(fake_rows, capsys):
    config, scripts, output = fake_rows
    (scripts / "fail").write_text("c")
    assert cli.main(["sweep", str(config), "--output", str(output), "--launcher", "local-jobs", "--wait", "--poll-seconds", "0.2"]) == 1
    assert "c: ValueError: visiondrop is budgeted by keep=N" in capsys.readouterr().err
    state, detail = status(capsys, config, output)["c"]
    assert state == "failed" and detail.startswith("ValueError: visiondrop is budgeted by keep=N (log: ")
    assert not (output / "leaderboard.md").exists()  # not every row is in


FAKE_SLURM = {  # stand-ins for Slurm's commands: sbatch keeps the script and answers with a job id; sacct reads states
    "srun": "#!/bin/sh\nexit 0\n",
    "sbatch": '#!/bin/sh\nn=$(( $(cat "$(dirname "$0")/next_id") ))\necho $((n + 1)) > "$(dirname "$0")/next_id"\n'
              'cp "$1" "$(dirname "$0")/submitted_$n.sh"\necho "Submitted batch job $n"\n',
    "sacct": '#!/bin/sh\necho "JobID|State|NodeList"\ncat "$(dirname "$0")/states"\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A folder of fake srun/sbatch/sacct on PATH; job ids start at 1001; `states` is what sacct lists."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "next_id").write_text("1001")
    (bin_dir / "states").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    from submitit import SlurmJob

    SlurmJob.watcher.clear()
    return bin_dir


def test_slurm_jobs_get_the_dry_runs_scripts_their_states_from_sacct_and_only_unfinished_rows_go_again(fake_rows, fake_slurm, capsys):
    config, scripts, output = fake_rows
    flags = ["--launcher", "slurm", "--partition", "gpu", "--account", "lab", "--gpus", "2", "--time", "1:30:00", "--mem-gb", "64"]
    assert cli.main(["sweep", str(config), "--output", str(output), *flags, "--dry-run"]) == 0
    dry_run = capsys.readouterr().out
    assert not (output / "jobs.json").exists() and not list(fake_slurm.glob("submitted_*"))
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                     "#SBATCH --mem=64GB", "#SBATCH --job-name=lmms-simignore-fake-b"):
        assert expected in dry_run, expected
    assert dry_run.count("#!/bin/bash") == 3

    assert cli.main(["sweep", str(config), "--output", str(output), *flags]) == 0
    records = json.loads((output / "jobs.json").read_text())
    assert {row: record["job_id"] for row, record in records.items()} == {"a": "1001", "b": "1002", "c": "1003"}
    submitted = (fake_slurm / "submitted_1002.sh").read_text()
    assert submitted in dry_run  # the script submitted is the one the dry run printed
    assert (output / "jobs" / "1002" / "1002_submitted.pkl").is_file()  # the pickled row job, for the node

    (fake_slurm / "states").write_text("1001|RUNNING|node1\n1002|PENDING|\n1003|TIMEOUT|node2\n")
    states = status(capsys, config, output)
    assert [states[row][0] for row in "abc"] == ["running", "queued", "failed"]
    assert states["c"][1] == "the job ended (timeout) before its row finished"

    assert cli.main(["sweep", str(config), "--output", str(output), *flags]) == 0
    printed = capsys.readouterr().out
    assert "a: running (slurm 1001), not submitted again" in printed and "b: queued (slurm 1002), not submitted again" in printed
    assert "c: submitted as slurm job 1004 (was failed: the job ended (timeout)" in printed
    assert json.loads((output / "jobs.json").read_text())["c"]["job_id"] == "1004"


def test_the_dry_run_shows_accelerate_launch_inside_a_job_of_several_gpus(tmp_path, capsys):
    assert cli.main(["sweep", str(CONFIGS / "table3.yaml"), "--output", str(tmp_path), "--launcher", "slurm", "--gpus", "4",
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    runs = [line for line in printed.splitlines() if line.startswith("# the job runs: ")]
    assert len(runs) == len(sweep.load_config(CONFIGS / "table3.yaml").rows)
    assert all("-m accelerate.commands.launch --multi_gpu --num_processes 4 --main_process_port '<a free port on the node>' "
               "-m lmms_eval --model llava_simignore" in line for line in runs)
    assert printed.count("#SBATCH --gpus-per-node=4") == len(runs) and not tmp_path.joinpath("jobs.json").exists()


@pytest.mark.parametrize(
    "block, message",
    [({"time": "soon"}, "slurm: time: 'soon' is not a time limit"), ({"gpus": -1}, "slurm: gpus: a whole number >= 0"),
     ({"partitions": "gpu"}, r"slurm: unknown keys \['partitions'\]; allowed: time, gpus, partition"),
     ({"setup": "module load cuda"}, "slurm: setup: a list of shell lines")],
)
def test_a_bad_slurm_block_is_refused_naming_the_key(tmp_path, block, message):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"tasks": "t", "rows": [{"name": "a"}], "slurm": block}))
    with pytest.raises(ValueError, match=message):
        sweep.load_config(path)


def test_the_command_line_overrides_the_config_block():
    settings = JobSettings.from_mapping({"time": "2-00:00:00", "partition": "a100", "gpus": 4, "setup": ["module load cuda"]})
    assert settings.time == 2880
    changed = settings.over({"partition": "h100", "gpus": None, "time": "45"})
    assert (changed.partition, changed.gpus, changed.time, changed.setup) == ("h100", 4, 45, ("module load cuda",))
    parameters = jobs.sbatch_parameters(changed, "name")
    assert parameters["setup"] == ["module load cuda"] and parameters["gpus_per_node"] == 4 and parameters["partition"] == "h100"


@pytest.mark.parametrize("flags, message", [(["--gpus", "2"], "--gpus: for the job launchers"),
                                            (["--launcher", "slurm", "--processes", "2"], "--processes: with --launcher slurm")])
def test_job_flags_without_a_job_launcher_and_processes_with_one_are_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["sweep", str(CONFIGS / "table3.yaml"), "--output", str(tmp_path), *flags])


def test_rows_run_as_local_jobs_answer_as_the_main_job_expects(tmp_path):
    """The real lmms-eval on the shipped testbed: two rows as jobs answer the held-out questions as the main job's
    expected-results file says (its first 8 questions are the testbed config's: the same generator seed)."""
    expected = json.loads((Path(__file__).parent / "expected" / "shapes_regression.json").read_text())
    assert cli.main(["sweep", str(CONFIGS / "testbed.yaml"), "--rows", "none,simignore_16", "--limit", "8", "--output", str(tmp_path),
                     "--launcher", "local-jobs", "--wait", "--poll-seconds", "1"]) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "summary.json").read_text())}
    for name in ("none", "simignore_16"):
        assert rows[name]["model_args"].startswith(sweep.format_model_args({"pretrained": expected["model"], **expected["rows"][name]["model_args"]}))
        answers = [response[0] for response in rows[name]["answers"]["shapes_heldout"]]
        assert answers == expected["rows"][name]["answers"][:8], name
    assert [rows[name]["visible_per_layer"] for name in ("none", "simignore_16")] == [[64] * 4, [16] * 4]
    assert (tmp_path / "leaderboard.md").is_file()
