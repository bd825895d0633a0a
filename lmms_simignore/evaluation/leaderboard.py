"""`python -m lmms_simignore leaderboard DIR`: finished sweep rows -> Markdown, CSV and a PNG plot, with provenance.

A row is a folder that `runs.run_lmms_eval` finished (it holds `provenance.json` and lmms-eval's results);
half-written rows (`*.partial`) are never read. Per row: the main metric and its breakdowns, the image tokens
each decoder layer saw and their average, the prefill FLOPs relative to the `reduction=none` row of the same
model and task (`lmms_simignore.bench.flops`), wall time, and where the numbers come from.

Against the `none` row of the same model and task, sample by sample where lmms-eval logged the samples
(`lmms_simignore.evaluation.measures`): relative accuracy (%) and its mean over the suite's tasks; agreement (the share of
answers identical to `none`'s, the share of `none`'s correct answers kept); each task's image dependence (`none` minus
the row that saw no image token, found by its token accounting); VTC-Bench's split by each `pool` row (the samples it
still answers vs those it loses) with every row's accuracy on both; and pareto.png: accuracy against mean prefill
FLOPs, and against the prefill time `bench` measured (`--bench bench.json`) for the rows it ran with the same settings
on the same decoder, the frontier drawn.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lmms_simignore.engine.accounting import TokenAccounting, layer_runs
from lmms_simignore.evaluation import measures
from lmms_simignore.evaluation.runs import PROVENANCE, find_results, read_samples
from lmms_simignore.evaluation.sweep import main_metric, protocol_label, task_metrics
from lmms_simignore.markdown import table


def parse_model_args(model_args: str) -> dict[str, str]:
    """'pretrained=x,reduction=none' -> {'pretrained': 'x', 'reduction': 'none'}."""
    return dict(part.split("=", 1) for part in model_args.split(",") if "=" in part)


def method_name(args: dict[str, str]) -> str:
    """The method a row runs: its preset, else its reduction (default none), with `apply=mask` and an adaptive budget
    (keep=auto: its own line in the accuracy-tokens plot) marked; a row that keeps no image token is "no image tokens"."""
    if "preset" in args:
        return f"preset {args['preset']}"
    method = args.get("reduction", "none")
    if args.get("keep") == "0":
        return "no image tokens"  # whichever reduction keeps them
    if args.get("keep") == "auto":
        method = f"{method} keep=auto"
    return f"{method} (mask)" if args.get("apply") == "mask" and method != "none" else method


def _decoder_shape(pretrained: str, cache: dict):
    if pretrained not in cache:
        from transformers import AutoConfig

        from lmms_simignore.bench.flops import DecoderShape
        from lmms_simignore.shipped import resolve_pretrained

        try:
            cache[pretrained] = DecoderShape.from_text_config(AutoConfig.from_pretrained(resolve_pretrained(pretrained)).text_config)
        except (OSError, ValueError, AttributeError):
            cache[pretrained] = None  # config not available offline: no FLOP estimate
    return cache[pretrained]


def collect_rows(directory: str | Path) -> list[dict]:
    """Every finished row under `directory` (sorted by folder), one entry per (row, task)."""
    from lmms_simignore.bench.flops import sample_prefill_flops

    directory = Path(directory)
    shapes: dict = {}
    rows = []
    for record_path in sorted(directory.rglob(PROVENANCE)):
        row_dir = record_path.parent
        if any(part.endswith(".partial") for part in row_dir.relative_to(directory).parts):
            continue
        results_path = find_results(row_dir)
        if results_path is None:
            continue
        provenance = json.loads(record_path.read_text())
        results = json.loads(results_path.read_text())["results"]
        args = parse_model_args(provenance["model_args"])
        accounting = TokenAccounting.read(sorted(row_dir.glob("tokens.jsonl*")))
        shape = _decoder_shape(args.get("pretrained", ""), shapes)
        with_images = accounting.with_images
        flops = sum(sample_prefill_flops(shape, r) for r in with_images) / len(with_images) if shape and with_images else None
        for task in provenance["tasks"].split(","):
            metric, value = main_metric(results[task])
            answers, answers_note = _answers(row_dir, task, metric, tuple(task_metrics(results[task])))
            rows.append({
                "row": str(row_dir.relative_to(directory)),
                "method": method_name(args),
                "model": args.get("pretrained", ""),
                "task": task,
                "metric": metric,
                "value": value,
                "breakdown": {k: v for k, v in task_metrics(results[task]).items() if k != metric},
                "image_tokens": accounting.image_tokens_per_sample(),
                "visible_per_layer": accounting.visible_per_layer(),
                "mean_visible": accounting.mean_visible(),
                "prefill_flops": flops,
                "tokens_by_objects": _tokens_by_objects(directory / "tasks", task, accounting),
                "wall_s": provenance["wall_s"],
                "provenance": provenance,
                "answers": answers,  # doc_id -> measures.Answer, None when not readable (answers_note says why)
                "answers_note": answers_note,
                "no_image_tokens": measures.sees_no_image_tokens([r for r in accounting.records if r.get("task") == task]),
            })
    summary = directory / "summary.json"  # the sweep's row order, when the sweep wrote one
    if summary.is_file():
        order = {entry["name"]: index for index, entry in enumerate(json.loads(summary.read_text()))}
        rows.sort(key=lambda row: order.get(row["row"], len(order)))
    reported_path = directory / "reported.json"  # published figures named by the sweep config, kept apart
    reported = json.loads(reported_path.read_text()) if reported_path.is_file() else {}
    for row in rows:
        row["reported"] = reported.get(row["row"])
    for row in rows:  # FLOPs relative to the unreduced row of the same model and task
        baseline = _baseline(rows, row)
        usable = baseline is not None and baseline["prefill_flops"] and row["prefill_flops"] is not None
        row["flops_vs_baseline"] = row["prefill_flops"] / baseline["prefill_flops"] if usable else None
    _add_measures(rows)
    return rows


def _baseline(rows: list[dict], row: dict) -> dict | None:
    """The (first) `none` row of `row`'s model and task."""
    return next((b for b in rows if b["method"] == "none" and (b["model"], b["task"]) == (row["model"], row["task"])), None)


