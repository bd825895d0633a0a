"""Sweep rows as jobs through submitit: each row one job on a Slurm cluster (`slurm`) or one background process on
this machine (`local-jobs`), resumable, with each row's state on demand.

A job runs its row exactly as `sweep` runs one locally (`runs.run_lmms_eval`: the row's folder appears only once
lmms-eval has written its results; `accelerate launch` inside the job when the row has several GPUs). The submitting
command records each row's job in `jobs.json` in the sweep's folder; a job writes `row.json` into its own job folder when
it starts and when its row fails. From the row's folder, these records and the scheduler, every row is `done`, `queued`,
`running`, `failed` (with the first error line) or `not submitted` (`row_states`); submitting the sweep again skips done
rows, leaves queued and running ones alone and queues the others again.

Layout of a sweep's folder: `<row>/` (finished rows, as for a local sweep), `jobs.json`, `jobs/<job id>/` (submitit's
files: the submission script, the pickled call, stdout and stderr; our `row.json`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from lmms_simignore.evaluation.runs import (EvalRun, LmmsEvalFailed, current_code, first_error_line, launcher, reuse_state,
                                            run_lmms_eval, visible_gpus)
from lmms_simignore.markdown import table

JOB_LAUNCHERS = ("local-jobs", "slurm")  # `local`, the sweep's own loop over the rows, needs no job
LAUNCHERS = ("local", *JOB_LAUNCHERS)
JOBS_FILE = "jobs.json"  # in the sweep's folder: {row: the job that runs it}
JOBS_FOLDER = "jobs"  # submitit's folders, one per job id
ROW_RECORD = "row.json"  # in a job's folder, written by the job: started, and failed with its first error line

# Slurm job states (sacct) by what they mean for a row
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED", "RESIZING"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
STATES = ("done", "queued", "running", "failed", "not submitted")


def _minutes(value) -> int:
    """A time limit as Slurm spells it -> minutes: 90, "90", "1:30:00" (h:mm:ss) or "2-00:00:00" (days-h:mm:ss)."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
    if text.isdigit():
        minutes = int(text)
    elif match:
        days, hours, mins, secs = (int(group or 0) for group in match.groups())
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    else:
        raise ValueError(f"time: {value!r} is not a time limit; give minutes (240), hours:minutes:seconds (4:00:00) "
                         f"or days-hours:minutes:seconds (1-00:00:00)")
    if minutes < 1:
        raise ValueError(f"time: the limit must be at least one minute, got {value!r}")
    return minutes


