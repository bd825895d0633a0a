"""`python -m lmms_simignore <command>`: the offline demo, sweeps over configs, fixtures, and task helpers.

A failed lmms-eval run (which lmms-eval itself reports with exit code 0) ends every command with exit
code 1 and the first error line of lmms-eval's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.demo import run_demo

    run_demo(args.workdir, num_questions=args.num_questions, batch_size=args.batch_size, echo=lambda line: print(line, flush=True))
    return 0


def _regression(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.regression import run_regression

    return run_regression(args.expected, args.workdir, update=args.update, echo=lambda line: print(line, flush=True))


def _fingerprints(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.fingerprints import run_fingerprints

    return run_fingerprints(args.expected, update=args.update, echo=lambda line: print(line, flush=True))


def _selfcheck(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.selfcheck import run_selfcheck

    return run_selfcheck(args.workdir, lock_path=args.lock, echo=lambda line: print(line, flush=True))


def _lock(args: argparse.Namespace) -> int:
    from lmms_simignore.lockfile import installed_packages, lock_text

    text = lock_text(installed_packages(), tested_with=args.tested_with)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
        print(f"wrote {args.write}: {len(text.splitlines())} lines")
    else:
        print(text, end="")
    return 0


def _fixtures(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.tiny import PAPER_SHAPED, TinyLlavaShape, build_offline_testbed

    shape = PAPER_SHAPED if args.paper_shaped else TinyLlavaShape()
    paths = build_offline_testbed(args.directory, num_docs=args.num_docs, seed=args.seed, shape=shape)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.suite:
        from lmms_simignore.local_data import write_builtin_local_task
        from lmms_simignore.testbed.suite_data import write_suite_data

        tasks_dir = Path(args.directory) / "suite-tasks"
        for task, parquet in write_suite_data(Path(args.directory) / "suite-data", docs_per_task=args.suite_docs, seed=args.seed).items():
            write_builtin_local_task(tasks_dir, task, parquet)
        print(f"suite: {tasks_dir} (synthetic docs in each suite task's schema; sweep --local-tasks {tasks_dir})")
    if args.mipha:
        _fixtures_mipha(args)
    if args.llava_next:
        from lmms_simignore.testbed.tiny_llava_next import FIXTURE_SHAPE, build_tiny_llava_next

        folder = build_tiny_llava_next(Path(args.directory) / "tiny-llava_next", seed=args.seed, shape=FIXTURE_SHAPE)
        print(f"llava_next: {folder} (--model llava_simignore)")
    if args.onevision:
        from lmms_simignore.testbed.tiny_llava_next import build_tiny_llava_onevision

        folder = build_tiny_llava_onevision(Path(args.directory) / "tiny-llava_onevision", seed=args.seed)
        print(f"llava_onevision: {folder} (--model llava_simignore)")
    if args.internvl:
        from lmms_simignore.testbed.tiny_internvl import build_tiny_internvl

        folder = build_tiny_internvl(Path(args.directory) / "tiny-internvl", seed=args.seed)
        print(f"internvl: {folder} (--model internvl_simignore)")
    if args.qwen:
        from lmms_simignore.testbed.tiny_qwen import FAMILIES, FIXTURE_SHAPE, build_tiny_qwen

        families = FAMILIES if args.qwen == "all" else tuple(args.qwen.split(","))
        unknown = [family for family in families if family not in FAMILIES]
        if unknown:
            raise ValueError(f"--qwen: unknown family {unknown[0]!r}; allowed: all or {', '.join(FAMILIES)} (comma-separated)")
        for family in families:
            folder = build_tiny_qwen(Path(args.directory) / f"tiny-{family}", family, seed=args.seed, shape=FIXTURE_SHAPE)
            print(f"{family}: {folder} (--model {family}_simignore)")
    return 0


def _convert_mipha(args: argparse.Namespace) -> int:
    from lmms_simignore.models.mipha import convert_mipha

    try:
        convert_mipha(args.src, args.out, vision_config_file=args.vision_config)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"convert-mipha: {error}")
    print(f"evaluate with: lmms-eval --model llava_simignore --model_args pretrained={args.out} ...")
    return 0


def _fixtures_mipha(args: argparse.Namespace) -> None:
    from lmms_simignore.testbed.tiny_mipha import build_tiny_mipha

    print(f"mipha: {build_tiny_mipha(Path(args.directory) / 'tiny-mipha', seed=args.seed)} (released layout; convert with "
          f"--vision-config tiny_siglip.json from that folder)")


# make-task --protocol -> (shipped recipe, default task name)
PROTOCOLS = {
    "lmms-eval": ("_scienceqa_img_template.yaml", "scienceqa_img_local"),
    "llava": ("_scienceqa_img_llava_template.yaml", "scienceqa_img_llava_local"),
}


def _make_task(args: argparse.Namespace) -> int:
    from lmms_simignore.local_data import write_local_task

    template, default_name = PROTOCOLS[args.protocol]
    try:
        print(write_local_task(args.out, args.data, task_name=args.name or default_name, template=template))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--data: {error}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lmms_simignore.evaluation import jobs
    from lmms_simignore.evaluation.runs import default_processes
    from lmms_simignore.evaluation.sweep import SweepFailed, load_config, local_task_names, run_sweep, sweep_runs

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        overrides[key] = value
    job_flags = {"time": args.time, "gpus": args.gpus, "partition": args.partition, "account": args.account, "qos": args.qos,
                 "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb}
    try:
        config = load_config(args.config, overrides=overrides, tasks=args.tasks, only_rows=args.rows, model=args.model)
        if args.local_tasks:
            if args.include_path:
                raise ValueError("--local-tasks is the folder of the local copies' YAMLs; do not pass --include_path too")
            config = replace(config, tasks=local_task_names(config.tasks, args.local_tasks))
        if args.launcher == "local" and not args.status:
            given = [f"--{key.replace('_', '-')}" for key, value in job_flags.items() if value is not None] + ["--wait"] * args.wait
            if given:
                raise ValueError(f"{', '.join(given)}: for the job launchers ({', '.join(jobs.JOB_LAUNCHERS)}); "
                                 f"add --launcher slurm or --launcher local-jobs")
        elif args.processes is not None:
            raise ValueError(f"--processes: with --launcher {args.launcher}, a row's processes are its GPUs: give --gpus N")
        settings = config.slurm.over(job_flags)
    except ValueError as error:
        raise SystemExit(str(error))
    tasks_folder = args.local_tasks or args.include_path
    include_path = Path(tasks_folder).resolve() if tasks_folder else None
    extra = ("--limit", str(args.limit)) if args.limit is not None else ()
    output = Path(args.output or Path("outputs") / config.name).resolve()
    if args.status or args.launcher != "local":
        runs = sweep_runs(config, output, include_path, extra, write=not (args.dry_run or args.status))
        return _sweep_jobs(args, config, runs, output, settings)
    processes = args.processes if args.processes is not None else default_processes()
    failure = None
    try:
        run_sweep(config, output, include_path=include_path, extra_args=extra, dry_run=args.dry_run, processes=processes,
                  reuse_stale=args.reuse_stale, keep_going=args.keep_going)
    except SweepFailed as error:
        failure = error
    if not args.dry_run and (failure is None or len(failure.failed) < len(config.rows)):
        _write_sweep_leaderboard(output)
    if failure is not None:
        print(f"error: {failure} (see {output / 'failed.json'})", file=sys.stderr, flush=True)
        return 1
    return 0


def _write_sweep_leaderboard(output: Path) -> None:
    from lmms_simignore.evaluation.leaderboard import write_leaderboard

    write_leaderboard(output, echo=lambda line: None)
    print(f"leaderboard: {output / 'leaderboard.md'} (.csv, .png, pareto.png)")


def _sweep_jobs(args: argparse.Namespace, config, runs, output: Path, settings) -> int:
    """`sweep --status`, and the job launchers: submit the rows that are not done, queued or running; with --wait, follow
    them. Once every row is done, table.md, summary.json and the leaderboard are written."""
    from lmms_simignore.evaluation import jobs
    from lmms_simignore.evaluation.sweep import collect_finished_rows

    say = lambda line: print(line, flush=True)  # noqa: E731
    if not args.status:
        jobs.submit_rows(runs, output, args.launcher, settings, config.name, reuse_stale=args.reuse_stale, dry_run=args.dry_run,
                         echo=say)
        if args.dry_run:
            return 0
    if args.wait and not args.status:
        states = jobs.wait_for_rows(runs, output, reuse_stale=args.reuse_stale, poll_s=args.poll_seconds, echo=say)
    else:
        states = jobs.row_states(runs, output, reuse_stale=args.reuse_stale)
        if args.status:
            print(jobs.states_table(states))
    if all(state.state == "done" for state in states):
        collect_finished_rows(config, runs, output, echo=say, show_table=not args.status)
        _write_sweep_leaderboard(output)
        return 0
    failed = [state for state in states if state.state == "failed"]
    if args.wait and failed:
        print(f"error: {len(failed)} row(s) failed: " + "; ".join(f"{state.name}: {state.detail}" for state in failed)
              + " (submit the sweep again to re-queue them; `--status` shows each row)", file=sys.stderr, flush=True)
        return 1
    if not args.status:
        again = " ".join(["python -m lmms_simignore sweep", args.config, "--output", str(output), "--status"])
        print(f"{sum(state.state != 'done' for state in states)} of {len(states)} rows are not in yet; their states: {again} "
              f"(with the same --tasks/--set/--limit/--rows)")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.leaderboard import write_leaderboard

    try:
        write_leaderboard(args.directory, bench=args.bench)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error))
    return 0


def _task_list(args: argparse.Namespace) -> list[str]:
    """--tasks a,b, or the tasks of --config FILE."""
    if bool(args.tasks) == bool(args.config):
        raise SystemExit("give the tasks: --tasks a,b or --config FILE (a sweep config's tasks), one of the two")
    if args.config:
        from lmms_simignore.evaluation.sweep import load_config

        return load_config(args.config).tasks.split(",")
    return [task.strip() for task in args.tasks.split(",") if task.strip()]


def _local_tasks(args: argparse.Namespace) -> int:
    from lmms_simignore.local_data import write_builtin_local_task

    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data {data}: expected the folder of TASK.parquet files (save-task-data writes it)")
    tasks = _task_list(args) if (args.tasks or args.config) else sorted(path.stem for path in data.glob("*.parquet"))
    if not tasks:
        raise SystemExit(f"--data {data}: no TASK.parquet in it")
    for task in tasks:
        copy = data / f"{task}.parquet"
        if not copy.exists() and (data / task).is_dir():
            copy = data / task  # a save_to_disk folder
        try:
            print(write_builtin_local_task(args.out, task, copy))
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"--data: {error}")
    return 0


def _save_task_data(args: argparse.Namespace) -> int:
    from lmms_simignore.local_data import save_task_data

    for task in _task_list(args):
        print(save_task_data(task, args.out), flush=True)
    return 0


def _shapes_task(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.demo import HELD_OUT_QUESTIONS, TASK
    from lmms_simignore.testbed.shapes import HELD_OUT_SEED, write_shapes_task

    if args.held_out:
        if args.seed is not None or args.name is not None:
            raise SystemExit(f"--held-out writes the main job's split (seed {HELD_OUT_SEED}, task {TASK}); do not pass --seed or --name too")
        seed, name, num_questions = HELD_OUT_SEED, TASK, HELD_OUT_QUESTIONS
    else:
        seed, name, num_questions = (1 if args.seed is None else args.seed), (args.name or "shapes_local"), 500
    if args.num_questions is not None:
        num_questions = args.num_questions
    for path in write_shapes_task(args.out, num_questions=num_questions, seed=seed, task_name=name, multiple_choice=args.multiple_choice):
        print(path)
    return 0


def _pretrain_tower(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.tower_pretraining import pretrain_tower

    summary = pretrain_tower(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             eval_every=args.eval_every, region_weight=args.region_weight, device=_device(args),
                             log=lambda line: print(line, flush=True))
    print(f"held-out image->caption top-1: {summary['held_out_top1']:.3f} (chance {summary['chance']:.4f}); wrote {args.out}")
    return 0


def _probe_tower(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.tower_pretraining import probe_tower

    print(json.dumps(probe_tower(args.tower, layer=args.layer), indent=2))
    return 0


def _cls_attention(args: argparse.Namespace) -> int:
    import torch
    from lmms_simignore.models.mipha import load_llava
    from lmms_simignore.testbed.llava_recipe import cls_attention_on_objects, held_out_questions

    model, processor = load_llava(args.pretrained)
    with torch.inference_mode():
        report = cls_attention_on_objects(model, processor, held_out_questions(args.num_questions))
    print(json.dumps(report, indent=2))
    return 0


def _training_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """The options every testbed recipe stage takes, with that stage's defaults."""
    parser.add_argument("--steps", type=int, default=steps, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate of the warm-up and cosine schedule (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=seed, help="(default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between held-out measurements (default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _pretrain_lm(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.llava_recipe import pretrain_language_model

    summary = pretrain_language_model(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                      eval_every=args.eval_every, device=_device(args), log=lambda line: print(line, flush=True))
    print(f"held-out loss on scene text: {summary['held_out_loss']:.3f}; wrote {args.out}")
    return 0


def _align_projector(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.llava_recipe import align_projector

    summary = align_projector(args.out, args.tower, args.lm, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, eval_every=args.eval_every, device=_device(args),
                              log=lambda line: print(line, flush=True))
    print(json.dumps(summary["alignment"], indent=2))
    return 0


def _tune_instructions(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.llava_recipe import tune_instructions

    summary = tune_instructions(args.out, args.init_from, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, eval_every=args.eval_every, mix=tuple(args.mix.split(",")),
                                curriculum=args.curriculum, train_tower=args.train_tower, device=_device(args), log=lambda line: print(line, flush=True))
    print(json.dumps({"held_out": summary["held_out"], "alignment": summary["alignment"]}, indent=2))
    return 0


def _redundancy(args: argparse.Namespace) -> int:
    from lmms_simignore.testbed.redundancy import run_redundancy

    run_redundancy(args.out, pretrained=args.pretrained, num_questions=args.num_questions, seed=args.seed,
                   echo=lambda line: print(line, flush=True))
    return 0


def _infoflow(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.infoflow import run_infoflow

    try:
        run_infoflow(args.out, pretrained=args.pretrained, num_questions=args.num_questions, seed=args.seed, data=args.data,
                     reduction=args.reduction, echo=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"infoflow: {error}")
    return 0


def _clusters(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.clusters import run_clusters

    try:
        run_clusters(args.out, k=args.k, pretrained=args.pretrained, num_questions=args.num_questions, seed=args.seed,
                     kmeans_seed=args.kmeans_seed, data=args.data, echo=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"clusters: {error}")
    return 0


def _probes(args: argparse.Namespace) -> int:
    from lmms_simignore.evaluation.probes import run_probes

    try:
        run_probes(args.out, pretrained=args.pretrained, num_questions=args.num_questions, seed=args.seed, reduction=args.reduction,
                   data=args.data, labels=args.labels, echo=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"probes: {error}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from lmms_simignore.bench.speed import run_bench

    def echo(line: str) -> None:
        print(line, flush=True)

    if args.preset:
        return _bench_preset(args, echo)
    if args.plan:
        raise SystemExit("--plan: plans a --preset run; give --preset gpu-numbers")
    try:
        batch_sizes = tuple(int(size) for size in args.pass_batch_sizes.split(","))
    except ValueError:
        raise SystemExit(f"--pass-batch-sizes: comma-separated positive integers, got {args.pass_batch_sizes!r}")
    run_bench(args.out, models=tuple(args.models.split(",")) if args.models else None, quick=args.quick, device=args.device,
              batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats, decode_tokens=args.decode_tokens,
              pass_model=args.pass_model, pass_prompts=args.pass_prompts, pass_batch_sizes=batch_sizes, pass_data=args.pass_data,
              pass_methods=tuple(args.pass_rows.split(",")), echo=echo)
    return 0


def _bench_preset(args: argparse.Namespace, echo) -> int:
    """`bench --preset NAME`: its plan from --plan-from (printed and done with --plan), or its run with the planned pass
    prompts on a CUDA GPU."""
    import torch

    from lmms_simignore.bench.plan import BUDGET_MINUTES, DEFAULT_REFERENCE, plan_run, plan_text
    from lmms_simignore.bench.speed import run_bench

    try:
        plan = plan_run(args.preset, args.plan_from or DEFAULT_REFERENCE,
                        BUDGET_MINUTES if args.budget_minutes is None else args.budget_minutes)
    except ValueError as error:
        raise SystemExit(f"bench: {error}")
    if args.plan:
        echo(plan_text(plan, args.out))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset}: runs 7B shapes on a CUDA GPU, and there is none here (--plan needs none)")
    preset = plan.preset
    echo(f"--preset {args.preset}: {' '.join(preset.bench_options())} --pass-prompts {plan.pass_prompts} "
         f"(planned {plan.total_s:.0f} s with the tests)")
    run_bench(args.out, models=preset.models, device="cuda", batch_size=preset.batch_size, warmup=preset.warmup,
              repeats=preset.repeats, decode_tokens=preset.decode_tokens, pass_model=preset.pass_model,
              pass_prompts=plan.pass_prompts, pass_batch_sizes=preset.pass_batch_sizes, pass_methods=preset.pass_methods,
              wrapper=False, echo=echo)
    return 0


def _docs(args: argparse.Namespace) -> int:
    from lmms_simignore.models.reference import update_readme

    return update_readme(args.readme, check=args.check)


def _tasks_dir(args: argparse.Namespace) -> int:
    from lmms_simignore.shipped import tasks_dir

    print(tasks_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_simignore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="offline main job: the shipped shapes model through lmms-eval for every reduction; per-type tables"
    )
    demo.add_argument("--workdir", default="outputs/demo", help="where the split and lmms-eval outputs go; finished rows are reused (default: %(default)s)")
    demo.add_argument("--num-questions", type=int, default=1000, help="first N of the model card's 1000 held-out questions (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=32, help="lmms-eval --batch_size (default: %(default)s)")
    demo.set_defaults(handler=_demo)

    regression = commands.add_parser(
        "regression", help="run the demo rows on the regression split and compare every prediction with the expected file"
    )
    regression.add_argument("--expected", default="tests/expected/shapes_regression.json", help="expected-results file (default: %(default)s)")
    regression.add_argument("--workdir", help="lmms-eval outputs (default: a fresh temporary folder)")
    regression.add_argument("--update", action="store_true", help="write the measured results into --expected (an intentional change)")
    regression.set_defaults(handler=_regression)

    fingerprints = commands.add_parser(
        "fingerprints", help="every method on tiny random Qwen2-VL / 2.5-VL / 3-VL, LLaVA-NeXT and OneVision: compare answers and token counts "
        "with the expected file")
    fingerprints.add_argument("--expected", default="tests/expected/fingerprints.json",
                              help="expected-fingerprints file (default: %(default)s)")
    fingerprints.add_argument("--update", action="store_true", help="write the measured fingerprints into --expected")
    fingerprints.set_defaults(handler=_fingerprints)

    selfcheck = commands.add_parser(
        "selfcheck", help="seconds-long real lmms-eval evaluation of the shipped model; names the failing package if it breaks"
    )
    selfcheck.add_argument("--workdir", default="outputs/selfcheck", help="where its task and lmms-eval outputs go, emptied first (default: %(default)s)")
    selfcheck.add_argument("--lock", help="the tested lock, to compare a failing package's version with (setup passes it)")
    selfcheck.set_defaults(handler=_selfcheck)

    lock = commands.add_parser("lock", help="print (or --write) this environment's packages as a lock file (scripts/refresh-lock.sh)")
    lock.add_argument("--write", help="write the lock here instead of printing it")
    lock.add_argument("--tested-with", default="not tested", help="what passed with these versions, for the header")
    lock.set_defaults(handler=_lock)

    fixtures = commands.add_parser("fixtures", help="write the tiny random LLaVA, local parquet data and task YAML")
    fixtures.add_argument("directory")
    fixtures.add_argument("--num-docs", type=int, default=12)
    fixtures.add_argument("--seed", type=int, default=0)
    fixtures.add_argument(
        "--paper-shaped", action="store_true", help="576 image tokens and 6 decoder layers, so the paper's budgets run as is"
    )
    fixtures.add_argument("--suite", action="store_true", help="also synthetic local copies of the suite's tasks (configs/suite.yaml) "
                          "in each task's schema: suite-data/TASK.parquet and suite-tasks/TASK_local.yaml")
    fixtures.add_argument("--suite-docs", type=int, default=4, help="docs per suite task, even (default: %(default)s)")
    fixtures.add_argument("--mipha", action="store_true", help="also a tiny random Mipha checkpoint in the released layout (tiny-mipha/)")
    fixtures.add_argument("--llava-next", action="store_true", help="also a tiny random LLaVA-NeXT checkpoint with 8 decoder "
                          "layers (tiny-llava_next/)")
    fixtures.add_argument("--onevision", action="store_true", help="also a tiny random LLaVA-OneVision checkpoint "
                          "(tiny-llava_onevision/; needs torchvision)")
    fixtures.add_argument("--internvl", action="store_true", help="also a tiny random InternVL checkpoint (tiny-internvl/; "
                          "needs torchvision)")
    fixtures.add_argument("--qwen", help="also tiny random Qwen-VL checkpoints with 8 decoder layers (tiny-FAMILY/): all, or "
                          "some of qwen2_vl, qwen2_5_vl, qwen3_vl, comma-separated")
    fixtures.set_defaults(handler=_fixtures)

    mipha = commands.add_parser("convert-mipha", help="convert a Mipha checkpoint (Phi-2 + SigLIP) into transformers' Llava classes")
    mipha.add_argument("src", help="a folder in Mipha's released layout (config.json model_type mipha_phi, safetensors shards)")
    mipha.add_argument("out", help="the converted folder, for --model_args pretrained=OUT")
    mipha.add_argument("--vision-config", help="a SiglipVisionConfig JSON, for a tower config.json only names "
                       "(built in: google/siglip-so400m-patch14-384)")
    mipha.set_defaults(handler=_convert_mipha)

    sweep = commands.add_parser("sweep", help="run every row of a config through lmms-eval and print one table")
    sweep.add_argument("config", help="sweep YAML (see configs/)")
    sweep.add_argument("--output", help="folder for the rows' outputs, table.md and summary.json (default: outputs/<config name>)")
    sweep.add_argument("--tasks", help="replace the config's tasks (e.g. a local copy)")
    sweep.add_argument("--model", help="replace the config's lmms-eval model class (e.g. qwen2_5_vl_simignore for a Qwen2.5-VL pretrained=)")
    sweep.add_argument("--local-tasks", metavar="DIR", help="run each task T of the config (or --tasks) as its local copy T_local from DIR "
                       "(the YAMLs `local-tasks` writes: lmms-eval's own task reading a local test split)")
    sweep.add_argument("--include_path", "--include-path", dest="include_path", help="lmms-eval --include_path for task YAMLs outside lmms-eval")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model_arg for every row, over the config's (repeatable)")
    sweep.add_argument("--limit", type=int, help="lmms-eval --limit: only the first N docs per task")
    sweep.add_argument("--rows", metavar="NAME,NAME", help="run only these rows of the config (default: all)")
    sweep.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands (with --launcher slurm: each job's sbatch "
                       "script), run nothing")
    sweep.add_argument("--processes", type=int, help="processes per row (accelerate launch when > 1; default: one per visible GPU, else 1)")
    sweep.add_argument("--keep-going", action="store_true",
                       help="run the other rows when one fails (e.g. a method the model's family refuses); exit 1 at the end, "
                       "the failed rows and their first error line in failed.json")
    sweep.add_argument("--reuse-stale", action="store_true",
                       help="read back finished rows produced by another commit / package version as they are (default: run them again)")
    cluster = sweep.add_argument_group("jobs", "each row one job through submitit: on a Slurm cluster (--launcher slurm) or as a "
                                       "background process here (--launcher local-jobs); submitting again skips done rows, leaves "
                                       "queued and running ones alone and re-queues failed or missing ones. The config's `slurm:` "
                                       "block sets these too (and constraint, setup: shell lines, sbatch: other sbatch options)")
    cluster.add_argument("--launcher", choices=("local", "local-jobs", "slurm"), default="local",
                         help="local: the rows one after the other in this process (default); local-jobs / slurm: one job per row")
    cluster.add_argument("--status", action="store_true", help="print each row's state (done, queued, running, failed with its first "
                         "error line, not submitted) and submit nothing; writes the leaderboard once every row is done")
    cluster.add_argument("--wait", action="store_true", help="after submitting, follow the jobs until none is queued or running; "
                         "exit 1 if a row failed")
    cluster.add_argument("--poll-seconds", type=float, default=30.0, help="with --wait: seconds between looks (default: %(default)s)")
    cluster.add_argument("--gpus", type=int, help="GPUs per row, and as many processes (accelerate launch inside the job when > 1; "
                         "default: 1 on Slurm, this machine's visible GPUs for local jobs)")
    cluster.add_argument("--time", help="wall-clock limit per row: minutes, or h:mm:ss, or d-hh:mm:ss (default: 240 minutes)")
    cluster.add_argument("--partition", help="Slurm partition")
    cluster.add_argument("--account", help="Slurm account")
    cluster.add_argument("--qos", help="Slurm quality of service")
    cluster.add_argument("--cpus-per-task", type=int, help="CPUs per row's job")
    cluster.add_argument("--mem-gb", type=float, help="memory per row's job, in GB")
    sweep.set_defaults(handler=_sweep)

    leaderboard = commands.add_parser("leaderboard", help="finished sweep rows in DIR -> leaderboard.md, .csv, .png and pareto.png with provenance")
    leaderboard.add_argument("directory", help="a sweep's output folder")
    leaderboard.add_argument("--bench", metavar="FILE", help="a bench.json (`bench`): pareto.png gains accuracy against the "
                             "measured LLM prefill of the rows it ran with the same settings on the same decoder")
    leaderboard.set_defaults(handler=_leaderboard)

    make_task = commands.add_parser("make-task", help="write a ScienceQA-IMG task YAML that reads a local copy of the data")
    make_task.add_argument(
        "--data", "--parquet", dest="data", required=True,
        help="ScienceQA-IMG test split: a parquet file, or a save_to_disk folder of a DatasetDict with a `test` split",
    )
    make_task.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default="lmms-eval",
        help="lmms-eval: the built-in scienceqa_img prompt and scoring; llava: LLaVA-1.5's official protocol (default: %(default)s)",
    )
    make_task.add_argument("--name", help="task name (default: scienceqa_img_local, or scienceqa_img_llava_local with --protocol llava)")
    make_task.add_argument("--out", required=True, help="folder for the YAML; pass it to lmms-eval --include_path")
    make_task.set_defaults(handler=_make_task)

    local = commands.add_parser("local-tasks", help="write TASK_local.yaml per built-in lmms-eval task: its own definition reading a "
                                "local copy of its test split (for machines without internet)")
    local.add_argument("--data", required=True, help="folder of TASK.parquet files (or TASK/ save_to_disk folders), as save-task-data writes")
    local.add_argument("--out", required=True, help="folder for the YAMLs: pass it to sweep --local-tasks or lmms-eval --include_path")
    local.add_argument("--tasks", help="comma-separated built-in task names (default: every TASK.parquet in --data)")
    local.add_argument("--config", help="the tasks of this sweep config instead")
    local.set_defaults(handler=_local_tasks)

    save = commands.add_parser("save-task-data", help="download built-in lmms-eval tasks' test splits as TASK.parquet (needs internet)")
    save.add_argument("--out", required=True, help="folder for the parquet files")
    save.add_argument("--tasks", help="comma-separated built-in task names")
    save.add_argument("--config", help="the tasks of this sweep config instead")
    save.set_defaults(handler=_save_task_data)

    shapes_task = commands.add_parser("shapes-task", help="generate a shapes benchmark split and its lmms-eval task YAML")
    shapes_task.add_argument("--out", required=True, help="folder for the data and the YAML; pass it to lmms-eval --include_path")
    shapes_task.add_argument("--num-questions", type=int, help="questions (default: 500; 1000 with --held-out)")
    shapes_task.add_argument("--seed", type=int, help="generator seed (default: 1; the shipped model's held-out questions are seed 10000)")
    shapes_task.add_argument("--name", help="task name for --tasks (default: shapes_local)")
    shapes_task.add_argument("--held-out", action="store_true",
                             help="the model card's held-out split as task shapes_heldout (seed 10000, 1000 questions), as the main job runs it")
    shapes_task.add_argument("--multiple-choice", action="store_true",
                             help="also write NAME_mc: the same questions as a multiple-choice (log-likelihood) task, metric acc")
    shapes_task.set_defaults(handler=_shapes_task)

    pretrain = commands.add_parser(
        "pretrain-tower", help="CLIP-like contrastive pre-training of a tiny vision tower on scene captions (testbed recipe, stage 0)"
    )
    pretrain.add_argument("--out", required=True, help="folder for vision/, text/, projections and training.json")
    _training_arguments(pretrain, steps=1500, batch_size=128, lr=0.001, seed=0)
    pretrain.add_argument("--region-weight", type=float, default=5.0,
                          help="weight of the region-phrase term (each object's patch tokens against its phrase); 0: CLIP's scene loss alone")
    pretrain.set_defaults(handler=_pretrain_tower)

    probe = commands.add_parser("probe-tower", help="linear probes of colour, shape, size and column from each object's patch tokens (a pretrain-tower folder)")
    probe.add_argument("--tower", required=True, help="a pretrain-tower folder")
    probe.add_argument("--layer", type=int, default=-2, help="tower hidden state to read (default: -2, the one LLaVA's projector reads)")
    probe.set_defaults(handler=_probe_tower)

    cls = commands.add_parser("cls-attention", help="per vision layer, how often the patches the CLS token attends to most "
                              "hold an object (what VisionZip keeps), on held-out shapes images")
    cls.add_argument("--pretrained", default="shipped:shapes-llava", help="a llava checkpoint (default: %(default)s)")
    cls.add_argument("--num-questions", type=int, default=300, help="held-out questions, one image each (default: %(default)s)")
    cls.set_defaults(handler=_cls_attention)

    language = commands.add_parser("pretrain-lm", help="pre-train the testbed's language model on scene text (testbed recipe)")
    language.add_argument("--out", required=True, help="folder for the language model, tokenizer and training.json")
    _training_arguments(language, steps=1000, batch_size=64, lr=0.001, seed=0)
    language.set_defaults(handler=_pretrain_lm)

    align = commands.add_parser(
        "align-projector", help="LLaVA stage 1: train the projector on captioning, tower and language model frozen (testbed recipe)"
    )
    align.add_argument("--tower", required=True, help="a pretrain-tower folder")
    align.add_argument("--lm", required=True, help="a pretrain-lm folder")
    align.add_argument("--out", required=True, help="folder for the stage-1 model and training.json")
    _training_arguments(align, steps=1000, batch_size=64, lr=0.002, seed=0)
    align.set_defaults(handler=_align_projector)

    tune = commands.add_parser(
        "tune-instructions", help="LLaVA stage 2: train projector and language model on the shapes questions (testbed recipe)"
    )
    tune.add_argument("--init-from", required=True, help="an align-projector folder")
    tune.add_argument("--out", required=True, help="folder for the model and training.json")
    _training_arguments(tune, steps=3000, batch_size=64, lr=0.001, seed=1)
    tune.add_argument("--mix", default="colour,shape,exists,count,spatial", help="question types of the training batches, in turn (repeat one to weight it)")
    tune.add_argument("--curriculum", type=float, default=0.3, help="fraction of the steps over which the object count grows from 1 to 6; 0 = none (default: %(default)s)")
    tune.add_argument("--train-tower", action="store_true", help="train the vision tower too (LLaVA-1.5 keeps it frozen)")
    tune.set_defaults(handler=_tune_instructions)

    redundancy = commands.add_parser(
        "redundancy", help="stable rank, participation ratio and Gini of norms of image tokens per LLM layer, against object count"
    )
    redundancy.add_argument("--out", default="outputs/redundancy", help="folder for redundancy.json and redundancy.png (default: %(default)s)")
    redundancy.add_argument("--pretrained", default="shipped:shapes-llava", help="a llava checkpoint for the shapes images (default: %(default)s)")
    redundancy.add_argument("--num-questions", type=int, default=600, help="generated shapes questions, one image each (default: %(default)s)")
    redundancy.add_argument("--seed", type=int, help="generator seed (default: the held-out seed, 10000)")
    redundancy.set_defaults(handler=_redundancy)

    infoflow = commands.add_parser("infoflow", help="per decoder layer, the last prompt token's attention to each image token "
                                   "and its share on image vs text, without and with a reduction (PNG + JSON)")
    infoflow.add_argument("--out", default="outputs/infoflow", help="folder for infoflow.json and the PNGs (default: %(default)s)")
    infoflow.add_argument("--pretrained", default="shipped:shapes-llava", help="a llava checkpoint (default: %(default)s)")
    infoflow.add_argument("--data", help="a local ScienceQA-IMG test split (parquet or save_to_disk folder) instead of shapes questions")
    infoflow.add_argument("--num-questions", type=int, default=64, help="samples, one image each (default: %(default)s)")
    infoflow.add_argument("--seed", type=int, help="shapes generator seed (default: the held-out seed, 10000)")
    infoflow.add_argument("--reduction", metavar="KEY=VALUE,...", help="also measure with this reduction, e.g. reduction=simignore,keep=16")
    infoflow.set_defaults(handler=_infoflow)

    clusters = commands.add_parser("clusters", help="k-means over image tokens: each cluster's size, similarity to the text and the "
                                   "accuracy when it is ignored (Simignore's Table 5)")
    clusters.add_argument("--out", default="outputs/clusters", help="folder for clusters.json and clusters.png (default: %(default)s)")
    clusters.add_argument("--k", type=int, default=8, help="clusters (default: %(default)s)")
    clusters.add_argument("--pretrained", default="shipped:shapes-llava", help="a llava checkpoint (default: %(default)s)")
    clusters.add_argument("--num-questions", type=int, default=200, help="generated shapes questions, one image each (default: %(default)s)")
    clusters.add_argument("--seed", type=int, help="shapes generator seed (default: the held-out seed, 10000)")
    clusters.add_argument("--data", help="a local ScienceQA-IMG test split (parquet or save_to_disk folder) instead of shapes questions")
    clusters.add_argument("--kmeans-seed", type=int, default=0, help="k-means++ seeding (default: %(default)s)")
    clusters.set_defaults(handler=_clusters)

    probes = commands.add_parser("probes", help="linear probes of object count, colour, shape, size and position from the "
                                 "hidden states per decoder layer (image tokens, text after the image, last token), without "
                                 "and with a reduction (PNG + JSON)")
    probes.add_argument("--out", default="outputs/probes", help="folder for probes.json and probes.png (default: %(default)s)")
    probes.add_argument("--pretrained", default="shipped:shapes-llava", help="a llava checkpoint (default: %(default)s)")
    probes.add_argument("--num-questions", type=int, default=300, help="generated shapes prompts per set (1-6 objects for the "
                        "count; one object for the rest), 60%% to fit, 40%% held out (default: %(default)s)")
    probes.add_argument("--seed", type=int, help="shapes generator seed (default: the held-out seed, 10000)")
    probes.add_argument("--reduction", metavar="KEY=VALUE,...", help="also probe with this reduction, e.g. reduction=simignore,keep=16")
    probes.add_argument("--data", help="a local split (parquet or save_to_disk folder) in ScienceQA-IMG's columns with label columns, "
                        "instead of generated scenes; with --labels")
    probes.add_argument("--labels", metavar="COLUMN,...", help="the label columns of --data to probe (each column's distinct values are its classes)")
    probes.set_defaults(handler=_probes)

    bench = commands.add_parser("bench", help="latency, throughput and memory of every reduction against the FLOP ideal "
                                "(LLaVA-1.5, Mipha, Qwen2.5-VL, LLaVA-1.6 and LLaVA-OneVision shapes)")
    bench.add_argument("--out", default="benchmarks/results/latest", help="folder for bench.json and bench.md (default: %(default)s)")
    bench.add_argument("--models", help="comma-separated: testbed, paper-shaped, llava7b-shape, llava13b-shape, mipha3b-shape, "
                       "qwen-tiny (a tiny Qwen2.5-VL, for CPUs), qwen2_5_vl7b-shape (Qwen2.5-VL-7B-Instruct's shape, 1280 x 960 "
                       "photos: 1564 image tokens), llava_next-tiny, llava_onevision-tiny (tiny tiled LLaVAs, for CPUs), "
                       "llava_next7b-shape (LLaVA-1.6-vicuna-7B's shape, 672 x 672 images: 2 x 2 tiles, 2880 image tokens), "
                       "llava_onevision7b-shape (LLaVA-OneVision-qwen2-7B's shape, 1152 x 1152 images: 3 x 3 tiles, 7290 image "
                       "tokens) (default: testbed,paper-shaped on a CPU; testbed,llava7b-shape on a GPU: add the others by "
                       "naming them)")
    bench.add_argument("--quick", action="store_true", help="smoke run: the --models named (default: testbed only), batch 2, 1 warm-up, "
                       "2 repeats, 2 decode tokens; a pass of at most 8 prompts on paper-shaped at batch 1 and 4")
    bench.add_argument("--pass-model", help="LLaVA-family model of the ScienceQA-IMG-sized pass: testbed, paper-shaped, llava7b-shape, "
                       "llava13b-shape or mipha3b-shape (default: paper-shaped on a CPU, llava7b-shape on a GPU)")
    bench.add_argument("--pass-prompts", type=int, help="prompts in that pass; 0 skips it (default: 2017, the ScienceQA-IMG test split)")
    bench.add_argument("--pass-batch-sizes", default="1,8", help="batch sizes of that pass (default: %(default)s)")
    bench.add_argument("--pass-rows", default="none,simignore,fastv", metavar="METHOD,...",
                       help="rows of that pass, none among them: none, simignore (drop, 50%%), fastv (50%%), pdrop (its "
                       "defaults), dart (50%%), visionzip (50%%) (default: %(default)s)")
    bench.add_argument("--pass-data", help="a local ScienceQA-IMG test split (parquet file or save_to_disk folder) for the pass; "
                       "default: synthetic prompts of assumed realistic lengths")
    bench.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=7)
    bench.add_argument("--decode-tokens", type=int, default=16)
    bench.add_argument("--preset", choices=["gpu-numbers"],
                       help="a run planned to fit a GPU's 10 minutes (`lmms_simignore/bench/plan.py`; scripts/gpu-numbers.sh "
                       "runs it after tests/test_gpu.py): gpu-numbers benches the LLaVA-1.5-7B, Qwen2.5-VL-7B and "
                       "LLaVA-1.6-7B shapes (batch 4, 1 warm-up, 3 repeats, 8 decode tokens) and the pass on llava7b-shape "
                       "at batch 8 and 32 for all six --pass-rows, its prompts chosen to fit --budget-minutes; it replaces "
                       "--models, --quick, --device (cuda), --batch-size, --warmup, --repeats, --decode-tokens and the --pass-* options, and "
                       "skips the wrapper overhead")
    bench.add_argument("--plan", action="store_true", help="with --preset: print its plan (every step and row, estimated "
                       "seconds and their sources, the total, the commands) and exit; needs no GPU and builds no model")
    bench.add_argument("--plan-from", metavar="BENCH_JSON", help="with --preset: the past run the plan's estimates come from (a bench.json "
                       "with a test_gpu.log beside it; default: the committed H100 run of 2026-11-26)")
    bench.add_argument("--budget-minutes", type=float, help="with --preset: the whole run's budget, the tests included, "
                       "that the pass's prompts are chosen to fit (default: 9, of the 10-minute limit)")
    bench.set_defaults(handler=_bench)

    docs = commands.add_parser("docs", help="rewrite the README's methods and model_args tables from the registry (--check: "
                                             "only compare, exit 1 on a difference)")
    docs.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"), help="the README to update")
    docs.add_argument("--check", action="store_true", help="compare only; exit 1 when the README's tables differ")
    docs.set_defaults(handler=_docs)
    tasks = commands.add_parser("tasks-dir", help="print the folder of shipped task YAMLs (for --include_path)")
    tasks.set_defaults(handler=_tasks_dir)

    args = parser.parse_args(argv)
    from lmms_simignore.evaluation.runs import LmmsEvalFailed

    try:
        return args.handler(args)
    except LmmsEvalFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
