"""`python -m lmms_simignore bench`: latency, throughput and memory of every reduction, against the FLOP ideal.

In one process and on the same prompts, for `none` and each reduction: time to first token (processor
outputs -> embeddings (the vision tower included), token choice, prefill, first logits), the token choice alone (the
pre-LLM stage after the embedding, or a vision-side stage's choice, merge and projection after the tower; in-LLM choices
happen inside the prefill), decode tokens/s with the KV cache, end-to-end time per sample, and peak memory (CUDA max
allocated on GPU; peak RSS on Linux CPUs, reset per measurement). Warm-up runs, then repetitions: medians with min-max
spread, speed-ups as ratios against `none` of the same run, next to the ideal speed-up from `lmms_simignore.bench.flops`
for the tokens each layer computes on.

Models: the shipped testbed, `paper-shaped` (LLaVA-1.5's 576 image tokens in 6 narrow layers, for CPUs), `qwen-tiny`
(the tiny random Qwen2.5-VL of `lmms_simignore.testbed.tiny_qwen`, for CPUs), `llava_next-tiny` and `llava_onevision-tiny`
(the tiny tiled LLaVAs of `lmms_simignore.testbed.tiny_llava_next`, for CPUs), and random-weight models with the exact
shapes of LLaVA-1.5-7B and -13B, Mipha-3B (`lmms_simignore.bench.llava_shapes`), Qwen2.5-VL-7B-Instruct
(`lmms_simignore.bench.qwen_shapes`), LLaVA-1.6-vicuna-7B and LLaVA-OneVision-qwen2-7B (`lmms_simignore.bench.tiled_shapes`);
fp16 and sdpa on a GPU. Each family runs its own path of the engine (`BenchFamily`, chosen by the config's model_type):
LLaVA's images of one size, budgets in tokens; Qwen-VL's 1280 x 960 photos (1564 tokens each on the 7B shape) and the
tiled LLaVAs' largest squares whose tiles all reach the LLM (672 x 672 on LLaVA-1.6: 576 + 48 x 48 = 2880 image tokens
and 48 newline separators; 1152 x 1152 on OneVision: 729 + 81 x 81 = 7290 and 81), budgets as fractions of each image's
tokens (`bench.rows`: the rows each family plans; separators are never chosen or counted). Timing does not
depend on weight values. A ScienceQA-IMG-sized pass (`lmms_simignore.bench.scienceqa_pass`) times 2017 prompts through
the lmms-eval LLaVA model class for none, Simignore (drop) and FastV (by default; PyramidDrop, DART and VisionZip on
request) at two batch sizes.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmms_simignore import engine
from lmms_simignore.bench import qwen_shapes, scienceqa_pass, tiled_shapes
from lmms_simignore.bench.flops import DecoderShape, sample_prefill_flops
from lmms_simignore.bench.rows import BenchRow, bench_rows, per_image_bench_rows
from lmms_simignore.markdown import table
from lmms_simignore.methods.base import VISION
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed import tiny_llava_next


class PeakMemory:
    """Peak memory of the block: CUDA max allocated bytes, or peak RSS (Linux: reset through clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            try:
                line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
                self.peak_bytes = int(line.split()[1]) * 1024
            except (OSError, StopIteration):
                self.peak_bytes = None
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class BenchFamily:
    """How the bench runs one model family: its checkpoints, prompts and rows, and its two steps before the LLM.

    load: (folder, device, dtype) -> (model, processor); images: (records, processor) -> the records with their images
    at the size the bench feeds; encode: (processor, records) -> the processed batch; rows: (config, processor) ->
    [BenchRow]; plan: (config, processor, settings) -> the `Plan` for the family's largest image (no model needed);
    embed: (model, settings, inputs) -> what the choice starts from (timed into time to first token only); choose:
    (model, tokenizer, settings, inputs, embedded, comparison texts, image seeds) -> (ReducedPrompt, the in-LLM stages
    for `LanguageModelRun`) (timed as the choice).
    """

    name: str
    load: Callable
    images: Callable
    encode: Callable
    rows: Callable[..., list[BenchRow]]
    embed: Callable
    choose: Callable
    plan: Callable


def _load_llava(folder: Path, device: torch.device, dtype: torch.dtype):
    from lmms_simignore.models.mipha import load_llava

    return load_llava(folder, dtype=dtype, attn_implementation="sdpa", device_map=str(device))


def _resized(records: list[dict], processor) -> list[dict]:
    """The shapes images at the model's input size (the image processor would resize them anyway)."""
    image_processor = processor.image_processor
    size = (image_processor.crop_size if image_processor.do_center_crop else image_processor.size)["height"]
    return [{**record, "image": record["image"].resize((size, size))} for record in records]


def _encode_llava(processor, records: list[dict]):
    from lmms_simignore.testbed.llava_recipe import encode  # the shapes prompt format

    return encode(processor, records, with_answers=False)


def _llava_plan(config, processor, settings: ReductionSettings):
    return engine.plan_for(config, settings)


def _llava_rows(config, processor) -> list[BenchRow]:
    """LLaVA's rows: budgets in tokens of the config's one image size (the processor adds nothing to it)."""
    return bench_rows(engine.image_tokens_per_image(config), config.text_config.num_hidden_layers,
                      cls_token=config.vision_config.model_type == "clip_vision_model", grid=engine.image_grid(config))


def _embed_llava(model, settings: ReductionSettings, inputs) -> tuple:
    """(plan, the tower's hidden states) where a vision-side stage chooses after the tower (its choice, merge and
    projection are then the choice), else (plan, the embedded prompt)."""
    plan = engine.plan_for(model.config, settings)
    if plan.vision is not None:
        return plan, engine.vision_tower_states(model, inputs["pixel_values"])
    return plan, engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))


