"""`python -m lmms_simignore leaderboard DIR`: finished sweep rows -> Markdown, CSV and a PNG plot, with provenance.

A row is a folder that `runs.run_lmms_eval` finished (it holds `provenance.json` and lmms-eval's results);
half-written rows (`*.partial`) are never read. Per row: the main metric and its breakdowns, the image tokens
each decoder layer saw and their average, the prefill FLOPs relative to the `reduction=none` row of the same
model and task (`lmms_simignore.bench.flops`), wall time, and where the numbers come from.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lmms_simignore.engine.accounting import TokenAccounting, layer_runs
from lmms_simignore.evaluation.runs import PROVENANCE, find_results
from lmms_simignore.evaluation.sweep import main_metric, protocol_label, task_metrics
from lmms_simignore.markdown import table


def parse_model_args(model_args: str) -> dict[str, str]:
    """'pretrained=x,reduction=none' -> {'pretrained': 'x', 'reduction': 'none'}."""
    return dict(part.split("=", 1) for part in model_args.split(",") if "=" in part)


def method_name(args: dict[str, str]) -> str:
    """The method a row runs: its preset, else its reduction (default none), with `apply=mask` and an adaptive budget
    (keep=auto: its own line in the accuracy-tokens plot) marked."""
    if "preset" in args:
        return f"preset {args['preset']}"
    method = args.get("reduction", "none")
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
        baseline = next((b for b in rows if b["method"] == "none" and (b["model"], b["task"]) == (row["model"], row["task"])), None)
        usable = baseline is not None and baseline["prefill_flops"] and row["prefill_flops"] is not None
        row["flops_vs_baseline"] = row["prefill_flops"] / baseline["prefill_flops"] if usable else None
    return rows


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


def markdown(rows: list[dict]) -> str:
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


def write_csv(rows: list[dict], path: Path) -> None:
    breakdowns = sorted({name for row in rows for name in row["breakdown"]})
    fields = ["row", "method", "model", "task", "metric", "value", *breakdowns, "image_tokens", "mean_visible", "visible_per_layer",
              "prefill_flops", "flops_vs_baseline", "wall_s", "tokens_by_objects", "reported_value", "reported_source", "reported_protocol", "date", "git_commit", "lmms_simignore", "lmms_eval", "transformers", "torch", "command"]
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


def write_leaderboard(directory: str | Path, echo=print) -> list[dict]:
    """Write leaderboard.md, leaderboard.csv and leaderboard.png into `directory`; return the rows."""
    directory = Path(directory)
    rows = collect_rows(directory)
    if not rows:
        raise FileNotFoundError(f"{directory}: no finished rows (folders with provenance.json and lmms-eval results)")
    table = markdown(rows)
    (directory / "leaderboard.md").write_text(f"# Leaderboard: {directory.name}\n\n{table}\n")
    write_csv(rows, directory / "leaderboard.csv")
    plot(rows, directory / "leaderboard.png")
    echo(table)
    echo(f"\nwrote {directory / 'leaderboard.md'}, leaderboard.csv and leaderboard.png")
    return rows