def _answers(row_dir: Path, task: str, metric: str, others: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """(doc_id -> Answer, None) from the samples lmms-eval logged, or (None, why not)."""
    try:
        return measures.answers(read_samples(row_dir, task), metric, others), None
    except FileNotFoundError:
        return None, "no samples logged (--log_samples)"
    except ValueError as error:
        return None, str(error)


def _add_measures(rows: list[dict]) -> None:
    """Relative accuracy and its suite average, agreement with `none`, image dependence, the split by each `pool`
    row and the FLOPs Pareto frontier, into each row (see the module docstring)."""
    suites: dict[str, list[str]] = {}  # the suite of a model: every task a row of it ran, in order
    for row in rows:
        suites.setdefault(row["model"], [])
        if row["task"] not in suites[row["model"]]:
            suites[row["model"]].append(row["task"])
    for row in rows:
        baseline = _baseline(rows, row)
        row["relative"] = measures.relative_accuracy(row["value"], baseline["value"] if baseline else None)
        both = baseline is not None and row["answers"] is not None and baseline["answers"] is not None
        row["agreement"] = measures.agreement(row["answers"], baseline["answers"]) if both else None
        zero = next((z for z in rows if z["no_image_tokens"] and (z["model"], z["task"]) == (row["model"], row["task"])), None)
        row["zero_image_row"] = zero["row"] if zero else None
        row["image_dependence"] = baseline["value"] - zero["value"] if zero and baseline else None
        pools = [p for p in rows if p["method"] == "pool" and (p["model"], p["task"]) == (row["model"], row["task"])]
        splits = {pool["row"]: measures.split(pool["answers"], row["answers"])
                  for pool in pools if pool["answers"] is not None and row["answers"] is not None}
        row["splits"] = {name: part for name, part in splits.items() if part is not None}
    for row in rows:
        row["bench_prefill_s"] = row["time_frontier"] = None  # measured prefill: add_bench_times
        relative = {other["task"]: other["relative"] for other in rows if other["row"] == row["row"]}
        row["suite_average"] = measures.suite_average(relative, suites[row["model"]])
    for group in _groups(rows).values():
        priced = [row for row in group if row["prefill_flops"] is not None]
        front = measures.pareto_front([(row["prefill_flops"], row["value"]) for row in priced])
        for index, row in enumerate(priced):
            row["flops_frontier"] = index in front
        for row in group:
            row.setdefault("flops_frontier", None)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (model, task), in row order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"]), []).append(row)
    return groups


def reduction_settings(model_args: str):
    """The `ReductionSettings` a row's model_args (its command-line text, as lmms-eval parses it) build."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_simignore.models.presets import reduction_settings_of

    return reduction_settings_of(simple_parse_args_string(model_args))


def add_bench_times(rows: list[dict], report: dict, source: str = "bench.json") -> dict[str, str]:
    """Each row's measured LLM prefill (`bench_prefill_s`: the median seconds for the bench's batch) from a bench report
    (bench.json), where it is measured on the same shape: the bench model that ran the row's model's decoder
    (`measures.runs_decoder`), and its row with the same reduction settings. Returns {sweep model: bench model}.

    Raises ValueError, with the numbers compared, when no bench model ran any sweep model's decoder."""
    matched, compared = {}, []
    shapes: dict = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        shape = _decoder_shape(model, shapes)
        sample = next((row for row in rows if row["model"] == model and row["visible_per_layer"]), None)
        if shape is None or sample is None:
            compared.append(f"sweep model {model}: no decoder shape or token accounting to compare")
            continue
        layers, image_tokens = len(sample["visible_per_layer"]), sample["image_tokens"]
        found = [name for name, bench in report["models"].items() if measures.runs_decoder(bench, shape, layers, image_tokens)]
        if found:
            matched[model] = found[0]
        else:
            compared.append(f"sweep model {model}: {layers} layers, {image_tokens:g} image tokens, {shape}")
    if not matched:
        benches = "; ".join(f"{name}: {bench['layers']} layers, {bench['image_tokens']:g} image tokens, none row "
                            f"{bench['rows']['none']['prefill_flops']:.6g} FLOPs for prompts of {bench['prompt_tokens']} tokens"
                            for name, bench in report["models"].items() if "none" in bench["rows"])
        raise ValueError(f"{source}: no bench model ran the decoder of a sweep model ({'; '.join(compared)}); "
                         f"the bench's: {benches or 'none with a none row'}")
    for row in rows:
        if row["model"] in matched:
            settings = repr(reduction_settings(row["provenance"]["model_args"]))
            bench = report["models"][matched[row["model"]]]["rows"]
            same = next((result for result in bench.values() if result["settings"] == settings), None)
            row["bench_prefill_s"] = same["prefill_s"]["median"] if same else None
    for group in _groups(rows).values():
        timed = [row for row in group if row["bench_prefill_s"] is not None]
        front = measures.pareto_front([(row["bench_prefill_s"], row["value"]) for row in timed])
        for index, row in enumerate(timed):
            row["time_frontier"] = index in front
    return matched


