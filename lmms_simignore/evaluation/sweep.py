"""Run a declarative config (rows of model_args) through the real lmms-eval CLI and tabulate the rows.

A config is YAML:

    name: attribution
    model: llava_simignore          # lmms-eval --model
    tasks: scienceqa_img            # lmms-eval --tasks (comma-separated for several)
    batch_size: 1
    model_args:                     # shared by every row
      pretrained: llava-hf/llava-1.5-7b-hf
    rows:                           # one lmms-eval run each
      - name: baseline
        model_args: {reduction: none}
      - name: simignore_mask
        model_args: {reduction: simignore, ignore: 124, apply: mask}
    slurm: {gpus: 1, time: "4:00:00", partition: gpu}   # optional: each row's job with a job launcher (`jobs`)

Each row writes into its own folder under the output directory, atomically (see `runs.run_lmms_eval`):
a finished row is read back when the sweep is run again with the same lmms-eval arguments, a half-written
one is redone, and one whose arguments changed since it ran (an edited row, `--set`, `--limit`) runs again.
So does a finished row produced by other code (`runs.code_change`: another git commit of this project, or,
when a commit cannot tell, because the work tree has uncommitted changes or is no git checkout, another
lmms-simignore version), and the sweep says which row and what differed; `reuse_stale` (`--reuse-stale`) reads
such rows back as they are, saying so. With a job launcher (`jobs`: Slurm, or local processes) each row is one job
that runs it the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmms_simignore.engine.accounting import TokenAccounting, layer_runs
from lmms_simignore.evaluation.runs import (RUN_DIR, EvalRun, LmmsEvalFailed, current_code, find_results, launcher, read_samples,
                                            reuse_state, run_lmms_eval)
from lmms_simignore.markdown import table


# How a published figure was measured: LLaVA's own evaluation scripts (our scienceqa_img_llava task), lmms-eval's
# scienceqa_img, or not stated by its source.
REPORTED_PROTOCOLS = ("llava", "lmms-eval", "unknown")
PROTOCOL_TASKS = {"llava": "scienceqa_img_llava", "lmms-eval": "scienceqa_img"}


def task_protocol(task: str) -> str | None:
    """The ScienceQA-IMG protocol a task name stands for (a local copy included), or None for other tasks."""
    if task.startswith("scienceqa_img_llava"):
        return "llava"
    return "lmms-eval" if task.startswith("scienceqa_img") else None


def protocol_label(reported: dict) -> str:
    return {"llava": "LLaVA's evaluation scripts", "lmms-eval": "lmms-eval's scienceqa_img"}.get(reported.get("protocol"), "protocol unknown")


@dataclass(frozen=True)
class SweepRow:
    name: str
    model_args: dict
    reported: dict | None = None  # a published figure ({value, source, protocol}); shown apart, never as measured


@dataclass(frozen=True)
class SweepConfig:
    name: str
    model: str
    tasks: str
    batch_size: int
    model_args: dict
    rows: tuple[SweepRow, ...]
    overrides: dict  # applied on top of every row (command-line --set)
    shapes_task: dict | None = None  # {name, questions, seed}: generate this shapes split for the rows (offline testbed)
    slurm: object = None  # `jobs.JobSettings`: what each row's job asks for with a job launcher (the `slurm:` block)


def load_config(path: str | Path, overrides: dict | None = None, tasks: str | None = None, only_rows: str | None = None,
                model: str | None = None) -> SweepConfig:
    """Read a sweep YAML; `overrides` replace model_args in every row (e.g. a local `pretrained`), `tasks` the tasks,
    `only_rows` ("name,name") keeps those rows (in the config's order), `model` the lmms-eval model class."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise ValueError(f"{path}: a sweep config needs a non-empty `rows:` list")
    allowed = ("name", "description", "model", "tasks", "batch_size", "model_args", "rows", "shapes_task", "slurm")
    unknown = set(data) - set(allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
    shapes_task = data.get("shapes_task")
    if shapes_task is not None and (not isinstance(shapes_task, dict) or set(shapes_task) - {"name", "questions", "seed"}):
        raise ValueError(f"{path}: shapes_task must be a mapping with keys among name, questions, seed; got {shapes_task!r}")
    from lmms_simignore.evaluation.jobs import JobSettings

    if not isinstance(data.get("slurm") or {}, dict):
        raise ValueError(f"{path}: slurm must be a mapping (time, gpus, partition, ...), got {data['slurm']!r}")
    slurm = JobSettings.from_mapping(data.get("slurm"), source=f"{path}: slurm")
    rows, seen = [], set()
    for index, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"{path}: row {index} needs a `name:`")
        if row["name"] in seen:
            raise ValueError(f"{path}: row name {row['name']!r} appears twice")
        seen.add(row["name"])
        unknown_row_keys = set(row) - {"name", "model_args", "reported"}
        if unknown_row_keys:
            raise ValueError(f"{path}: row {row['name']!r} has unknown keys {sorted(unknown_row_keys)}; allowed: name, model_args, reported")
        reported = row.get("reported")
        if reported is not None and (not isinstance(reported, dict) or set(reported) != {"value", "source", "protocol"}
                                     or reported["protocol"] not in REPORTED_PROTOCOLS):
            raise ValueError(f"{path}: row {row['name']!r}: reported must be {{value: number, source: text, protocol: "
                             f"{' | '.join(REPORTED_PROTOCOLS)}}} (how the figure was measured), got {reported!r}")
        rows.append(SweepRow(str(row["name"]), dict(row.get("model_args") or {}), reported))
    if only_rows is not None:
        wanted = [name.strip() for name in str(only_rows).split(",") if name.strip()]
        missing = [name for name in wanted if name not in seen]
        if not wanted or missing:
            raise ValueError(f"{path}: --rows {only_rows!r}: no row named {', '.join(missing) or '(none given)'}; "
                             f"the rows are {', '.join(row.name for row in rows)}")
        rows = [row for row in rows if row.name in wanted]
    if not (tasks or data.get("tasks")):
        raise ValueError(f"{path}: give `tasks:` in the config or --tasks")
    return SweepConfig(
        name=str(data.get("name", path.stem)),
        model=str(model or data.get("model", "llava_simignore")),
        tasks=str(tasks or data["tasks"]),
        batch_size=int(data.get("batch_size", 1)),
        model_args=dict(data.get("model_args") or {}),
        rows=tuple(rows),
        overrides=dict(overrides or {}),
        shapes_task=dict(shapes_task) if shapes_task is not None else None,
        slurm=slurm,
    )


def local_task_names(tasks: str, folder: str | Path) -> str:
    """The tasks "a,b" as their local copies in `folder` ("a_local,b_local": the YAMLs `local-tasks` writes there); a
    task without one is refused, naming it."""
    folder = Path(folder)
    missing = [task for task in tasks.split(",") if not (folder / f"{task}_local.yaml").is_file()]
    if missing:
        raise ValueError(f"--local-tasks {folder}: no local copy of {', '.join(missing)} (expected {missing[0]}_local.yaml "
                         f"there; write it with `python -m lmms_simignore local-tasks --data DATA --out {folder}`)")
    return ",".join(f"{task}_local" for task in tasks.split(","))


def format_model_args(model_args: dict) -> str:
    """{'reduction': 'simignore', 'keep': 0.5} -> 'reduction=simignore,keep=0.5' (lmms-eval's --model_args)."""
    parts = []
    for key, value in model_args.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "," in text or "=" in text:
            raise ValueError(f"model_args {key}={text!r}: lmms-eval's --model_args cannot hold ',' or '=' in a value")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def row_runs(config: SweepConfig, output_dir: Path, include_path: Path | None = None, extra_args: tuple[str, ...] = (),
             processes: int = 1) -> list[EvalRun]:
    """One lmms-eval run per row; every row logs its per-sample token accounting into its folder."""
    runs = []
    for row in config.rows:
        model_args = {**config.model_args, **row.model_args, **config.overrides, "token_log": f"{RUN_DIR}/tokens.jsonl"}
        runs.append(
            EvalRun(
                name=row.name,
                model=config.model,
                model_args=format_model_args(model_args),
                tasks=config.tasks,
                output_dir=output_dir / row.name,
                include_path=include_path,
                batch_size=config.batch_size,
                extra_args=extra_args,
                launcher=launcher(processes),
            )
        )
    return runs


def task_metrics(task_results: dict) -> dict[str, float]:
    """Every numeric metric of a task without its filter suffix and without stderrs:
    {'exact_match': 0.93, 'acc_colour': 1.0, ...} (breakdowns such as per-type accuracy included)."""
    return {
        key.split(",")[0]: float(value)
        for key, value in task_results.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key and key != "alias"
    }


def main_metric(task_results: dict) -> tuple[str, float]:
    """The first metric lmms-eval reports for a task, e.g. ('exact_match', 0.93)."""
    metrics = task_metrics(task_results)
    if not metrics:
        raise ValueError(f"no metric in task results {sorted(task_results)}")
    return next(iter(metrics.items()))


def summarize_row(run: EvalRun, results: dict) -> dict:
    """Accuracy per task (main metric and all metrics), image tokens per layer and their mean, and the answers."""
    accounting = TokenAccounting.read(sorted(run.output_dir.glob("tokens.jsonl*")))
    tasks = run.tasks.split(",")
    return {
        "name": run.name,
        "model_args": run.model_args,
        "metrics": {task: main_metric(results["results"][task]) for task in tasks},
        "all_metrics": {task: task_metrics(results["results"][task]) for task in tasks},
        "image_tokens": accounting.image_tokens_per_sample(),
        "visible_per_layer": accounting.visible_per_layer(),
        "mean_visible": accounting.mean_visible(),
        "answers": {task: [sample["filtered_resps"] for sample in read_samples(run.output_dir, task)] for task in tasks},
    }


def markdown_table(summaries: list[dict]) -> str:
    """One line per row: metric per task, image tokens per layer, mean over layers, answers equal to the first row."""
    tasks = list(summaries[0]["metrics"])
    header = ["row"] + [f"{task} {summaries[0]['metrics'][task][0]}" for task in tasks]
    header += ["image tokens per layer", "mean visible", "answers = first row"]
    body = []
    reference = summaries[0]["answers"]
    for summary in summaries:
        same = sum(a == b for task in tasks for a, b in zip(summary["answers"][task], reference[task]))
        total = sum(len(reference[task]) for task in tasks)
        cells = [summary["name"]] + [f"{summary['metrics'][task][1]:.4f}" for task in tasks]
        per_layer = layer_runs([round(v, 1) for v in summary["visible_per_layer"]]) if summary["visible_per_layer"] else "-"
        cells += [per_layer, f"{summary['mean_visible']:.1f} / {summary['image_tokens']:.0f}", f"{same}/{total}"]
        body.append(cells)
    return table(header, body)


def _shapes_task_dir(spec: dict, tasks_dir: Path, write: bool) -> Path:
    """Generate the config's shapes split once (same spec, same data) and return the folder for --include_path."""
    from lmms_simignore.testbed.shapes import HELD_OUT_SEED, write_shapes_task

    name = spec.get("name", "shapes_heldout")
    if write and not (tasks_dir / f"{name}.yaml").exists():
        write_shapes_task(tasks_dir, num_questions=int(spec.get("questions", 200)), seed=int(spec.get("seed", HELD_OUT_SEED)), task_name=name)
    return tasks_dir


def sweep_runs(config: SweepConfig, output_dir: str | Path, include_path: Path | None = None, extra_args: tuple[str, ...] = (),
               processes: int = 1, write: bool = True, echo=print) -> list[EvalRun]:
    """The rows' lmms-eval runs under `output_dir` (the config's shapes split generated there when `write`); says when a
    row's published figure was measured with another protocol than the tasks run."""
    output_dir = Path(output_dir).resolve()
    if config.shapes_task is not None:
        if include_path is not None:
            raise ValueError("a config with shapes_task generates its own task folder; do not pass --include_path too")
        include_path = _shapes_task_dir(config.shapes_task, output_dir / "tasks", write=write)
    ran = {task_protocol(task) for task in config.tasks.split(",")}
    for row in config.rows:  # a published figure is compared with a run of its own protocol, or the user is told
        if row.reported is not None and row.reported["protocol"] in PROTOCOL_TASKS and row.reported["protocol"] not in ran:
            echo(f"note: row {row.name} is compared with a figure measured with {protocol_label(row.reported)}, "
                 f"but runs {config.tasks}")
    return row_runs(config, output_dir, include_path, extra_args, processes=processes)


def run_sweep(
    config: SweepConfig,
    output_dir: str | Path,
    include_path: Path | None = None,
    extra_args: tuple[str, ...] = (),
    dry_run: bool = False,
    echo=print,
    show_table: bool = True,
    processes: int = 1,
    reuse_stale: bool = False,
    keep_going: bool = False,
) -> list[dict]:
    """Run every row (skipping finished ones), write table.md and summary.json, return the row summaries.

    A finished row produced by other code than now (`runs.code_change`) runs again, unless `reuse_stale`. A row whose
    lmms-eval run fails stops the sweep (`runs.LmmsEvalFailed`); with `keep_going` the other rows run, the failed ones
    (each with its first error line) go to failed.json, and `SweepFailed` is raised at the end."""
    output_dir = Path(output_dir).resolve()
    runs = sweep_runs(config, output_dir, include_path, extra_args, processes=processes, write=not dry_run, echo=echo)
    if dry_run:
        for run in runs:
            echo(" ".join(run.command()))
        return []
    summaries, failed = [], {}
    current = current_code()
    for index, run in enumerate(runs, start=1):
        state, changes = reuse_state(run, current)
        if state == "stale":
            action = "reusing it as it is (--reuse-stale)" if reuse_stale else "re-running (--reuse-stale keeps it)"
            echo(f"row {run.name} was produced {changes[0]}: {action}")
        if state == "finished" or (state == "stale" and reuse_stale):
            echo(f"[{index}/{len(runs)}] {run.name}: done, reading")
        else:
            again = f"; it ran with other arguments ({'; '.join(changes)}), running it again" if state == "changed" else ""
            echo(f"[{index}/{len(runs)}] {run.name}: running{' x ' + str(processes) + ' processes' if processes > 1 else ''}{again} "
                 f"(in {run.output_dir.name}.partial until it finishes)")
        try:
            results = run_lmms_eval(run, echo=echo, reuse_stale=reuse_stale)
        except LmmsEvalFailed as failure:
            if not keep_going:
                raise
            echo(f"row {run.name} failed: {failure.first_error or 'exit code ' + str(failure.exit_code)} (log: {failure.log_path}); "
                 f"going on (--keep-going)")
            failed[run.name] = failure.first_error or f"exit code {failure.exit_code}"
            continue
        summaries.append(summarize_row(run, results))
    write_sweep_outputs(config, output_dir, summaries, failed, echo=echo, show_table=show_table)
    return summaries


def collect_finished_rows(config: SweepConfig, runs: list[EvalRun], output_dir: str | Path, echo=print, show_table: bool = True) -> list[dict]:
    """Summaries of rows that all finished (e.g. as cluster jobs), with table.md and summary.json written as `run_sweep`
    writes them."""
    summaries = [summarize_row(run, json.loads(find_results(run.output_dir).read_text())) for run in runs]
    write_sweep_outputs(config, Path(output_dir).resolve(), summaries, {}, echo=echo, show_table=show_table)
    return summaries


def write_sweep_outputs(config: SweepConfig, output_dir: Path, summaries: list[dict], failed: dict[str, str], echo=print,
                        show_table: bool = True) -> None:
    """failed.json (rows that failed, with their first error line; removed when none did), reported.json, table.md and
    summary.json; raises `SweepFailed` when rows failed."""
    failed_path = output_dir / "failed.json"
    if failed:
        failed_path.write_text(json.dumps(failed, indent=2))
    elif failed_path.exists():
        failed_path.unlink()
    if not summaries:
        raise SweepFailed(failed)
    reported = {row.name: row.reported for row in config.rows if row.reported is not None}
    if reported:
        (output_dir / "reported.json").write_text(json.dumps(reported, indent=2))
    table = markdown_table(summaries)
    (output_dir / "table.md").write_text(f"# {config.name}\n\n{table}\n")
    (output_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
    if show_table:
        echo(f"\n{table}")
    echo(f"\nrows, logs and per-sample outputs: {output_dir}")
    if failed:
        raise SweepFailed(failed)


class SweepFailed(Exception):
    """Rows whose lmms-eval run failed in a sweep that went on (`keep_going`): {row: first error line}."""

    def __init__(self, failed: dict[str, str]):
        self.failed = failed
        super().__init__(f"{len(failed)} row(s) failed: " + "; ".join(f"{name}: {error}" for name, error in failed.items()))