def _choose_llava(model, tokenizer, settings: ReductionSettings, inputs, embedded: tuple, texts: list[str],
                  image_seeds: list[int]):
    plan, states = embedded
    prompt = engine.embed_prompt(model, plan, inputs, states) if plan.vision is not None else states
    return engine.apply_pre_llm_stage(model, tokenizer, plan, prompt, texts, image_seeds), plan.layers


def _load_auto(folder: Path, device: torch.device, dtype: torch.dtype):
    """`AutoModelForImageTextToText` (sdpa) and its processor, the tokenizer padding on the left."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", device_map=str(device),
                                                        use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _encode_chat(processor, records: list[dict]):
    """Left-padded batch through the processor's chat template: one image and the shapes question per user turn (Qwen-VL's
    template adds its default system turn)."""
    from lmms_simignore.testbed.llava_recipe import prompt_text

    turns = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(record)}]}] for record in records]
    prompts = [processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) for turn in turns]
    return processor(text=prompts, images=[r["image"] for r in records], padding=True, padding_side="left", return_tensors="pt")


def _choose_each_image(model, tokenizer, settings: ReductionSettings, inputs, prompt, texts: list[str], image_seeds: list[int]):
    """Each image planned for its own tokens and reduced in the tower or before the LLM, as the model classes of
    families whose images have their own sizes do (`engine.reduce_each_image`)."""
    return engine.reduce_each_image(model, tokenizer, settings, prompt, texts, image_seeds)


QWEN_IMAGE_SIZE = (1280, 960)  # (width, height) of the field's benchmark photos


def _photo_sized(records: list[dict], processor) -> list[dict]:
    """The shapes images at 1280 x 960; the processor then resizes each within its pixel limits, to multiples of
    patch x merge (28 on Qwen2.5-VL)."""
    return [{**record, "image": record["image"].resize(QWEN_IMAGE_SIZE)} for record in records]


def _qwen_plan(config, processor, settings: ReductionSettings):
    """Qwen-VL's plan for the largest image its processor makes (at its max pixels)."""
    from lmms_simignore.families import qwen_vl

    return qwen_vl.nominal_plan(config, settings, processor.image_processor.size["longest_edge"])


