"""`python -m lmms_simignore <command>`: the offline demo, sweeps over configs, fixtures, and task helpers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The offline demo's rows: every method at a budget the tiny testbed (25 image tokens, 3 layers) allows.
DEMO_ROWS = (
    ("none", {"reduction": "none"}),
    ("simignore_drop_50", {"reduction": "simignore", "keep": 0.5, "apply": "drop"}),
    ("simignore_mask_50", {"reduction": "simignore", "keep": 0.5, "apply": "mask"}),
    ("simignore_drop_20", {"reduction": "simignore", "keep": 0.2, "apply": "drop"}),
    ("random_50", {"reduction": "random", "keep": 0.5}),
    ("fastv_k1_50", {"reduction": "fastv", "fastv_layer": 1, "fastv_ratio": 0.5}),
    ("simignore_fastv", {"reduction": "simignore+fastv", "keep": 0.8, "apply": "mask", "fastv_layer": 1, "fastv_keep": 0.2}),
)


def _demo(args: argparse.Namespace) -> int:
    from lmms_simignore.fixtures import build_offline_testbed
    from lmms_simignore.sweep import SweepConfig, SweepRow, run_sweep

    workdir = Path(args.workdir).resolve()
    testbed = workdir / "testbed"
    if not (testbed / "tiny-llava" / "model.safetensors").exists() or not (testbed / "tasks").exists():
        print(f"building the offline testbed (tiny random LLaVA + ScienceQA-IMG-shaped data) in {testbed}")
        build_offline_testbed(testbed, num_docs=args.num_docs)
    config = SweepConfig(
        name="offline demo",
        model="llava_simignore",
        tasks="scienceqa_img_local",
        batch_size=args.batch_size,
        model_args={"pretrained": str(testbed / "tiny-llava")},
        rows=tuple(SweepRow(name, model_args) for name, model_args in DEMO_ROWS),
        overrides={},
    )
    print(f"Offline demo: {config.tasks}, {args.num_docs} docs (the last one without an image), {len(DEMO_ROWS)} lmms-eval runs")
    summaries = run_sweep(config, workdir / "runs", include_path=testbed / "tasks", echo=lambda line: print(line, flush=True))
    answers = {summary["name"]: summary["answers"] for summary in summaries}
    same = sum(a == b for a, b in zip(answers["simignore_mask_50"][config.tasks], answers["simignore_drop_50"][config.tasks]))
    print("\nThe embedded model has random weights: it does not write answer letters, so exact_match is 0;")
    print("the table shows every method end to end (a trained testbed model replaces it later).")
    print(f"mask vs drop at keep 50%: {same}/{args.num_docs} identical answers (they must all agree)")
    return 0


def _fixtures(args: argparse.Namespace) -> int:
    from lmms_simignore.fixtures import build_offline_testbed

    from lmms_simignore.fixtures import PAPER_SHAPED, TinyLlavaShape

    shape = PAPER_SHAPED if args.paper_shaped else TinyLlavaShape()
    paths = build_offline_testbed(args.directory, num_docs=args.num_docs, seed=args.seed, shape=shape)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _make_task(args: argparse.Namespace) -> int:
    from lmms_simignore.fixtures import write_local_task

    if not Path(args.parquet).is_file():
        raise SystemExit(f"--parquet {args.parquet}: no such file")
    print(write_local_task(args.out, args.parquet, task_name=args.name))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from lmms_simignore.sweep import load_config, run_sweep

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        overrides[key] = value
    config = load_config(args.config, overrides=overrides, tasks=args.tasks)
    include_path = Path(args.include_path).resolve() if args.include_path else None
    extra = ("--limit", str(args.limit)) if args.limit is not None else ()
    output = args.output or str(Path("outputs") / config.name)
    run_sweep(config, output, include_path=include_path, extra_args=extra, dry_run=args.dry_run)
    return 0


def _shapes_task(args: argparse.Namespace) -> int:
    from lmms_simignore.shapes import write_shapes_task

    print(write_shapes_task(args.out, num_questions=args.num_questions, seed=args.seed, task_name=args.name))
    return 0


def _train_shapes(args: argparse.Namespace) -> int:
    from lmms_simignore.train_shapes import train

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                    eval_every=args.eval_every, mix=tuple(args.mix.split(",")), log=lambda line: print(line, flush=True))
    print(json.dumps(summary["held_out"], indent=2))
    return 0


def _tasks_dir(args: argparse.Namespace) -> int:
    from lmms_simignore.tasks_dir import tasks_dir

    print(tasks_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_simignore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline: build the tiny testbed, run lmms-eval for every reduction method, print a table")
    demo.add_argument("--workdir", default="outputs/demo", help="where the testbed and lmms-eval outputs go (default: %(default)s)")
    demo.add_argument("--num-docs", type=int, default=24, help="docs in the local ScienceQA-IMG-shaped split (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=4, help="lmms-eval --batch_size (default: %(default)s)")
    demo.set_defaults(handler=_demo)

    fixtures = commands.add_parser("fixtures", help="write the tiny random LLaVA, local parquet data and task YAML")
    fixtures.add_argument("directory")
    fixtures.add_argument("--num-docs", type=int, default=12)
    fixtures.add_argument("--seed", type=int, default=0)
    fixtures.add_argument(
        "--paper-shaped", action="store_true", help="576 image tokens and 6 decoder layers, so the paper's budgets run as is"
    )
    fixtures.set_defaults(handler=_fixtures)

    sweep = commands.add_parser("sweep", help="run every row of a config through lmms-eval and print one table")
    sweep.add_argument("config", help="sweep YAML (see configs/)")
    sweep.add_argument("--output", help="folder for the rows' outputs, table.md and summary.json (default: outputs/<config name>)")
    sweep.add_argument("--tasks", help="replace the config's tasks (e.g. a local copy)")
    sweep.add_argument("--include-path", help="lmms-eval --include_path for task YAMLs outside lmms-eval")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model_arg for every row, over the config's (repeatable)")
    sweep.add_argument("--limit", type=int, help="lmms-eval --limit: only the first N docs per task")
    sweep.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands, run nothing")
    sweep.set_defaults(handler=_sweep)

    make_task = commands.add_parser("make-task", help="write a ScienceQA-IMG task YAML that reads a local parquet file")
    make_task.add_argument("--parquet", required=True, help="ScienceQA-IMG test split as parquet (image, question, choices, answer, hint, ...)")
    make_task.add_argument("--name", default="scienceqa_img_local", help="task name; must differ from built-in tasks")
    make_task.add_argument("--out", required=True, help="folder for the YAML; pass it to lmms-eval --include_path")
    make_task.set_defaults(handler=_make_task)

    shapes_task = commands.add_parser("shapes-task", help="generate a shapes benchmark split and its lmms-eval task YAML")
    shapes_task.add_argument("--out", required=True, help="folder for the data and the YAML; pass it to lmms-eval --include_path")
    shapes_task.add_argument("--num-questions", type=int, default=500)
    shapes_task.add_argument("--seed", type=int, default=1, help="generator seed (the shipped model was trained on fresh seeds, held out 10000)")
    shapes_task.add_argument("--name", default="shapes_local", help="task name for --tasks")
    shapes_task.set_defaults(handler=_shapes_task)

    training = commands.add_parser("train-shapes", help="train the small shapes LLaVA from scratch")
    training.add_argument("--out", required=True, help="folder for weights, processor and training.json")
    training.add_argument("--steps", type=int, default=6000)
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    training.add_argument("--eval-every", type=int, default=500)
    training.add_argument("--mix", default="colour,shape,exists,count,spatial", help="question types of the training batches, in turn (repeat one to weight it)")
    training.set_defaults(handler=_train_shapes)

    tasks = commands.add_parser("tasks-dir", help="print the folder of shipped task YAMLs (for --include_path)")
    tasks.set_defaults(handler=_tasks_dir)

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