@dataclass(frozen=True)
class JobSettings:
    """What each row's job asks for: the config's `slurm:` block, then the command line's flags over it."""

    time: int = 240  # minutes of wall clock per row (the job is stopped after it; its row then shows as failed)
    gpus: int | None = None  # per row, and as many processes (accelerate launch when > 1); None: 1 on Slurm, this
    # machine's visible GPUs for local jobs (0 on a CPU: one process)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    setup: tuple[str, ...] = ()  # shell lines run before the row (`module load cuda`, `source .venv/bin/activate`)
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"mail-type": "END"}

    KEYS = ("time", "gpus", "partition", "account", "qos", "constraint", "cpus_per_task", "mem_gb", "setup", "sbatch")

    def __post_init__(self):
        object.__setattr__(self, "time", _minutes(self.time))
        for name in ("gpus", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "gpus" else 1)):
                raise ValueError(f"{name}: a whole number {'>= 0' if name == 'gpus' else '>= 1'}, got {value!r}")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise ValueError(f"mem_gb: a positive number of GB, got {self.mem_gb!r}")
        if isinstance(self.setup, str) or not all(isinstance(line, str) for line in self.setup):
            raise ValueError(f"setup: a list of shell lines, got {self.setup!r}")
        object.__setattr__(self, "setup", tuple(self.setup))
        if not isinstance(self.sbatch, dict) or not all(isinstance(key, str) for key in self.sbatch):
            raise ValueError(f"sbatch: a mapping of sbatch options to values (e.g. {{mail-type: END}}), got {self.sbatch!r}")

    @classmethod
    def from_mapping(cls, mapping: dict | None, source: str = "slurm") -> JobSettings:
        """From a config's `slurm:` block (or the command line's flags); unknown keys are refused, naming the allowed."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed: {', '.join(cls.KEYS)}")
        try:
            return cls(**mapping)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def over(self, flags: dict) -> JobSettings:
        """These settings with the given flags (None: not given) in place of their values."""
        given = {key: value for key, value in flags.items() if value is not None}
        return JobSettings.from_mapping({**{key: getattr(self, key) for key in self.KEYS}, **given}, source="command line")

    def gpus_for(self, launcher: str) -> int:
        """GPUs per row on `launcher` (see `gpus`)."""
        if self.gpus is not None:
            return self.gpus
        if launcher == "slurm":
            return 1
        return visible_gpus()


def sbatch_parameters(settings: JobSettings, job_name: str) -> dict:
    """The submitit Slurm parameters of one row's job (sbatch's own names): one task on one node with its GPUs."""
    parameters = {"job_name": job_name, "time": settings.time, "nodes": 1, "ntasks_per_node": 1,
                  "gpus_per_node": settings.gpus_for("slurm")}
    if settings.setup:
        parameters["setup"] = list(settings.setup)
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if getattr(settings, key) is not None:
            parameters[key] = getattr(settings, key)
    if settings.mem_gb is not None:
        from submitit.slurm.slurm import _convert_mem

        parameters["mem"] = _convert_mem(settings.mem_gb)  # sbatch's spelling, as submitit's own conversion writes it
    if settings.sbatch:
        parameters["additional_parameters"] = dict(settings.sbatch)
    return parameters


def job_name(sweep_name: str, row: str) -> str:
    return f"lmms-simignore-{sweep_name}-{row}"


def make_executor(launcher: str, output_dir: Path, settings: JobSettings, name: str):
    """A submitit executor whose jobs each get their own folder `jobs/<job id>` under the sweep's folder."""
    import submitit

    folder = output_dir / JOBS_FOLDER / "%j"
    if launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**sbatch_parameters(settings, name))
    elif launcher == "local-jobs":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=settings.time, gpus_per_node=settings.gpus_for(launcher), tasks_per_node=1)
        if settings.setup:
            executor.update_parameters(setup=list(settings.setup))
    else:
        raise ValueError(f"--launcher: {launcher!r} runs no jobs; the job launchers are {', '.join(JOB_LAUNCHERS)}")
    return executor


def sbatch_script(output_dir: Path, settings: JobSettings, name: str) -> str:
    """The sbatch script submitit writes for a row's job (what `--dry-run` prints), from submitit's own writer."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = output_dir / JOBS_FOLDER / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder.absolute()))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(settings, name))


@dataclass(frozen=True)
class RowJob:
    """What a job runs: one row through lmms-eval, with `accelerate launch` for several processes (its port chosen on
    the node that runs it). Returns the row's folder; a failure is recorded in the job's `row.json` and raised."""

    run: EvalRun
    processes: int = 1
    reuse_stale: bool = False

    def __call__(self) -> str:
        from submitit import JobEnvironment

        record_path = JobEnvironment().paths.folder / ROW_RECORD
        started = {"row": self.run.name, "host": socket.gethostname(), "started": _now()}
        _write_json(record_path, {**started, "state": "running"})
        run = replace(self.run, launcher=launcher(self.processes)) if self.processes > 1 else self.run
        try:
            run_lmms_eval(run, echo=lambda line: print(line, flush=True), reuse_stale=self.reuse_stale)
        except LmmsEvalFailed as failure:
            _write_json(record_path, {**started, "state": "failed", "error": failure.first_error or f"exit code {failure.exit_code}",
                                      "log": str(failure.log_path)})
            raise
        _write_json(record_path, {**started, "state": "finished", "finished": _now()})
        return str(run.output_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, value) -> None:
    """Write atomically: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(value, indent=2))
    scratch.replace(path)