def _qwen_rows(config, processor) -> list[BenchRow]:
    """The per-image rows that Qwen-VL plans for the largest image its processor makes (at its max pixels)."""
    return per_image_bench_rows(config.text_config.num_hidden_layers, lambda settings: _qwen_plan(config, processor, settings))


def _embed_qwen(model, settings: ReductionSettings, inputs):
    """The embedded prompt, the ViT's merged image tokens in place (`families.qwen_vl.embed_prompt`)."""
    from lmms_simignore.families import qwen_vl

    return qwen_vl.embed_prompt(model, inputs)


def _full_tiles(records: list[dict], processor) -> list[dict]:
    """The shapes images as the largest squares whose tiles all reach the LLM (`tiled_shapes.full_tile_side`:
    LLaVA-1.6 672 x 672, 2 x 2 tiles; OneVision 1152 x 1152, 3 x 3 tiles)."""
    side = tiled_shapes.full_tile_side(processor.image_processor, getattr(processor, "vision_aspect_ratio", None))
    return [{**record, "image": record["image"].resize((side, side))} for record in records]


def _tiled_plan(config, processor, settings: ReductionSettings):
    from lmms_simignore.families import llava_next

    return llava_next.nominal_plan(config, settings)


def _tiled_rows(config, processor) -> list[BenchRow]:
    """The per-image rows that LLaVA-NeXT / OneVision plan for their largest image (`families.llava_next.nominal_plan`)."""
    return per_image_bench_rows(config.text_config.num_hidden_layers, lambda settings: _tiled_plan(config, processor, settings))


def _embed_tiled(model, settings: ReductionSettings, inputs):
    """The embedded prompt, each image's base view and tile grid in place, newlines not image tokens
    (`families.llava_next.embed_prompt`)."""
    from lmms_simignore.families import llava_next

    return llava_next.embed_prompt(model, inputs, keep_tower=bool(settings.methods_at(VISION)))


LLAVA_FAMILY = BenchFamily("llava", _load_llava, _resized, _encode_llava, _llava_rows, _embed_llava, _choose_llava, _llava_plan)
QWEN_VL_FAMILY = BenchFamily("qwen_vl", _load_auto, _photo_sized, _encode_chat, _qwen_rows, _embed_qwen, _choose_each_image,
                             _qwen_plan)
TILED_FAMILY = BenchFamily("llava_next", _load_auto, _full_tiles, _encode_chat, _tiled_rows, _embed_tiled, _choose_each_image,
                           _tiled_plan)


def bench_family(config) -> BenchFamily:
    """The bench's family of a checkpoint's config (by its model_type); refuses the others by name."""
    from lmms_simignore.families import llava_next, qwen_vl

    families = {"llava": LLAVA_FAMILY, **{model_type: QWEN_VL_FAMILY for model_type in qwen_vl.MODEL_TYPES},
                **{model_type: TILED_FAMILY for model_type in llava_next.MODEL_TYPES}}
    if config.model_type not in families:
        raise ValueError(f"the bench runs {', '.join(families)} checkpoints; this one is {config.model_type!r}")
    return families[config.model_type]


def measure_once(model, tokenizer, family: BenchFamily, settings: ReductionSettings, inputs, texts: list[str],
                 image_seeds: list[int], decode_tokens: int) -> dict:
    """One timed pass over the batch: seconds for the choice, time to first token and decoding, peak memory.

    texts: Simignore's comparison text per row; image_seeds: one per image in the batch (random choices).
    """
    device = inputs["input_ids"].device
    with PeakMemory(device) as memory:
        _sync(device)
        started = time.perf_counter()
        embedding = family.embed(model, settings, inputs)
        _sync(device)
        embedded = time.perf_counter()
        reduced, stages = family.choose(model, tokenizer, settings, inputs, embedding, texts, image_seeds)
        _sync(device)
        chosen = time.perf_counter()
        run = engine.LanguageModelRun(model, reduced, stages=stages)
        tokens = run.prefill().argmax(-1)
        _sync(device)
        first_token = time.perf_counter()
        for _ in range(decode_tokens):
            tokens = run.feed(tokens[:, None])[:, -1].argmax(-1)
        _sync(device)
        finished = time.perf_counter()
    return {
        "ttft_s": first_token - started,
        "prefill_s": first_token - chosen,
        "choice_s": chosen - embedded,
        "decode_tokens_per_s": decode_tokens * inputs["input_ids"].shape[0] / (finished - first_token) if decode_tokens else None,
        "end_to_end_s": (finished - started) / inputs["input_ids"].shape[0],
        "peak_memory_bytes": memory.peak_bytes,
        "image_tokens_seen": run.image_tokens_seen,  # what each layer computed on, per prompt row
        "stage_flops": run.stage_flops,  # what the in-LLM stages' own choices computed
    }


