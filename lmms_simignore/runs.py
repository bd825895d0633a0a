"""Running the real `lmms-eval` CLI for one configuration and reading back what it wrote.

lmms-eval exits 0 even when a run fails (no task found, bad model_args, ...), so a run only counts
as done when its results file exists; otherwise we raise with the tail of its log.
"""

from __future__ import annotations

import json
import os
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


def provenance(run: EvalRun, wall_s: float) -> dict:
    """Where a finished run's numbers come from: the exact command, versions, commit, date and wall time."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "command": run.command(),
        "model": run.model,
        "model_args": run.model_args,
        "tasks": run.tasks,
        "versions": {package: installed(package) for package in ("lmms-simignore", "lmms-eval", "transformers", "torch")},
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
    """The newest `*_results.json` lmms-eval wrote under `output_dir`, if any."""
    found = sorted(Path(output_dir).rglob("*_results.json"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def read_samples(output_dir: Path, task: str) -> list[dict]:
    """Per-sample records (`--log_samples`) of `task`, ordered by doc_id."""
    files = sorted(Path(output_dir).rglob(f"*_samples_{task}.jsonl"))
    if not files:
        raise FileNotFoundError(f"no samples file for task {task} under {output_dir}")
    records = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda record: record["doc_id"])


def run_lmms_eval(run: EvalRun, env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run `run` unless its results already exist (a killed series resumes); return the results JSON.

    Each run writes into a scratch folder that is renamed to `output_dir` only once lmms-eval has
    written its results, so a half-finished run is never mistaken for a finished one.
    """
    existing = find_results(run.output_dir) if run.output_dir.exists() else None
    if existing is not None:
        return json.loads(existing.read_text())
    scratch = run.output_dir.with_name(run.output_dir.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    scratch_run = EvalRun(**{**run.__dict__, "output_dir": scratch})
    log_path = scratch / "lmms_eval.log"
    started = time.time()
    with open(log_path, "w") as log:
        completed = subprocess.run(
            scratch_run.command(), env=env or offline_environment(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
    results = find_results(scratch)
    if completed.returncode != 0 or results is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(
            f"lmms-eval run {run.name!r} failed (exit {completed.returncode}, results file "
            f"{'missing' if results is None else 'present'}); command: {' '.join(scratch_run.command())}\n{tail}"
        )
    (scratch / PROVENANCE).write_text(json.dumps(provenance(run, wall_s=time.time() - started), indent=2))
    shutil.rmtree(run.output_dir, ignore_errors=True)
    scratch.rename(run.output_dir)
    return json.loads(find_results(run.output_dir).read_text())