def read_jobs(output_dir: Path) -> dict[str, dict]:
    """The sweep's job records: {row: {launcher, job_id, folder, submitted, arguments (its lmms-eval arguments)}}."""
    path = Path(output_dir) / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class RowState:
    name: str
    state: str  # one of STATES
    job: str = ""  # "slurm 1234" / "local-jobs 5678"
    detail: str = ""


def _local_job_alive(job_id: str) -> bool:
    """Whether the controller process of a submitit local job still runs (a zombie, or a reused pid, does not)."""
    proc = Path("/proc") / str(job_id)
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return state != "Z" and "submitit.local._local" in command
    try:
        os.kill(int(job_id), 0)
    except (OSError, ValueError):
        return False
    return True


def scheduler_states(records: dict[str, dict]) -> dict[str, str]:
    """{job id: the scheduler's state} for the recorded jobs: sacct's for Slurm jobs (one call for all; UNKNOWN for a
    job it does not list), RUNNING or GONE for local jobs."""
    states = {}
    slurm = [record["job_id"] for record in records.values() if record["launcher"] == "slurm"]
    if slurm:
        from submitit import SlurmJob

        for job_id in slurm:
            SlurmJob.watcher.register_job(job_id)
        SlurmJob.watcher.update()
        states.update({job_id: SlurmJob.watcher.get_info(job_id, mode="cache").get("State") or "UNKNOWN" for job_id in slurm})
    for record in records.values():
        if record["launcher"] == "local-jobs":
            states[record["job_id"]] = "RUNNING" if _local_job_alive(record["job_id"]) else "GONE"
    return states


def _job_record(record: dict) -> dict:
    """What a job wrote about its row (`row.json`: host, started, state, error), {} before it started."""
    path = Path(record["folder"]) / ROW_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _job_failure(record: dict, written: dict, scheduler_state: str) -> str:
    """Why a job that ended left its row unfinished: its row's first error line (`written`: its `row.json`), else its
    stderr's, else how it ended."""
    if written.get("state") == "failed":
        return f"{written['error']} (log: {written['log']})"
    stderr = Path(record["folder"]) / f"{record['job_id']}_0_log.err"
    error = first_error_line(stderr.read_text(errors="replace")) if stderr.is_file() else None
    if error:
        return f"{error} (job stderr: {stderr})"
    if record["launcher"] == "slurm":
        return f"the job ended ({scheduler_state.lower()}) before its row finished"
    return "the job's process is gone before its row finished (killed?)"


def row_states(runs: list[EvalRun], output_dir: Path, reuse_stale: bool = False) -> list[RowState]:
    """Each row's state: `done` (its folder holds a finished run of these arguments; by other code only with
    `reuse_stale`), `queued` or `running` (its recorded job), `failed` (its job ended without finishing it: why), or
    `not submitted` (no job; or its folder holds a run of other arguments or by other code, saying so)."""
    records = read_jobs(output_dir)
    live = scheduler_states({name: record for name, record in records.items() if name in {run.name for run in runs}})
    current = current_code()
    states = []
    for run in runs:
        finished, changes = reuse_state(run, current)
        if finished == "finished" or (finished == "stale" and reuse_stale):
            states.append(RowState(run.name, "done"))
            continue
        record = records.get(run.name)
        scheduler = live.get(record["job_id"], "UNKNOWN").split()[0] if record else None  # sacct writes "CANCELLED by 1000"
        job = f"{record['launcher']} {record['job_id']}" if record else ""
        other = "" if record is None or record["arguments"] == run.lmms_eval_arguments() else "; submitted with other arguments"
        if scheduler in SLURM_QUEUED:
            states.append(RowState(run.name, "queued", job, f"since {record['submitted']}{other}"))
        elif scheduler in SLURM_RUNNING:
            written = _job_record(record)
            started = f"on {written['host']} since {written['started']}" if "started" in written else "starting"
            states.append(RowState(run.name, "running", job, started + other))
        elif scheduler == "UNKNOWN":
            states.append(RowState(run.name, "queued", job, "the scheduler does not know the job yet (or sacct is not available)"))
        elif finished in ("stale", "changed"):  # its folder holds a finished run, not of these arguments or this code
            detail = (f"finished {changes[0]} (--reuse-stale keeps it)" if finished == "stale"
                      else f"finished with other arguments ({'; '.join(changes)})")
            states.append(RowState(run.name, "not submitted", "", detail))
        elif record is not None:
            states.append(RowState(run.name, "failed", job, _job_failure(record, _job_record(record), scheduler) + other))
        else:
            partial = run.output_dir.with_name(run.output_dir.name + ".partial")
            states.append(RowState(run.name, "not submitted", "", f"a run that did not finish is in {partial.name}" if partial.exists() else ""))
    return states