def _tokens_by_objects(tasks_dir: Path, task: str, accounting: TokenAccounting) -> dict[str, float] | None:
    """For a shapes task the sweep generated (its parquet under `tasks_dir`): the image tokens each sample kept (mean
    over layers), averaged per object count; None for other tasks."""
    task_yaml = tasks_dir / f"{task}.yaml"
    if not task_yaml.is_file():
        return None
    from lmms_simignore.local_data import read_task_config

    files = read_task_config(task_yaml).get("dataset_kwargs", {}).get("data_files", {})
    data = Path(files.get("test", "")) if isinstance(files, dict) else None
    if data is None or not data.is_file():
        return None
    import pyarrow.parquet as parquet

    if "num_objects" not in parquet.read_schema(data).names:
        return None
    objects = parquet.read_table(data, columns=["num_objects"]).column("num_objects").to_pylist()
    kept: dict[int, list[float]] = {}
    for record in accounting.with_images:
        if record.get("task") == task and record["doc_id"] < len(objects):
            kept.setdefault(objects[record["doc_id"]], []).append(record["mean_visible"])
    return {str(count): sum(values) / len(values) for count, values in sorted(kept.items())} or None


def _breakdown_columns(rows: list[dict]) -> list[str]:
    """Per-type accuracies to show in Markdown (all breakdowns go to the CSV); object-count buckets are left out."""
    names = []
    for row in rows:
        names += [name for name in row["breakdown"] if name not in names and not name.startswith("acc_objects_")]
    return names


def _percent(part: int | None, whole: int | None) -> str:
    return f"{100 * part / whole:.1f}% ({part}/{whole})" if whole else "-"