def _batch_mean(per_row: list[list[int]]) -> list[float]:
    """Per layer, the mean over the batch rows of a (B, n_layers) count (a whole number where every row agrees)."""
    return [sum(column) / len(column) if len(set(column)) > 1 else column[0] for column in zip(*per_row)]


def _summary(values: list[float | None]) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_model(model, processor, records: list[dict], batch_size: int, warmup: int, repeats: int, decode_tokens: int,
                progress=print) -> dict:
    """Every bench row on the first `batch_size` records; medians, spread, ratios against none and the FLOP ideal.

    The ideal counts the decoder layers (`lmms_simignore.bench.flops`) and the FLOPs the in-LLM stages' own choices
    computed (`LanguageModelRun.stage_flops`: VisionDrop's next-layer attention, FastV's one row), so it is compared
    with the LLM prefill
    (from the reduced prompt to the first logits); time to first token adds the vision tower and the choice. Its text
    tokens are the prompt's other tokens, the newline separators of tiled images included.
    records: one image each, at the size the family feeds (`BenchFamily.images`).
    """
    from lmms_simignore.models.base import options_text

    family = bench_family(model.config)
    device = next(model.parameters()).device
    batch = records[:batch_size]
    inputs = family.encode(processor, batch).to(device)
    texts = [options_text(record["choices"], "options") for record in batch]  # the model class's default text
    image_seeds = list(range(len(batch)))  # one image per shapes record
    num_layers = model.config.text_config.num_hidden_layers
    shape = DecoderShape.from_text_config(model.config.text_config)
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    rows = family.rows(model.config, processor)
    tokenizer = processor.tokenizer
    for _ in range(warmup):  # warm every path before any measurement
        for row in rows:
            measure_once(model, tokenizer, family, row.settings, inputs, texts, image_seeds, decode_tokens)
    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    for repeat in range(repeats):  # round robin, so drift over time affects every row alike
        for row in rows:
            runs[row.name].append(measure_once(model, tokenizer, family, row.settings, inputs, texts, image_seeds, decode_tokens))
        progress(f"  repeat {repeat + 1}/{repeats} done")
    # (B,) image tokens of each row's one image: what `none` computed on (a tiled image's newline separators are text)
    image_tokens = runs["none"][-1]["image_tokens_seen"].computed[:, 0].tolist()
    results = {}
    for row in rows:
        seen = runs[row.name][-1].pop("image_tokens_seen")  # observed in the last repeat (the choice is deterministic)
        stage_flops = runs[row.name][-1].pop("stage_flops")
        for run in runs[row.name]:
            run.pop("image_tokens_seen", None)
            run.pop("stage_flops", None)
        computed, visible = seen.computed.tolist(), seen.visible.tolist()  # (B, n_layers) each
        flops = sum(sample_prefill_flops(shape, {"prompt_tokens": n, "image_tokens": m, "computed_per_layer": layers})
                    for n, m, layers in zip(prompt_tokens, image_tokens, computed))
        results[row.name] = {
            "settings": str(row.settings),
            "computed_per_layer": _batch_mean(computed),
            "visible_per_layer": _batch_mean(visible),
            "layer_flops": flops,
            "stage_flops": stage_flops,  # the in-LLM stages' own choices (projections and scores they asked for)
            "prefill_flops": flops + stage_flops,
            **{key: _summary([run[key] for run in runs[row.name]]) for key in runs[row.name][0]},
        }
    baseline = results["none"]
    for result in results.values():
        result["ttft_speedup"] = baseline["ttft_s"]["median"] / result["ttft_s"]["median"]
        result["prefill_speedup"] = baseline["prefill_s"]["median"] / result["prefill_s"]["median"]
        result["ideal_prefill_speedup"] = baseline["prefill_flops"] / result["prefill_flops"]
        result["prefill_speedup_vs_ideal"] = result["prefill_speedup"] / result["ideal_prefill_speedup"]
        result["choice_share_of_prefill"] = result["choice_s"]["median"] / result["prefill_s"]["median"]
    return {"image_tokens": _batch_mean([[count] for count in image_tokens])[0],  # per image (the batch's mean if they differ)
            "layers": num_layers, "batch_size": len(batch), "prompt_tokens": prompt_tokens,
            "rows": results}