def states_table(states: list[RowState]) -> str:
    counts = ", ".join(f"{sum(state.state == name for state in states)} {name}" for name in STATES
                       if any(state.state == name for state in states))
    rows = [[state.name, state.state, state.job or "-", state.detail or "-"] for state in states]
    return f"{table(['row', 'state', 'job', 'detail'], rows)}\n{len(states)} rows: {counts}"


def submit_rows(runs: list[EvalRun], output_dir: Path, launcher: str, settings: JobSettings, sweep_name: str,
                reuse_stale: bool = False, dry_run: bool = False, echo=print) -> None:
    """Submit one job per row that is not done, queued or running (failed, killed and new rows: again); record the
    jobs in jobs.json. `dry_run`: print what would be submitted (Slurm: each job's sbatch script), submit nothing."""
    if launcher not in JOB_LAUNCHERS:
        raise ValueError(f"--launcher: {launcher!r} runs no jobs; the job launchers are {', '.join(JOB_LAUNCHERS)}")
    output_dir = Path(output_dir)
    gpus = settings.gpus_for(launcher)
    states = {state.name: state for state in row_states(runs, output_dir, reuse_stale)}
    records = read_jobs(output_dir)
    for index, run in enumerate(runs, start=1):
        state = states[run.name]
        prefix = f"[{index}/{len(runs)}] {run.name}"
        if state.state in ("done", "queued", "running"):
            echo(f"{prefix}: {state.state}{' (' + state.job + ')' if state.job else ''}, not submitted again")
            continue
        again = f" (was {state.state}: {state.detail})" if state.state == "failed" else ""
        name = job_name(sweep_name, run.name)
        if dry_run:
            echo(f"{prefix}: would submit{again}")
            if launcher == "slurm":
                echo(sbatch_script(output_dir, settings, name))
            echo(f"# the job runs: {shlex.join(_job_command(run, gpus))}\n")
            continue
        executor = make_executor(launcher, output_dir, settings, name)
        job = executor.submit(RowJob(run, processes=max(1, gpus), reuse_stale=reuse_stale))
        records[run.name] = {"launcher": launcher, "job_id": str(job.job_id), "folder": str(job.paths.folder),
                             "submitted": _now(), "arguments": run.lmms_eval_arguments()}
        _write_json(output_dir / JOBS_FILE, records)
        echo(f"{prefix}: submitted as {launcher} job {job.job_id}{again} (logs: {job.paths.folder})")


def _job_command(run: EvalRun, gpus: int) -> list[str]:
    """The lmms-eval command a row's job runs, with `accelerate launch` for several GPUs (its port is chosen on the node)."""
    command = (replace(run, launcher=launcher(gpus)) if gpus > 1 else run).command()
    if "--main_process_port" in command:
        command[command.index("--main_process_port") + 1] = "<a free port on the node>"
    return command


def wait_for_rows(runs: list[EvalRun], output_dir: Path, reuse_stale: bool = False, poll_s: float = 30.0, echo=print,
                  sleep=time.sleep) -> list[RowState]:
    """Poll the rows until none is queued or running, saying each change of state; return the final states."""
    seen: dict[str, str] = {}
    while True:
        states = row_states(runs, output_dir, reuse_stale)
        done = sum(state.state == "done" for state in states)
        for state in states:
            if seen.get(state.name) != state.state:
                detail = f": {state.detail}" if state.state == "failed" else ""
                echo(f"[{done}/{len(states)} done] {state.name}: {state.state}{detail}")
                seen[state.name] = state.state
        if not any(state.state in ("queued", "running") for state in states):
            return states
        sleep(poll_s)
