"""Running the real `lmms-eval` CLI for one configuration and reading back what it wrote.

lmms-eval exits 0 even when a run fails (no task found, bad model_args, a broken import, ...), so a run
only counts as done when its results file exists; otherwise `LmmsEvalFailed` is raised with the first
error line of lmms-eval's output. A finished run is reused only when it was run with the same lmms-eval
arguments as the ones asked for now, by the same code (see `code_change`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


RUN_DIR = "{run_dir}"  # in model_args: replaced by the run's output folder when the command is built
PROVENANCE = "provenance.json"  # written last into a finished run's folder: command, versions, commit, date, wall time


@dataclass(frozen=True)
class EvalRun:
    """One lmms-eval invocation: model, model_args, tasks, where to write."""

    name: str
    model_args: str
    tasks: str
    output_dir: Path
    include_path: Path | None = None
    model: str = "llava_simignore"
    batch_size: int = 1
    extra_args: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The exact command line (a launcher such as torchrun goes in front of `-m lmms_eval`).

        `{run_dir}` in model_args becomes this run's output folder (e.g. for `token_log={run_dir}/tokens.jsonl`).
        """
        base = list(self.launcher) if self.launcher else [sys.executable]
        command = base + [
            "-m", "lmms_eval",
            "--model", self.model,
            "--model_args", self.model_args.replace(RUN_DIR, str(self.output_dir)),
            "--tasks", self.tasks,
            "--batch_size", str(self.batch_size),
            "--output_path", str(self.output_dir / "lmms_eval"),
            "--log_samples",
        ]
        if self.include_path is not None:
            command += ["--include_path", str(self.include_path)]
        return command + list(self.extra_args)

    def lmms_eval_arguments(self) -> list[str]:
        """What decides the results: the command after `-m lmms_eval` (not the interpreter or the launcher,
        since 2 processes answer like 1)."""
        return evaluation_arguments(self.command())