def wrapper_overhead(records: list[dict], device: torch.device, repeats: int, max_new_tokens: int = 4, progress=print) -> dict:
    """`reduction=none` through our lmms-eval class against lmms-eval's built-in `llava_hf` (batch 1, both on the
    shipped testbed model, the same generate_until requests): seconds per pass, overhead and answer agreement."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple.llava_hf import LlavaHf

    from lmms_simignore.models.llava_simignore import LlavaSimignore
    from lmms_simignore.shipped import shipped_model_dir
    from lmms_simignore.tasks.scienceqa_utils import doc_to_visual
    from lmms_simignore.testbed.llava_recipe import prompt_text

    task, split = "bench_shapes", "test"
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False}

    def requests():  # fresh ones per pass: lmms-eval's llava_hf writes into the requests' gen_kwargs
        return [Instance("generate_until", (prompt_text(doc), dict(gen_kwargs), doc_to_visual, doc_id, task, split), idx=0,
                         metadata={"task": task, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(records)]

    path = str(shipped_model_dir("shapes-llava"))
    models = {
        "llava_simignore (reduction=none)": LlavaSimignore(pretrained=path, device=str(device), batch_size=1),
        "llava_hf (built-in)": LlavaHf(pretrained=path, device=str(device), device_map=str(device), dtype="float32"),
    }
    for model in models.values():
        model.task_dict = {task: {split: records}}
        model.generate_until(requests()[:2])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in models}
    answers = {}
    for _ in range(repeats):
        for name, model in models.items():
            batch = requests()
            _sync(device)
            started = time.perf_counter()
            answers[name] = model.generate_until(batch)
            _sync(device)
            seconds[name].append(time.perf_counter() - started)
    ours, theirs = (statistics.median(values) for values in seconds.values())
    progress(f"  wrapper overhead: {100 * (ours / theirs - 1):+.1f}% ({ours:.2f} s vs {theirs:.2f} s for {len(records)} prompts)")
    first, second = answers.values()
    return {"prompts": len(records), "seconds": {name: _summary(values) for name, values in seconds.items()},
            "overhead": ours / theirs - 1, "same_answers": first == second}


def machine() -> dict:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, gpu_memory_gib=round(properties.total_memory / 2**30, 1))
    return info


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
             f"{report['machine'].get('gpu', str(report['machine']['cpu_threads']) + ' CPU threads')}, {report['machine']['date']}",
             "Timing does not depend on weight values (the shaped models have random weights).", ""]
    if "wrapper_overhead" in report:
        overhead = report["wrapper_overhead"]
        lines += ["## Wrapper overhead: `reduction=none` against the built-in `llava_hf` (testbed model, batch 1)", "",
                  table(["model class", f"seconds per pass of {overhead['prompts']} prompts (min-max)"],
                        [[name, f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"]
                         for name, summary in overhead["seconds"].items()], align="lr")]
        lines += ["", f"Overhead {100 * overhead['overhead']:+.1f}%; identical answers: {overhead['same_answers']}.", ""]
    for name, model_report in report["models"].items():
        lines += [f"## {name}: {model_report['image_tokens']} image tokens, {model_report['layers']} layers, batch {model_report['batch_size']}, "
                  f"{report['settings']['repeats']} repeats after {report['settings']['warmup']} warm-up", ""]
        body = []
        for row, result in model_report["rows"].items():
            prefill = result["prefill_s"]
            memory = result["peak_memory_bytes"]["median"] / 2**20 if result["peak_memory_bytes"] else None
            decode = result["decode_tokens_per_s"]["median"] if result["decode_tokens_per_s"] else None
            body.append([
                row, f"{result['ttft_s']['median'] * 1000:.1f}",
                f"{prefill['median'] * 1000:.1f} ({prefill['min'] * 1000:.1f}-{prefill['max'] * 1000:.1f})",
                f"{result['prefill_speedup']:.2f}", f"{result['ideal_prefill_speedup']:.2f}", f"{result['prefill_speedup_vs_ideal']:.2f}",
                f"{result['choice_s']['median'] * 1000:.2f}", f"{100 * result['choice_share_of_prefill']:.1f}%",
                "-" if decode is None else f"{decode:.0f}", "-" if memory is None else f"{memory:.0f}",
            ])
        header = ["row", "time to first token ms", "LLM prefill ms (min-max)", "prefill speed-up", "ideal (FLOPs)", "measured / ideal",
                  "choice ms", "choice / prefill", "decode tok/s", "peak memory MiB"]
        lines += [table(header, body, align="l" + "r" * 9), ""]
    if "scienceqa_pass" in report:
        lines += scienceqa_pass.markdown(report["scienceqa_pass"])
    return "\n".join(lines + against_targets(report))


# The targets: drop-mode prefill speed-up >= 0.9 x ideal (on a GPU), choice <= 1% of prefill, wrapper <= 2%.
TARGETS = {"drop_vs_ideal": 0.9, "choice_share": 0.01, "wrapper_overhead": 0.02}


def against_targets(report: dict) -> list[str]:
    """Markdown lines: each model's worst drop-mode measured/ideal and worst choice share, and the wrapper's overhead."""
    where = report["machine"].get("gpu") or "CPU"
    body = []
    for name, model_report in report["models"].items():
        rows = model_report["rows"]
        drop = {row: result["prefill_speedup_vs_ideal"] for row, result in rows.items() if "_drop_" in row}
        worst_drop = min(drop, key=drop.get)
        body.append([f"{name}: drop-mode prefill speed-up >= {TARGETS['drop_vs_ideal']} x ideal", f"worst {drop[worst_drop]:.2f} ({worst_drop})",
                     "yes" if drop[worst_drop] >= TARGETS["drop_vs_ideal"] else "no"])
        share = {row: result["choice_share_of_prefill"] for row, result in rows.items() if row != "none"}
        worst_share = max(share, key=share.get)
        body.append([f"{name}: token choice <= {TARGETS['choice_share']:.0%} of prefill", f"worst {share[worst_share]:.1%} ({worst_share})",
                     "yes" if share[worst_share] <= TARGETS["choice_share"] else "no"])
    if "wrapper_overhead" in report:
        overhead = report["wrapper_overhead"]["overhead"]
        body.append([f"wrapper overhead <= {TARGETS['wrapper_overhead']:.0%} against `llava_hf`", f"{overhead:+.1%}",
                     "yes" if overhead <= TARGETS["wrapper_overhead"] else "no"])
    return [f"## Against the targets ({where})", "", *table(["target", "measured", "met"], body).split("\n"), ""]


LLAVA_BENCH_MODELS = ("testbed", "paper-shaped", "llava7b-shape", "llava13b-shape", "mipha3b-shape")  # the pass's too
TILED_TINY_MODELS = {"llava_next-tiny": tiny_llava_next.build_tiny_llava_next,  # for CPUs
                     "llava_onevision-tiny": tiny_llava_next.build_tiny_llava_onevision}
BENCH_MODELS = (*LLAVA_BENCH_MODELS, "qwen-tiny", qwen_shapes.QWEN25_VL_7B_SHAPE, *TILED_TINY_MODELS, *tiled_shapes.SHAPES)


def default_models(device: torch.device) -> tuple[str, ...]:
    """The small models on a CPU; the testbed and the LLaVA-1.5-7B shape on a GPU."""
    return ("testbed", "llava7b-shape") if device.type == "cuda" else ("testbed", "paper-shaped")


def bench_checkpoint(name: str, workdir: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """The folder of bench model `name`: the shipped testbed, or random weights written under `workdir`:
    `paper-shaped` (576 image tokens, 6 narrow layers), `qwen-tiny` (the tiny Qwen2.5-VL), `llava_next-tiny` and
    `llava_onevision-tiny` (the tiny tiled LLaVAs of `lmms_simignore.testbed.tiny_llava_next`), the exact
    Qwen2.5-VL-7B-Instruct shape, the exact LLaVA-1.6-vicuna-7B and LLaVA-OneVision-qwen2-7B shapes, or the exact
    LLaVA-1.5-7B/13B and Mipha-3B shapes."""
    from lmms_simignore.shipped import shipped_model_dir

    if name == "testbed":
        return shipped_model_dir("shapes-llava")
    folder = workdir / name
    if (folder / "config.json").exists():
        return folder
    if name == "paper-shaped":
        from lmms_simignore.testbed.tiny import PAPER_SHAPED, build_tiny_llava

        return build_tiny_llava(folder, shape=PAPER_SHAPED)
    if name == "qwen-tiny":
        from lmms_simignore.testbed.tiny_qwen import build_tiny_qwen

        return build_tiny_qwen(folder, qwen_shapes.FAMILY)
    if name in TILED_TINY_MODELS:
        return TILED_TINY_MODELS[name](folder)
    if name == qwen_shapes.QWEN25_VL_7B_SHAPE:
        return qwen_shapes.write_random_shape(folder, device, dtype)
    if name in tiled_shapes.SHAPES:
        return tiled_shapes.write_random_shape(name, folder, device, dtype)
    from lmms_simignore.bench.llava_shapes import write_random_shape

    return write_random_shape(name, folder, device, dtype)


def load_bench_model(folder: Path, device: torch.device, dtype: torch.dtype):
    """Model (straight onto `device`, sdpa attention) and processor of a bench checkpoint folder, by its family."""
    from transformers import AutoConfig

    from lmms_simignore.shipped import resolve_pretrained

    return bench_family(AutoConfig.from_pretrained(resolve_pretrained(str(folder)))).load(folder, device, dtype)


def _check_models(names, option: str, allowed: tuple[str, ...] = BENCH_MODELS) -> None:
    for name in names:
        if name not in allowed:
            raise ValueError(f"{option}: unknown model {name!r}; allowed: {', '.join(allowed)}")


def run_bench(out_dir: str | Path, models: tuple[str, ...] | None = None, quick: bool = False, device: str | None = None,
              batch_size: int = 4, warmup: int = 2, repeats: int = 7, decode_tokens: int = 16,
              pass_model: str | None = None, pass_prompts: int | None = None,
              pass_batch_sizes: tuple[int, ...] = (1, 8), pass_data: str | None = None,
              pass_methods: tuple[str, ...] = scienceqa_pass.DEFAULT_PASS_METHODS, wrapper: bool = True, echo=print) -> dict:
    """Benchmark `models` (default: `default_models`; with `quick`, the testbed) and time a ScienceQA-IMG-sized pass of
    `pass_prompts` prompts (default: the 2017 of its test split; 0 skips it) on `pass_model` (a LLaVA-family model;
    default: paper-shaped on a CPU, llava7b-shape on a GPU) for `pass_methods` (`scienceqa_pass.pass_rows`); write
    bench.json and bench.md into `out_dir`. `wrapper`: also time the wrapper's overhead against `llava_hf` (not with
    `quick`). A model's random weights are deleted once it is measured, unless the pass needs them. `quick`:
    batch 2, 1 warm-up, 2 repeats, 2 decode tokens and a pass of at most 8 prompts on paper-shaped."""
    import shutil
    import tempfile

    from lmms_simignore.testbed import shapes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = tuple(models or (("testbed",) if quick else default_models(device)))
    pass_model = pass_model or ("llava7b-shape" if device.type == "cuda" else "paper-shaped")
    pass_prompts = scienceqa_pass.SCIENCEQA_IMG_TEST_QUESTIONS if pass_prompts is None else pass_prompts
    _check_models(models, "--models")
    _check_models([pass_model], "--pass-model", LLAVA_BENCH_MODELS)  # the pass runs llava_simignore
    scienceqa_pass.check_pass_methods(tuple(pass_methods))
    if pass_prompts < 0 or not pass_batch_sizes or any(size < 1 for size in pass_batch_sizes):
        raise ValueError(f"--pass-prompts must be >= 0 and --pass-batch-sizes positive; got {pass_prompts}, {pass_batch_sizes}")
    if pass_data is not None:
        from lmms_simignore.local_data import check_local_data

        check_local_data(pass_data)
    if quick:
        batch_size, warmup, repeats, decode_tokens = 2, 1, 2, 2
        pass_model, pass_prompts, pass_batch_sizes = "paper-shaped", min(pass_prompts, 8), (1, 4)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    records = shapes.shapes_records(batch_size, seed=shapes.HELD_OUT_SEED)
    report = {"machine": machine(), "settings": {"quick": quick, "device": str(device), "dtype": str(dtype), "batch_size": batch_size,
                                                  "warmup": warmup, "repeats": repeats, "decode_tokens": decode_tokens,
                                                  "attn_implementation": "sdpa"}, "models": {}}
    out_dir = Path(out_dir)

    def save() -> None:
        """bench.json and bench.md as far as measured: a run stopped part-way keeps what it finished."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
        (out_dir / "bench.md").write_text(markdown(report) + "\n")

    if wrapper and not quick:
        echo("wrapper overhead against the built-in llava_hf:")
        report["wrapper_overhead"] = wrapper_overhead(shapes.shapes_records(64, seed=shapes.HELD_OUT_SEED), device, repeats, progress=echo)
    with tempfile.TemporaryDirectory(prefix="lmms-simignore-bench-") as workdir:
        for name in models:
            echo(f"{name}:")
            folder = bench_checkpoint(name, Path(workdir), device, dtype)
            model, processor = load_bench_model(folder, device, dtype)
            model_records = bench_family(model.config).images(records, processor)
            report["models"][name] = bench_model(model, processor, model_records, batch_size, warmup, repeats, decode_tokens, progress=echo)
            save()
            del model
            scienceqa_pass.release_memory(device)
            if folder.is_relative_to(workdir) and not (pass_prompts and name == pass_model):
                shutil.rmtree(folder)  # a 7B shape is 14-17 GB on disk
        if pass_prompts:
            echo(f"ScienceQA-IMG-sized pass on {pass_model}:")
            folder = bench_checkpoint(pass_model, Path(workdir), device, dtype)
            if pass_data is None:
                from transformers import AutoTokenizer

                docs = scienceqa_pass.synthetic_docs(AutoTokenizer.from_pretrained(folder), pass_prompts)
                source = "text lengths drawn from the assumed ScienceQA-IMG distribution (lmms_simignore/bench/scienceqa_pass.py)"
            else:
                docs = scienceqa_pass.local_docs(pass_data, pass_prompts)
                source = f"questions of {Path(pass_data).name}"
            report["scienceqa_pass"] = {"model": pass_model, "source": source}

            def passed(timing: dict) -> None:
                report["scienceqa_pass"].update(timing)
                save()

            scienceqa_pass.time_pass(folder, docs, tuple(pass_batch_sizes), device, str(dtype).removeprefix("torch."),
                                     attn_implementation="sdpa", progress=echo, on_result=passed, methods=tuple(pass_methods))
    save()
    echo(markdown(report))
    echo(f"wrote {out_dir / 'bench.json'} and bench.md")
    return report