def _fraction(part: int, whole: int) -> str:
    return f"{part / whole:.3f} ({part}/{whole})" if whole else "-"


def measures_markdown(rows: list[dict], bench: dict | None = None) -> list[str]:
    """The measures against `none` as Markdown lines: relative accuracy, agreement, image dependence per task, the
    downsampling splits and the Pareto frontiers. bench: {"source", "machine", "batch_size", "matched"} of a bench
    report whose times the rows carry (`add_bench_times`)."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    several_models = len({row["model"] for row in rows}) > 1
    folders = list(dict.fromkeys(row["row"] for row in rows))
    by_folder = {folder: [row for row in rows if row["row"] == folder] for folder in folders}
    body = []
    for folder in folders:
        members = {row["task"]: row for row in by_folder[folder]}
        first = by_folder[folder][0]
        cells = [folder, first["method"], *([first["model"]] if several_models else [])]
        cells += ["-" if task not in members or members[task]["relative"] is None else f"{members[task]['relative']:.1f}" for task in tasks]
        body.append(cells + [str(first["suite_average"])])
    header = ["row", "method", *(["model"] if several_models else []), *(f"{task} %" for task in tasks), "suite average %"]
    lines = ["Relative accuracy: the main metric as a percentage of the `none` row of the same model and task; the suite "
             "average is the mean over the model's tasks (every task its rows ran) where the row has one: a task the row "
             "did not run, or one without a `none` row, is left out, and the average then says over how many tasks", "",
             table(header, body, align="ll" + "l" * several_models + "r" * (len(tasks) + 1)), ""]

    body, notes = [], []
    for row in rows:
        agreement = row["agreement"]
        if agreement is None:
            why = row["answers_note"] or ("no `none` row" if _baseline(rows, row) is None else _baseline(rows, row)["answers_note"])
            notes.append(f"{row['row']} ({row['task']}): {why}")
            continue
        body.append([row["row"], row["task"], agreement.compared, _percent(agreement.same, agreement.compared),
                     _percent(agreement.kept, agreement.baseline_correct)])
    lines += ["Agreement with `none`, sample by sample (matched by lmms-eval's doc_id over the samples both rows logged)", ""]
    if body:
        lines += [table(["row", "task", "samples compared", "same answer as none", "none's correct answers kept"], body, align="llrrr"), ""]
    lines += [*(f"- no agreement for {note}" for note in notes), *([""] if notes else [])]

    body = []
    for (model, task), group in _groups(rows).items():
        baseline = _baseline(rows, group[0])
        zero = next((row for row in group if row["no_image_tokens"]), None)
        cells = [model, task, group[0]["metric"], "no none row" if baseline is None else f"{baseline['value']:.4f}"]
        if zero is None:
            cells += ["no zero-image row", "-", "-"]
        else:
            cells += [zero["row"], f"{zero['value']:.4f}", "-" if zero["image_dependence"] is None else f"{zero['image_dependence']:+.4f}"]
        body.append(cells)
    lines += ["Tasks: image dependence = `none` minus the row that saw no image token (its token accounting: image tokens "
              "in every prompt, 0 visible at every layer)", "",
              table(["model", "task", "metric", "none", "zero-image row", "its value", "image dependence"], body, align="lllrlrr"), ""]

    pools = [row for row in rows if row["method"] == "pool"]
    if not pools:
        lines += ["Downsampling split (VTC-Bench): no `pool` row, no split", ""]
    for pool in pools:
        group = _groups(rows)[(pool["model"], pool["task"])]
        parts = [(row, row["splits"].get(pool["row"])) for row in group]
        parts = [(row, part) for row, part in parts if part is not None]
        if not parts:
            why = pool["answers_note"] or f"the task's {pool['metric']} does not say per sample whether an answer is right"
            lines += [f"Downsampling split by {pool['row']} ({pool['task']}): {why}", ""]
            continue
        own = next(part for row, part in parts if row is pool)
        lines += [f"Downsampling split (VTC-Bench) by {pool['row']} ({pool['mean_visible']:g} image tokens per layer) on "
                  f"{pool['task']}: easy = the {own.easy} samples it answers correctly, hard = the {own.hard} it loses", "",
                  table(["row", "method", "easy accuracy", "hard accuracy"],
                        [[row["row"], row["method"], _fraction(part.easy_correct, part.easy), _fraction(part.hard_correct, part.hard)]
                         for row, part in parts], align="llrr"), ""]

    lines += ["Pareto frontier (pareto.png): the rows no other row beats on both accuracy and cost, cheapest first", ""]
    for (model, task), group in _groups(rows).items():
        where = f"{task}" + (f" ({model})" if several_models else "")
        on_front = sorted((row for row in group if row["flops_frontier"]), key=lambda row: row["prefill_flops"])
        lines.append(f"- {where}, mean prefill FLOPs per sample: " + (", ".join(row["row"] for row in on_front) or "no FLOP estimate"))
        if bench is not None:
            timed = sorted((row for row in group if row["time_frontier"]), key=lambda row: row["bench_prefill_s"])
            measured = sum(row["bench_prefill_s"] is not None for row in group)
            lines.append(f"- {where}, measured LLM prefill ({measured} of {len(group)} rows measured): "
                         + (", ".join(row["row"] for row in timed) or "none"))
    if bench is not None:
        lines.append(f"- measured: {bench['source']} ({bench['machine']}, batch {bench['batch_size']}), the bench model that ran "
                     f"the decoder of " + "; ".join(f"{model}: {name}" for model, name in bench["matched"].items())
                     + "; a row's time is the bench row's with the same reduction settings")
    return lines + [""]


def markdown(rows: list[dict], bench: dict | None = None) -> str:
    breakdowns = _breakdown_columns(rows)
    with_reported = any(row["reported"] for row in rows)
    header = ["row", "method", "task", "metric", "value", *breakdowns, "image tokens per layer", "mean / total", "prefill FLOPs vs none", "wall s"]
    header += ["reported (published, not measured here)"] if with_reported else []
    body = []
    for row in rows:
        cells = [row["row"], row["method"], row["task"], row["metric"], f"{row['value']:.4f}"]
        cells += [f"{row['breakdown'][name]:.3f}" if name in row["breakdown"] else "-" for name in breakdowns]
        cells += [layer_runs([round(v, 1) for v in row["visible_per_layer"]]) if row["visible_per_layer"] else "-",
                  f"{row['mean_visible']:.1f} / {row['image_tokens']:.0f}",
                  "-" if row["flops_vs_baseline"] is None else f"{row['flops_vs_baseline']:.3f}", f"{row['wall_s']:.0f}"]
        if with_reported:
            cells.append(f"{row['reported']['value']} ({row['reported']['source']}; {protocol_label(row['reported'])})"
                         if row["reported"] else "-")
        body.append(cells)
    lines = [table(header, body), ""]
    adaptive = [row for row in rows if row["tokens_by_objects"] and len({round(v, 1) for v in row["tokens_by_objects"].values()}) > 1]
    if adaptive:  # budgets that vary with the image: how many tokens crowded images got
        counts = sorted({int(count) for row in adaptive for count in row["tokens_by_objects"]})
        by_count = [[row["row"], *(f"{row['tokens_by_objects'][str(n)]:.1f}" if str(n) in row["tokens_by_objects"] else "-" for n in counts)]
                    for row in adaptive]
        lines += ["Image tokens kept per image (mean over layers) by the number of objects in the image", "",
                  table(["row", *(f"{n} object{'s' * (n > 1)}" for n in counts)], by_count, align="l" + "r" * len(counts)), ""]
    lines += measures_markdown(rows, bench)
    lines += ["Provenance", ""]
    provenance = []
    seen = set()
    for row in rows:
        if row["row"] in seen:
            continue
        seen.add(row["row"])
        p = row["provenance"]
        versions = p["versions"]
        provenance.append([row["row"], p["date"], f"{p['git_commit'][:12]}{'+dirty' if p['git_commit'].endswith('+dirty') else ''}",
                           versions["lmms-simignore"], versions["lmms-eval"], versions["transformers"], versions["torch"],
                           f"`{' '.join(p['command'])}`"])
    header = ["row", "date", "git commit", "lmms-simignore", "lmms-eval", "transformers", "torch", "command"]
    return "\n".join(lines + [table(header, provenance)])


def _measure_columns(row: dict, pools: list[str]) -> dict:
    """The CSV's measures against `none` (empty where there is none): relative accuracy and suite average in %,
    agreement and kept as shares, the split accuracies by each pool row, the Pareto frontiers, the measured prefill."""
    agreement, average = row["agreement"], row["suite_average"]
    columns = {
        "relative_accuracy": row["relative"], "suite_average": average.value, "suite_tasks": f"{average.tasks}/{average.of}",
        "compared_samples": agreement.compared if agreement else None, "agreement": agreement.same_share if agreement else None,
        "kept": agreement.kept_share if agreement else None, "zero_image_row": row["zero_image_row"],
        "image_dependence": row["image_dependence"], "flops_frontier": row["flops_frontier"],
        "bench_prefill_s": row["bench_prefill_s"], "time_frontier": row["time_frontier"],
    }
    for pool in pools:
        part = row["splits"].get(pool)
        columns[f"easy_accuracy_{pool}"] = part.easy_accuracy if part else None
        columns[f"hard_accuracy_{pool}"] = part.hard_accuracy if part else None
    return {key: "" if value is None else value for key, value in columns.items()}


def write_csv(rows: list[dict], path: Path) -> None:
    breakdowns = sorted({name for row in rows for name in row["breakdown"]})
    pools = list(dict.fromkeys(row["row"] for row in rows if row["method"] == "pool"))
    measure_fields = list(_measure_columns(rows[0], pools))
    fields = ["row", "method", "model", "task", "metric", "value", *breakdowns, "image_tokens", "mean_visible", "visible_per_layer",
              "prefill_flops", "flops_vs_baseline", "wall_s", "tokens_by_objects", "reported_value", "reported_source", "reported_protocol",
              *measure_fields, "date", "git_commit", "lmms_simignore", "lmms_eval", "transformers", "torch", "command"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            p = row["provenance"]
            writer.writerow({
                **{key: row[key] for key in ("row", "method", "model", "task", "metric", "value", "image_tokens", "mean_visible",
                                              "prefill_flops", "flops_vs_baseline", "wall_s")},
                **{name: row["breakdown"].get(name, "") for name in breakdowns},
                "visible_per_layer": " ".join(f"{v:g}" for v in row["visible_per_layer"]),
                "reported_value": row["reported"]["value"] if row["reported"] else "",
                "reported_source": row["reported"]["source"] if row["reported"] else "",
                "reported_protocol": protocol_label(row["reported"]) if row["reported"] else "",
                "tokens_by_objects": json.dumps(row["tokens_by_objects"]) if row["tokens_by_objects"] else "",
                **_measure_columns(row, pools),
                "date": p["date"], "git_commit": p["git_commit"], "lmms_simignore": p["versions"]["lmms-simignore"],
                "lmms_eval": p["versions"]["lmms-eval"], "transformers": p["versions"]["transformers"], "torch": p["versions"]["torch"],
                "command": " ".join(p["command"]),
            })


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def line_styles(count: int) -> list[tuple[tuple, str]]:
    """A (colour, marker) of its own for each of `count` lines (distinct colours for up to 20)."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20").colors  # the saturated ten first, then their light partners
    return [(colours[(2 * i) % 20 + (2 * i) // 20 % 2], MARKERS[i % len(MARKERS)]) for i in range(count)]


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against the mean image tokens per layer, one line per (method, task); the unreduced model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["task"]), []).append(row)
    several_tasks = len({row["task"] for row in rows}) > 1
    styles = iter(line_styles(len(groups)))
    for (method, task), members in groups.items():
        members = sorted(members, key=lambda row: row["mean_visible"])
        label = f"{method} [{task}]" if several_tasks else method
        x, y = [row["mean_visible"] for row in members], [row["value"] for row in members]
        if method == "none":
            axis.axhline(y[0], linestyle="--", color="grey", linewidth=1)
            axis.plot(x, y, marker="*", markersize=12, linestyle="none", color="grey", label=f"{label} (all tokens)")
        else:
            colour, marker = next(styles)
            axis.plot(x, y, marker=marker, color=colour, label=label)
    axis.set_xlabel("image tokens per layer (mean over layers)")
    axis.set_ylabel(f"{rows[0]['metric']}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pareto_panel(axis, group: list[dict], cost: str, frontier: str, scale: float) -> None:
    """One (model, task)'s rows as labelled points of accuracy against `cost` (a row key, times `scale`), `none` a grey
    star, the frontier (`frontier`: a row key) a step line: the best accuracy reached at or below each cost. Rows at
    the same point share one label."""
    points = [row for row in group if row[cost] is not None]
    at: dict[tuple[float, float], list[dict]] = {}
    for row in points:
        at.setdefault((row[cost] * scale, row["value"]), []).append(row)
    for (x, y), members in at.items():
        none = any(row["method"] == "none" for row in members)
        on_front = any(row[frontier] for row in members)
        axis.plot(x, y, marker="*" if none else "o", markersize=12 if none else 6,
                  color="grey" if none else ("tab:red" if on_front else "tab:blue"), linestyle="none")
        axis.annotate(", ".join(row["row"] for row in members), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                      fontweight="bold" if on_front else "normal")
    front = sorted((row for row in points if row[frontier]), key=lambda row: row[cost])
    if front:
        axis.step([row[cost] * scale for row in front], [row["value"] for row in front], where="post", color="tab:red",
                  linewidth=1, label="Pareto frontier")
        axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)


def pareto_plot(rows: list[dict], path: Path, bench: dict | None = None) -> None:
    """Accuracy against mean prefill FLOPs per sample, one panel per (model, task); with `bench`, a second panel per
    (model, task) against the measured LLM prefill of the rows the bench ran (`add_bench_times`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    groups = _groups(rows)
    columns = 2 if bench is not None else 1
    figure, axes = plt.subplots(len(groups), columns, figsize=(8 * columns, 6 * len(groups)), constrained_layout=True,
                                squeeze=False)
    several_models = len({row["model"] for row in rows}) > 1
    for (model, task), group, panels in zip(groups, groups.values(), axes):
        title = task + (f" ({model})" if several_models else "")
        _pareto_panel(panels[0], group, "prefill_flops", "flops_frontier", 1.0)
        panels[0].xaxis.set_major_formatter(EngFormatter(unit="FLOP"))
        panels[0].set_xlabel("mean prefill FLOPs per sample (decoder layers)")
        panels[0].set_ylabel(group[0]["metric"])
        panels[0].set_title(f"{title}: accuracy against FLOPs", fontsize=10)
        if bench is not None:
            _pareto_panel(panels[1], group, "bench_prefill_s", "time_frontier", 1000.0)
            panels[1].set_xlabel(f"measured LLM prefill, ms per batch of {bench['batch_size']} ({bench['machine']})")
            panels[1].set_ylabel(group[0]["metric"])
            measured = sum(row["bench_prefill_s"] is not None for row in group)
            panels[1].set_title(f"{title}: against measured time ({measured} of {len(group)} rows benched)", fontsize=10)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_bench(path: str | Path, rows: list[dict]) -> dict:
    """A bench report (bench.json of `python -m lmms_simignore bench`) put beside the rows (`add_bench_times`): its
    source, machine, batch size and which bench model stands for which sweep model."""
    report = json.loads(Path(path).read_text())
    matched = add_bench_times(rows, report, source=str(path))
    machine = report["machine"]
    return {"source": str(path), "machine": machine.get("gpu") or f"CPU, {machine['cpu_threads']} threads",
            "batch_size": report["settings"]["batch_size"], "matched": matched}


def write_leaderboard(directory: str | Path, echo=print, bench: str | Path | None = None) -> list[dict]:
    """Write leaderboard.md, leaderboard.csv, leaderboard.png and pareto.png into `directory`; return the rows.

    bench: a bench.json whose measured prefill times go beside the rows it ran on the same decoder (`add_bench_times`;
    ValueError when it ran none of the sweep's models)."""
    directory = Path(directory)
    rows = collect_rows(directory)
    if not rows:
        raise FileNotFoundError(f"{directory}: no finished rows (folders with provenance.json and lmms-eval results)")
    measured = read_bench(bench, rows) if bench is not None else None
    table = markdown(rows, measured)
    (directory / "leaderboard.md").write_text(f"# Leaderboard: {directory.name}\n\n{table}\n")
    write_csv(rows, directory / "leaderboard.csv")
    plot(rows, directory / "leaderboard.png")
    pareto_plot(rows, directory / "pareto.png", measured)
    echo(table)
    echo(f"\nwrote {directory / 'leaderboard.md'}, leaderboard.csv, leaderboard.png and pareto.png")
    return rows