def launcher(processes: int) -> tuple[str, ...]:
    """How lmms-eval is started: directly for one process, else `accelerate launch --multi_gpu` (data parallel;
    on CPU it shards over gloo) on a free port."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return ()
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port))


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch's CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def default_processes() -> int:
    """One process per visible GPU when there are several, else one."""
    return max(1, visible_gpus())


def evaluation_arguments(command: list[str]) -> list[str]:
    """The arguments after `-m lmms_eval` in a command line."""
    for index in range(len(command) - 1):
        if command[index] == "-m" and command[index + 1] == "lmms_eval":
            return list(command[index + 2:])
    raise ValueError(f"not an lmms-eval command: {shlex.join(command)}")


class LmmsEvalFailed(RuntimeError):
    """An lmms-eval run that wrote no results; the message leads with the first error line of its output,
    `tail` holds its last 30 lines (colour codes removed)."""

    def __init__(self, name: str, first_error: str | None, exit_code: int, command: list[str], log_path: Path, tail: str):
        self.name, self.first_error, self.exit_code, self.log_path, self.tail = name, first_error, exit_code, log_path, tail
        headline = first_error or f"no error line in its output (exit {exit_code}, no results file); its last lines:\n{tail}"
        super().__init__(f"lmms-eval run {name!r} failed: {headline}\n  command: {shlex.join(command)}\n  full log: {log_path}")


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$")
LOGGED_ERROR = re.compile(r"\|\s*(?:ERROR|CRITICAL)\s*\|.*? - (.*)$")


def first_error_line(output: str) -> str | None:
    """The first error in lmms-eval's output: a Python exception line (`ModuleNotFoundError: No module named
    'x'`; in a chained traceback the first one is the cause) or a logged ERROR message; None if there is none."""
    for line in ANSI_ESCAPE.sub("", output).splitlines():
        line = line.strip()
        if EXCEPTION_LINE.match(line):
            return line
        logged = LOGGED_ERROR.search(line)
        if logged:
            return logged.group(1).strip()
    return None


def git_commit() -> str:
    """The commit of the checkout this package runs from (`+dirty` with uncommitted changes), or 'unknown'."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown (not a git checkout)"
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"


def current_code() -> dict:
    """The code that would produce a run now, in the shape of a provenance record: git commit and package version."""
    from lmms_simignore.lockfile import installed_version

    return {"git_commit": git_commit(), "versions": {"lmms-simignore": installed_version("lmms-simignore") or "not installed"}}


GIT_COMMIT = re.compile(r"^([0-9a-f]{7,40})(\+dirty)?$")


def code_change(recorded: dict, current: dict) -> str | None:
    """How the code that produced a finished run (its provenance record) differs from `current` (`current_code()`),
    e.g. 'at commit abc1234, now def5678' or 'by lmms-simignore 0.1.0, now 0.2.0'; None when it is the same
    as far as can be told. The rule:

    - both commits known and different (uncommitted changes or not): the code changed;
    - the same commit with a clean work tree on both sides: the same code;
    - otherwise (the same commit but uncommitted changes on either side, or a side that is not a git checkout,
      e.g. an installed package, or a record without a commit): the lmms-simignore version decides; two
      different known versions mean the code changed, the same or an unknown version that it did not.
    """
    old, new = GIT_COMMIT.match(str(recorded.get("git_commit", ""))), GIT_COMMIT.match(str(current.get("git_commit", "")))
    if old and new:
        if old.group(1) != new.group(1):
            return f"at commit {old.group(1)[:7]}{old.group(2) or ''}, now {new.group(1)[:7]}{new.group(2) or ''}"
        if not old.group(2) and not new.group(2):
            return None
    known = [version if version and version != "not installed" else None
             for version in ((recorded.get("versions") or {}).get("lmms-simignore"), (current.get("versions") or {}).get("lmms-simignore"))]
    if None not in known and known[0] != known[1]:
        return f"by lmms-simignore {known[0]}, now {known[1]}"
    return None


def provenance(run: EvalRun, wall_s: float) -> dict:
    """Where a finished run's numbers come from: the exact command, versions, commit, date and wall time."""
    from lmms_simignore.lockfile import installed_version

    return {
        "command": run.command(),
        "model": run.model,
        "model_args": run.model_args,
        "tasks": run.tasks,
        "versions": {package: installed_version(package) or "not installed" for package in ("lmms-simignore", "lmms-eval", "transformers", "torch")},
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 1),
    }


def offline_environment() -> dict[str, str]:
    """The current environment with the Hugging Face hub switched off."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def find_results(output_dir: Path) -> Path | None:
    """The newest `*_results.json` under `output_dir` that is lmms-eval's results file (it holds `results`), if any:
    tasks write files of that name too (MMBench's scorer writes `submissions/mmbench_en_dev_results.json` before
    lmms-eval's results exist)."""
    for path in sorted(Path(output_dir).rglob("*_results.json"), key=lambda path: path.stat().st_mtime, reverse=True):
        try:
            if "results" in json.loads(path.read_text()):
                return path
        except (ValueError, AttributeError, TypeError):  # not JSON, or not a JSON object
            continue
    return None


def read_samples(output_dir: Path, task: str) -> list[dict]:
    """Per-sample records (`--log_samples`) of `task`, ordered by doc_id."""
    files = sorted(Path(output_dir).rglob(f"*_samples_{task}.jsonl"))
    if not files:
        raise FileNotFoundError(f"no samples file for task {task} under {output_dir}")
    records = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda record: record["doc_id"])


def recorded_provenance(output_dir: Path) -> dict | None:
    """The provenance record of a finished run in `output_dir` (one with lmms-eval results), or None."""
    path = Path(output_dir) / PROVENANCE
    if not path.is_file() or find_results(output_dir) is None:
        return None
    return json.loads(path.read_text())


def recorded_arguments(output_dir: Path) -> list[str] | None:
    """The lmms-eval arguments a finished run in `output_dir` was run with (from its provenance), or None."""
    record = recorded_provenance(output_dir)
    return None if record is None else evaluation_arguments(record["command"])


def argument_changes(recorded: list[str], wanted: list[str]) -> list[str]:
    """What differs between two lmms-eval argument lists, flag by flag and model_arg by model_arg:
    ['model_args keep: 8 -> 4', '--limit: (none) -> 3']."""

    def flags(arguments: list[str]) -> dict[str, str]:
        found, index = {}, 0
        while index < len(arguments):
            value = arguments[index + 1] if index + 1 < len(arguments) and not arguments[index + 1].startswith("--") else ""
            found[arguments[index]] = value
            index += 2 if value else 1
        return found

    def model_args(text: str) -> dict[str, str]:
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in text.split(",") if item)

    old, new = flags(recorded), flags(wanted)
    changes = []
    for flag in sorted(old.keys() | new.keys()):
        if flag == "--model_args" and flag in old and flag in new:
            a, b = model_args(old[flag]), model_args(new[flag])
            changes += [f"model_args {key}: {a.get(key, '(none)')} -> {b.get(key, '(none)')}"
                        for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
        elif old.get(flag) != new.get(flag):
            changes.append(f"{flag}: {old.get(flag, '(none)') or '(set)'} -> {new.get(flag, '(none)') or '(set)'}")
    return changes


def reuse_state(run: EvalRun, current: dict | None = None) -> tuple[str, list[str]]:
    """('finished', []) when `run` finished with the same lmms-eval arguments by the same code, ('stale', [how the
    code differs]) when it finished with the same arguments but by other code (`code_change`; `current` defaults to
    `current_code()`), ('changed', what changed) when a finished run in its folder used other arguments, ('new', [])
    when there is none."""
    record = recorded_provenance(run.output_dir)
    if record is None:
        return "new", []
    recorded, wanted = evaluation_arguments(record["command"]), run.lmms_eval_arguments()
    if recorded != wanted:
        return "changed", argument_changes(recorded, wanted)
    change = code_change(record, current if current is not None else current_code())
    return ("finished", []) if change is None else ("stale", [change])


def run_lmms_eval(run: EvalRun, env: dict[str, str] | None = None, timeout: float | None = None, echo=None,
                  reuse_stale: bool = False) -> dict:
    """Run `run` unless it already finished with the same lmms-eval arguments by the same code (a killed series
    resumes, an edited row runs again, so does a row produced by other code unless `reuse_stale`: see
    `code_change`); return the results JSON.

    Each run writes into a scratch folder that replaces `output_dir` only once lmms-eval has written its
    results, so a half-finished run is never mistaken for a finished one and an earlier run is kept until
    the new one has finished. Raises `LmmsEvalFailed` when lmms-eval writes no results. `echo`, if given,
    receives the exact command line that runs.
    """
    state = reuse_state(run)[0]
    if state == "finished" or (state == "stale" and reuse_stale):
        return json.loads(find_results(run.output_dir).read_text())
    scratch = run.output_dir.with_name(run.output_dir.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    scratch_run = EvalRun(**{**run.__dict__, "output_dir": scratch})
    log_path = scratch / "lmms_eval.log"
    if echo is not None:
        echo(f"  $ {shlex.join(scratch_run.command())}")
    started = time.time()
    with open(log_path, "w") as log:
        completed = subprocess.run(
            scratch_run.command(), env=env or offline_environment(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
    results = find_results(scratch)
    if completed.returncode != 0 or results is None:
        output = log_path.read_text(errors="replace")
        tail = "\n".join(ANSI_ESCAPE.sub("", output).splitlines()[-30:])
        raise LmmsEvalFailed(run.name, first_error_line(output), completed.returncode, scratch_run.command(), log_path, tail)
    (scratch / PROVENANCE).write_text(json.dumps(provenance(run, wall_s=time.time() - started), indent=2))
    shutil.rmtree(run.output_dir, ignore_errors=True)
    scratch.rename(run.output_dir)
    return json.loads(find_results(run.output_dir).read_text())
