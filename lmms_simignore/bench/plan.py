"""A GPU run planned from a past one: `bench --preset NAME --plan` lists every step and row with its estimated seconds.

A lent GPU machine gives a run 10 minutes. `gpu-numbers` (`scripts/gpu-numbers.sh`) runs `tests/test_gpu.py`, then the
bench on the LLaVA-1.5-7B, Qwen2.5-VL-7B and LLaVA-1.6-7B shapes (every row each family plans) and the
ScienceQA-IMG-sized pass at batch 8 and 32 for none, Simignore, FastV, PyramidDrop, DART and VisionZip. The estimates
come from a past run's `bench.json` and `test_gpu.log` (default: the H100 run of 2026-11-26), each with its source:

- measured: a row of that run, at the same model and batch: (warm-up + repeats) x (time to first token + decode
  tokens x batch / decode tokens per s), medians;
- scaled by FLOPs: a row that run did not time, from the same model's `none`: its prefill by the ratio of the decoder
  FLOPs (`lmms_simignore.bench.flops`) of the tokens each layer computes on (the row's nominal `Plan`), plus the
  largest choice time measured on that model and `none`'s decode rate;
- extrapolated: a model that run did not time, from the LLaVA-1.5-7B shape's `none`: prefill by the decoder FLOPs of
  the prompts the bench feeds it (counted by its processor, no weights built), the tower and embedding by the image
  tokens, decoding by the FLOPs of one decode step over the prompt;
- assumed: what no log timed (building and loading random 7B weights, start-ups), named constants below.

The pass takes the per-prompt seconds of its measured rows at batch 8; a larger batch is assumed no faster per
prompt; a row it did not time is scaled by the prefill FLOPs from its slowest measured reduction. The planner then
chooses the pass's number of prompts to fit the budget, or refuses.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from lmms_simignore.bench.flops import DecoderShape, layer_flops, prefill_flops
from lmms_simignore.bench.scienceqa_pass import PASS_METHODS, SCIENCEQA_IMG_TEST_QUESTIONS, pass_rows

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks/results/gpu-2026-11-26/bench.json"
BUDGET_MINUTES = 9.0  # of the lent machine's 10 minutes a command: the rest is margin
TIME_LIMIT_S = 600
REFERENCE_MODEL = "llava7b-shape"  # what the other shapes are extrapolated from

# Assumed (no log times them). The 2026-11-26 run took about 7 minutes after its tests; its timed parts add up to about
# 336 s (the progress log), leaving at most about 84 s for building llava7b-shape and loading it twice for the pass.
BUILD_SECONDS = 60.0  # a random 7B shape built on the GPU, written (14-17 GB of safetensors) and loaded back
PASS_LOAD_SECONDS = 20.0  # the pass's `LlavaSimignore` loading the 7B shape again (from the page cache), per batch size
START_SECONDS = 10.0  # a python process importing torch, transformers and lmms-eval and starting CUDA
RECORD_SECONDS = 10.0  # environment.txt (nvidia-smi, versions) and the README stub
PASS_MIN_PIECES = 8  # the fewest batches of the largest pass batch size that still give a spread of per-piece ratios


@dataclass(frozen=True)
class Preset:
    """What `bench --preset NAME` runs: models and their settings, and the pass (its prompts: the plan's)."""

    models: tuple[str, ...]
    batch_size: int
    warmup: int
    repeats: int
    decode_tokens: int
    pass_model: str
    pass_methods: tuple[str, ...]
    pass_batch_sizes: tuple[int, ...]

    def bench_options(self) -> list[str]:
        """The `bench` options equal to this preset, given `prompts` by the plan."""
        return ["--models", ",".join(self.models), "--batch-size", str(self.batch_size), "--warmup", str(self.warmup),
                "--repeats", str(self.repeats), "--decode-tokens", str(self.decode_tokens), "--pass-model", self.pass_model,
                "--pass-rows", ",".join(self.pass_methods), "--pass-batch-sizes", ",".join(map(str, self.pass_batch_sizes))]


PRESETS = {
    "gpu-numbers": Preset(models=("llava7b-shape", "qwen2_5_vl7b-shape", "llava_next7b-shape"), batch_size=4, warmup=1,
                          repeats=3, decode_tokens=8, pass_model="llava7b-shape", pass_methods=PASS_METHODS,
                          pass_batch_sizes=(8, 32)),
}


@dataclass(frozen=True)
class Estimate:
    step: str  # "tests", "bench llava7b-shape", "pass batch 8", ...
    item: str  # a row, "build and load", ...
    seconds: float
    source: str  # "measured ...", "scaled by FLOPs ...", "extrapolated ...", "assumed ..."


@dataclass(frozen=True)
class ShapePrompts:
    """The prompts the bench feeds a model: its config, processor and rows; per prompt, its tokens and image tokens."""

    config: object
    processor: object
    rows: list
    prompt_tokens: list[int]
    image_tokens: list[int]


@dataclass(frozen=True)
class RunPlan:
    preset_name: str
    preset: Preset
    reference: Path
    budget_s: float
    pass_prompts: int
    estimates: list[Estimate]

    @property
    def total_s(self) -> float:
        return sum(estimate.seconds for estimate in self.estimates)

    def step_seconds(self, prefix: str) -> float:
        """Seconds of the steps whose name starts with `prefix` ("tests", "bench", "pass")."""
        return sum(estimate.seconds for estimate in self.estimates if estimate.step.startswith(prefix))


def check_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def shape_config_and_processor(name: str):
    """The config and processor of bench model `name` (a 7B shape), built without weights."""
    from lmms_simignore.bench import llava_shapes, qwen_shapes, tiled_shapes

    if name in llava_shapes.LLAVA_15_SHAPES:
        from lmms_simignore.testbed.tiny import build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        config = llava_shapes.shape_config(name, tokenizer)
        return config, build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    if name == qwen_shapes.QWEN25_VL_7B_SHAPE:
        from lmms_simignore.testbed.tiny_qwen import build_qwen_tokenizer

        tokenizer = build_qwen_tokenizer(qwen_shapes.FAMILY)
        return qwen_shapes.qwen25_vl_7b_config(tokenizer), qwen_shapes.qwen25_vl_processor(tokenizer)
    if name in tiled_shapes.SHAPES:
        tokenizer = tiled_shapes.shape_tokenizer(name)
        return tiled_shapes.shape_config(name, tokenizer), tiled_shapes.shape_processor(name, tokenizer)
    allowed = (*llava_shapes.LLAVA_15_SHAPES, qwen_shapes.QWEN25_VL_7B_SHAPE, *tiled_shapes.SHAPES)
    raise ValueError(f"--preset: the plan knows the prompts of {', '.join(allowed)}; not of {name!r}")


def shape_prompts(name: str, batch_size: int) -> ShapePrompts:
    """What the bench feeds `name` at `batch_size`: the shapes records at the family's image size through its processor."""
    from lmms_simignore.bench.speed import bench_family
    from lmms_simignore.testbed import shapes

    config, processor = shape_config_and_processor(name)
    family = bench_family(config)
    records = family.images(shapes.shapes_records(batch_size, seed=shapes.HELD_OUT_SEED), processor)
    inputs = family.encode(processor, records)
    image_tokens = (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist()  # (B,)
    return ShapePrompts(config, processor, family.rows(config, processor), inputs["attention_mask"].sum(dim=1).tolist(), image_tokens)


def computed_fractions(plan) -> list[float]:
    """Per decoder layer, the fraction of an image's tokens that layer computes on under `plan` (a `settings.Plan`)."""
    return [count / plan.image_tokens for count in plan.computed_per_layer()]


def batch_prefill_flops(shape: DecoderShape, prompt_tokens: list[int], image_tokens: list[int], fractions: list[float]) -> float:
    """Decoder FLOPs of a batch's prefill when layer l computes on fractions[l] of each prompt's image tokens."""
    return sum(prefill_flops(shape, [n - m + round(f * m) for f in fractions]) for n, m in zip(prompt_tokens, image_tokens))


def decode_step_flops(shape: DecoderShape, num_layers: int, context: float) -> float:
    """FLOPs of one decode step of one prompt: every layer on one token, attending to `context` cached tokens."""
    return num_layers * (layer_flops(shape, 1) + 2 * 2 * context * shape.heads * shape.head_dim)


def tests_seconds(log: str) -> float:
    """The duration pytest reports at the end of `test_gpu.log` ("6 passed, 1 skipped in 80.99s")."""
    found = re.findall(r" in ([0-9.]+)s", log)
    if not found:
        raise ValueError("test_gpu.log: no pytest duration (' in 80.99s') in it")
    return float(found[-1])


def bench_family_plan(prompts: ShapePrompts, settings):
    """The `Plan` of `settings` on the model of `prompts`, as its bench family plans it (its largest image)."""
    from lmms_simignore.bench.speed import bench_family

    return bench_family(prompts.config).plan(prompts.config, prompts.processor, settings)


def _row_plan_fractions(prompts: ShapePrompts, settings) -> list[float]:
    return computed_fractions(bench_family_plan(prompts, settings))


def bench_estimates(name: str, prompts: ShapePrompts, preset: Preset, reference: dict, base: ShapePrompts) -> list[Estimate]:
    """Seconds of benchmarking `name` (its prompts `prompts`) with `preset`'s settings: building it, then
    warm-up + repeats rounds of every row; from `reference` (a bench.json) as the module docstring says. `base`: the
    prompts of REFERENCE_MODEL, which a model `reference` did not time is extrapolated from. A row's tokens per layer are
    the fractions its nominal plan (the family's largest image) keeps, of the image tokens the bench feeds."""
    measured = reference["models"].get(name, {}).get("rows", {})
    base_name, base = (name, prompts) if measured else (REFERENCE_MODEL, base)
    base_rows = reference["models"][base_name]["rows"]
    none = base_rows["none"]
    rounds = preset.warmup + preset.repeats
    batch = preset.batch_size / reference["settings"]["batch_size"]  # times of a batch scale with its size
    shape = DecoderShape.from_text_config(prompts.config.text_config)
    base_shape = DecoderShape.from_text_config(base.config.text_config)
    base_flops = batch_prefill_flops(base_shape, base.prompt_tokens, base.image_tokens,
                                     [1.0] * base.config.text_config.num_hidden_layers) / len(base.prompt_tokens)  # per prompt
    tower = statistics.fmean(prompts.image_tokens) / statistics.fmean(base.image_tokens)
    layers = prompts.config.text_config.num_hidden_layers
    decode = (decode_step_flops(shape, layers, statistics.fmean(prompts.prompt_tokens))
              / decode_step_flops(base_shape, base.config.text_config.num_hidden_layers, statistics.fmean(base.prompt_tokens)))
    choice = max(row["choice_s"]["median"] for row in base_rows.values())
    estimates = [Estimate(f"bench {name}", "build and load", BUILD_SECONDS, "assumed (BUILD_SECONDS)")]
    for row in prompts.rows:
        if row.name in measured:
            result = measured[row.name]
            seconds = rounds * (result["ttft_s"]["median"] * batch
                                + preset.decode_tokens * preset.batch_size / result["decode_tokens_per_s"]["median"])
            source = f"measured ({name}/{row.name})"
        else:
            prefill = batch_prefill_flops(shape, prompts.prompt_tokens, prompts.image_tokens, _row_plan_fractions(prompts, row.settings))
            ratio = prefill / len(prompts.prompt_tokens) / base_flops  # per prompt: `batch` scales to the batch
            first_token = ((none["ttft_s"]["median"] - none["prefill_s"]["median"]) * tower + none["prefill_s"]["median"] * ratio
                           + (choice if row.name != "none" else 0.0)) * batch
            seconds = rounds * (first_token + preset.decode_tokens * preset.batch_size / none["decode_tokens_per_s"]["median"] * decode)
            if base_name == name:
                source = f"scaled by FLOPs from {name}/none (measured): prefill x{ratio:.2f}"
            else:
                source = (f"extrapolated from {base_name}/none (measured): prefill x{ratio:.2f} by decoder FLOPs, tower x{tower:.1f} "
                          f"by image tokens, decode x{decode:.2f} by decode-step FLOPs")
        estimates.append(Estimate(f"bench {name}", row.name, seconds, source))
    return estimates


def pass_per_prompt(preset: Preset, reference: dict, prompts: ShapePrompts) -> dict[tuple[int, str], tuple[float, str]]:
    """(batch size, row) -> (seconds per prompt, source) of the pass's rows, from `reference`'s pass (its prompt
    lengths; `prompts`: the pass model's config and processor)."""
    timed = reference["scienceqa_pass"]
    config = prompts.config
    rows = pass_rows(round(statistics.fmean(prompts.image_tokens)), config.text_config.num_hidden_layers, preset.pass_methods)
    measured = {(result["batch_size"], result["row"]): result["seconds"] / timed["prompts"] for result in timed["results"]}
    shape = DecoderShape.from_text_config(config.text_config)
    mean_tokens, image_tokens = round(timed["prompt_tokens"]["mean"]), timed["image_tokens"]

    def flops(row: str) -> float:
        from lmms_simignore.settings import ReductionSettings

        return batch_prefill_flops(shape, [mean_tokens], [image_tokens], _row_plan_fractions(prompts, ReductionSettings(**rows[row])))

    per_prompt = {}
    for batch_size in preset.pass_batch_sizes:
        timed_at = batch_size if any(size == batch_size for size, _ in measured) else max(
            (size for size, _ in measured if size <= batch_size), default=min(size for size, _ in measured))
        assumed = "" if timed_at == batch_size else f" at batch {timed_at} (assumed no faster per prompt at batch {batch_size})"
        reductions = {row: seconds for (size, row), seconds in measured.items() if size == timed_at and row != "none" and row in rows}
        if not reductions:
            raise ValueError(f"--plan-from: its pass timed no reduction at batch {timed_at} to scale the other rows from")
        slowest = max(reductions, key=reductions.get)
        for row in rows:
            if (timed_at, row) in measured:
                per_prompt[batch_size, row] = (measured[timed_at, row], f"measured{assumed}")
            else:
                ratio = flops(row) / flops(slowest)
                per_prompt[batch_size, row] = (reductions[slowest] * ratio, f"scaled by prefill FLOPs from {slowest} x{ratio:.2f}{assumed}")
    return per_prompt


def pass_estimates(preset: Preset, per_prompt: dict, prompts_count: int) -> list[Estimate]:
    """The pass's seconds for `prompts_count` prompts: per batch size, loading the model, two batches of warm-up per row,
    then every row over the prompts."""
    estimates = []
    for batch_size in preset.pass_batch_sizes:
        step = f"pass batch {batch_size}"
        rows = [row for size, row in per_prompt if size == batch_size]
        warmup = sum(2 * batch_size * per_prompt[batch_size, row][0] for row in rows)
        estimates += [Estimate(step, "load the model", PASS_LOAD_SECONDS, "assumed (PASS_LOAD_SECONDS)"),
                      Estimate(step, "warm-up: 2 batches per row", warmup, "per-prompt seconds below")]
        estimates += [Estimate(step, row, prompts_count * per_prompt[batch_size, row][0],
                               f"{per_prompt[batch_size, row][0] * 1000:.1f} ms per prompt, {per_prompt[batch_size, row][1]}")
                      for row in rows]
    return estimates


def choose_pass_prompts(available_s: float, per_prompt_s: float, batch_sizes: tuple[int, ...], most: int) -> int:
    """The most prompts (a whole number of batches of every batch size, at most `most`) whose pass takes at most
    `available_s` at `per_prompt_s` per prompt over all rows and batch sizes; refuses below PASS_MIN_PIECES batches of the
    largest batch size."""
    step = math.lcm(*batch_sizes)
    fewest = PASS_MIN_PIECES * max(batch_sizes)
    prompts = min(most, int(max(available_s, 0.0) / per_prompt_s)) // step * step
    if prompts < fewest:
        raise ValueError(f"--budget-minutes: after the tests and the bench models, {max(available_s, 0.0):.0f} s are left for "
                         f"the pass, which needs {fewest * per_prompt_s:.0f} s for its fewest {fewest} prompts; raise the "
                         "budget or plan fewer models")
    return prompts


def plan_run(preset_name: str, reference_path: str | Path = DEFAULT_REFERENCE, budget_minutes: float = BUDGET_MINUTES) -> RunPlan:
    """Every step of `bench --preset NAME` after `tests/test_gpu.py`, with estimated seconds from `reference_path` (a
    bench.json, `test_gpu.log` beside it), and the pass's prompts chosen to fit `budget_minutes`."""
    preset = check_preset(preset_name)
    if budget_minutes <= 0 or budget_minutes * 60 > TIME_LIMIT_S:
        raise ValueError(f"--budget-minutes: between 0 and {TIME_LIMIT_S / 60:g} (the machine's limit); got {budget_minutes}")
    reference_path = Path(reference_path)
    log = reference_path.with_name("test_gpu.log")
    if not reference_path.is_file() or not log.is_file():
        raise ValueError(f"--plan-from {reference_path}: needs that bench.json and a test_gpu.log beside it")
    reference = json.loads(reference_path.read_text())
    if REFERENCE_MODEL not in reference.get("models", {}) or "scienceqa_pass" not in reference:
        raise ValueError(f"--plan-from {reference_path}: has no {REFERENCE_MODEL} rows or no ScienceQA-IMG-sized pass to plan from")
    base = shape_prompts(REFERENCE_MODEL, reference["settings"]["batch_size"])
    estimates = [Estimate("tests", "python -m pytest tests/test_gpu.py", tests_seconds(log.read_text()), f"measured ({log.name})"),
                 Estimate("tests", "start-up", START_SECONDS, "assumed (START_SECONDS)"),
                 Estimate("record", "plan.txt: this plan", START_SECONDS, "assumed (START_SECONDS)"),
                 Estimate("record", "environment.txt and README stub", RECORD_SECONDS, "assumed (RECORD_SECONDS)"),
                 Estimate("bench start-up", "imports, CUDA", START_SECONDS, "assumed (START_SECONDS)")]
    for name in preset.models:
        estimates += bench_estimates(name, shape_prompts(name, preset.batch_size), preset, reference, base)
    if preset.pass_model not in preset.models:  # the bench keeps a model it measured for the pass; else the pass builds it
        estimates.append(Estimate(f"pass {preset.pass_model}", "build", BUILD_SECONDS, "assumed (BUILD_SECONDS)"))
    pass_prompts_of = base if preset.pass_model == REFERENCE_MODEL else shape_prompts(preset.pass_model, 1)
    per_prompt = pass_per_prompt(preset, reference, pass_prompts_of)
    fixed = pass_estimates(preset, per_prompt, 0)
    available = budget_minutes * 60 - sum(estimate.seconds for estimate in estimates + fixed)
    prompts = choose_pass_prompts(available, sum(seconds for seconds, _ in per_prompt.values()), preset.pass_batch_sizes,
                                  SCIENCEQA_IMG_TEST_QUESTIONS)
    return RunPlan(preset_name, preset, reference_path, budget_minutes * 60, prompts, estimates + pass_estimates(preset, per_prompt, prompts))


def tests_timeout(plan: RunPlan) -> int:
    """Seconds `tests/test_gpu.py` may take: its estimate with its share of the time the plan leaves under the limit."""
    return math.ceil(plan.step_seconds("tests") * TIME_LIMIT_S / plan.total_s)


def bench_command(plan: RunPlan, out: str | Path, python: str = "python") -> list[str]:
    return [python, "-m", "lmms_simignore", "bench", "--preset", plan.preset_name, "--out", str(out)]


def plan_text(plan: RunPlan, out: str | Path, python: str = "python") -> str:
    """The dry run's report: every step and row with its seconds and source, the total against the budget, the commands."""
    lines = [f"Plan of `bench --preset {plan.preset_name}` from {plan.reference} (and its test_gpu.log); budget "
             f"{plan.budget_s / 60:g} min of the {TIME_LIMIT_S / 60:g}-minute limit.", ""]
    step = None
    for estimate in plan.estimates:
        if estimate.step != step:
            step = estimate.step
            lines.append(f"{step}: {sum(e.seconds for e in plan.estimates if e.step == step):.1f} s")
        lines.append(f"  {estimate.item:<34} {estimate.seconds:7.1f} s  {estimate.source}")
    preset = plan.preset
    options = " ".join(preset.bench_options() + ["--pass-prompts", str(plan.pass_prompts), "--out", str(out)])
    lines += ["", f"The pass: {plan.pass_prompts} prompts (chosen to fit the budget; the test split has {SCIENCEQA_IMG_TEST_QUESTIONS}).",
              f"Total: {plan.total_s:.0f} s = {plan.total_s / 60:.1f} min (budget {plan.budget_s / 60:g} min, limit "
              f"{TIME_LIMIT_S / 60:g} min). The Qwen2.5-VL-7B and LLaVA-1.6-7B shapes are extrapolated from the "
              "LLaVA-1.5-7B shape (never timed on a GPU).", "",
              "Commands (from the repository root):",
              f"  timeout {tests_timeout(plan)} {python} -m pytest tests/test_gpu.py -v   # > {out}/test_gpu.log",
              f"  timeout <the rest of {TIME_LIMIT_S} s> {' '.join(bench_command(plan, out, python))}   # > {out}/bench-progress.log",
              f"  (the preset's options: {options})",
              f"timeout-seconds tests={tests_timeout(plan)}"]
    return "\n".join(lines)
