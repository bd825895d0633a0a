"""A ScienceQA-IMG-sized pass, timed: 2017 prompts through the lmms-eval model class, per reduction and batch size.

The test split cannot be shipped (CC BY-NC-SA) nor downloaded here, so by default the prompts are built to its
shape: 2017 questions with one image each, in lmms-eval's `scienceqa_img` text
(`[Context: {hint}\\n]{question}\\nA. {c0}\\n...Answer with the option's letter ...`), with text lengths drawn
in tokens of the model's own tokenizer from the assumptions below. `data=` a local copy of the test split
(parquet file or `save_to_disk` folder) times the real questions instead. The image's 576 tokens dominate a
LLaVA-1.5 prompt either way; the report gives the prompt lengths it measured.

Each pass answers every prompt with one token (the answer letter, as the published runs decode it), through
`LlavaSimignore.generate_until`: image loading and preprocessing, batching, the token choice, prefill. The rows
take turns piece by piece (`time_pass`), so a speed-up is a median of ratios measured side by side.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

import torch

from lmms_simignore.bench.rows import bench_fastv_layer, kept_tokens
from lmms_simignore.markdown import table

SCIENCEQA_IMG_TEST_QUESTIONS = 2017

# Assumed text lengths, in tokens (not measured from the data): a quarter of the questions have no context (maps),
# some a short one ("Select the best answer.", "Figure: ..."), many a few sentences (solutions, magnets, animals'
# adaptations), and some a passage (experiment descriptions).
HINT_TOKENS = ((5, (0, 0)), (5, (4, 25)), (7, (25, 80)), (3, (80, 300)))  # (relative weight, token range; log-uniform)
QUESTION_TOKENS = (8, 30)
CHOICE_COUNTS = ((2, 0.40), (3, 0.30), (4, 0.25), (5, 0.05))
CHOICE_TOKENS = (1, 10)
IMAGE_SIZES = ((200, 750), (150, 600))  # width and height ranges of the source images, in pixels

WORDS = (
    "the which of these is a an map shows states animal plant object property material solution experiment "
    "water temperature force magnet colour shape north south east west farthest select best answer figure "
    "mixture particle energy kinetic average sample measured students tested trial cell organism trait "
    "weather climate habitat ocean continent country capital sentence word passage read compare"
).split()


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    if high <= 0:
        return 0
    return round(math.exp(rng.uniform(math.log(max(low, 1)), math.log(high))))


class _TextOfLength:
    """Text of about `n` tokens of `tokenizer` (words counted one by one: pre-tokenizers split at spaces)."""

    def __init__(self, tokenizer, rng: random.Random):
        self.rng = rng
        self.cost = {word: len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in WORDS}

    def __call__(self, n: int) -> str:
        words, tokens = [], 0
        while tokens < n:
            word = self.rng.choice(WORDS)
            words.append(word)
            tokens += self.cost[word]
        return " ".join(words)


def synthetic_docs(tokenizer, num_docs: int = SCIENCEQA_IMG_TEST_QUESTIONS, seed: int = 0, num_images: int = 16) -> list[dict]:
    """ScienceQA-IMG-shaped docs (`question`, `choices`, `answer`, `hint`, `image`) with the assumed lengths.

    `num_images` random-pixel images of ScienceQA-like sizes are shared by the docs in turn.
    """
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        width, height = rng.randint(*IMAGE_SIZES[0]), rng.randint(*IMAGE_SIZES[1])
        images.append(Image.fromarray(pixels.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
    text = _TextOfLength(tokenizer, rng)
    docs = []
    for index in range(num_docs):
        hint_range = rng.choices([r for _, r in HINT_TOKENS], weights=[w for w, _ in HINT_TOKENS])[0]
        count = rng.choices([c for c, _ in CHOICE_COUNTS], weights=[p for _, p in CHOICE_COUNTS])[0]
        docs.append({
            "hint": text(_log_uniform(rng, *hint_range)),
            "question": text(rng.randint(*QUESTION_TOKENS)) + "?",
            "choices": [text(rng.randint(*CHOICE_TOKENS)) for _ in range(count)],
            "answer": rng.randrange(count),
            "image": images[index % num_images],
        })
    return docs


def local_docs(data: str | Path, num_docs: int, argument: str = "--pass-data") -> list[dict]:
    """The first `num_docs` questions with an image of a local test split (parquet file or save_to_disk folder)."""
    from datasets import Dataset, load_from_disk

    from lmms_simignore.local_data import check_local_data

    path = check_local_data(data)
    dataset = load_from_disk(str(path))["test"] if path.is_dir() else Dataset.from_parquet(str(path))
    missing = {"question", "choices", "hint", "image"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{argument} {data}: the split lacks ScienceQA columns {sorted(missing)}")
    docs = [doc for doc in dataset if doc["image"] is not None][:num_docs]
    if not docs:
        raise ValueError(f"{argument} {data}: no question with an image")
    return docs


PASS_METHODS = ("none", "simignore", "fastv", "pdrop", "dart", "visionzip")  # what `pass_rows` can time
DEFAULT_PASS_METHODS = ("none", "simignore", "fastv")


def check_pass_methods(methods: tuple[str, ...]) -> None:
    """Refuses `methods` (the `--pass-rows`) unless they are some of PASS_METHODS, none among them."""
    unknown = [method for method in methods if method not in PASS_METHODS]
    if unknown or not methods:
        raise ValueError(f"--pass-rows: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none given'}; allowed: "
                         f"{', '.join(PASS_METHODS)}")
    if "none" not in methods:
        raise ValueError(f"--pass-rows: {','.join(methods)} lacks none, which the speed-ups are measured against")


def pass_rows(image_tokens: int, num_layers: int, methods: tuple[str, ...] = DEFAULT_PASS_METHODS) -> dict[str, dict]:
    """Row name -> `ReductionSettings` arguments of each of `methods` (of PASS_METHODS, in that order): none,
    Simignore dropping half the image tokens before the LLM, FastV keeping half after its layer, PyramidDrop with its
    defaults (λ 0.5 at a quarter, a half and three quarters of the depth: it takes no budget), DART keeping half after
    FastV's layer and VisionZip keeping half in the tower (the budgets and layers of the benchmark's 50% rows; row
    names carry the budget, `simignore_drop_288` on 576 image tokens)."""
    check_pass_methods(methods)
    half, layer = kept_tokens(image_tokens, 0.5), bench_fastv_layer(num_layers)
    rows = {
        "none": ("none", {"reduction": "none"}),
        "simignore": (f"simignore_drop_{half}", {"reduction": "simignore", "keep": half, "apply": "drop"}),
        "fastv": (f"fastv_{half}", {"reduction": "fastv", "fastv_layer": layer, "fastv_keep": half}),
        "pdrop": ("pdrop", {"reduction": "pdrop"}),
        "dart": (f"dart_{half}", {"reduction": "dart", "dart_layer": layer, "keep": half}),
        "visionzip": (f"visionzip_{half}", {"reduction": "visionzip", "keep": half}),
    }
    return dict(rows[method] for method in PASS_METHODS if method in methods)


def _requests(docs: list[dict], task: str, split: str):
    from lmms_eval.api.instance import Instance

    from lmms_simignore.tasks.scienceqa_utils import POST_PROMPT, doc_to_text, doc_to_visual

    gen_kwargs = {"max_new_tokens": 1, "temperature": 0, "do_sample": False}
    return [
        Instance("generate_until", (doc_to_text(doc, {"post_prompt": POST_PROMPT}), dict(gen_kwargs), doc_to_visual, doc_id, task, split),
                 idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})
        for doc_id, doc in enumerate(docs)
    ]


def _quantiles(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def _chunks(count: int, batch_size: int, chunks: int) -> list[range]:
    """`count` prompts in about `chunks` consecutive pieces, each a whole number of batches."""
    size = max(batch_size, math.ceil(count / chunks / batch_size) * batch_size)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_pass(pretrained: str | Path, docs: list[dict], batch_sizes: tuple[int, ...], device: torch.device, dtype: str,
              attn_implementation: str | None = None, progress=print, on_result=None, chunks: int = 16,
              methods: tuple[str, ...] = DEFAULT_PASS_METHODS) -> dict:
    """Seconds for one pass over `docs` per (batch size, row), with speed-ups against `none` at the same batch size;
    `on_result(report)` after each batch size (the report so far), so that a long run stopped part-way keeps them.

    The rows are interleaved: the prompts are cut into about `chunks` pieces, and each piece is answered by every
    row in turn (the order rotating from piece to piece) before the next piece, so that load from elsewhere on
    the machine falls on all rows alike. A row's seconds are the sum over the pieces; its speed-up is the median
    of the per-piece ratios none / row, with their min and max (`methods`: the rows, `pass_rows`). One model is loaded per batch size and the rows
    switch its settings; two batches of warm-up per row precede the timing.
    """
    from transformers import AutoConfig

    from lmms_simignore import engine
    from lmms_simignore.engine.accounting import TokenAccounting
    from lmms_simignore.models.llava_simignore import LlavaSimignore
    from lmms_simignore.settings import ReductionSettings

    task, split = "scienceqa_img_sized", "test"
    requests = _requests(docs, task, split)
    config = AutoConfig.from_pretrained(pretrained)
    image_tokens = engine.image_tokens_per_image(config)
    rows = pass_rows(image_tokens, config.text_config.num_hidden_layers, methods)
    results = []
    report: dict = {"prompts": len(docs), "image_tokens": image_tokens, "max_new_tokens": 1, "batch_sizes": list(batch_sizes),
                    "results": results}
    for batch_size in batch_sizes:
        model = LlavaSimignore(pretrained=str(pretrained), device=str(device), dtype=dtype, batch_size=batch_size,
                               attn_implementation=attn_implementation)
        model.task_dict = {task: {split: docs}}
        settings = {row: ReductionSettings(**model_args) for row, model_args in rows.items()}
        for row in rows:  # warm-up
            model.use_settings(settings[row])
            model.generate_until(requests[: 2 * batch_size])
        pieces = _chunks(len(requests), batch_size, chunks)
        seconds = {row: [] for row in rows}
        answers = {row: [] for row in rows}
        accounting = {row: TokenAccounting() for row in rows}
        peak = {row: 0 for row in rows}
        names = list(rows)
        for number, piece in enumerate(pieces):
            for row in names[number % len(names):] + names[: number % len(names)]:
                model.use_settings(settings[row])
                model.accounting = accounting[row]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
                answers[row] += model.generate_until([requests[index] for index in piece])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    peak[row] = max(peak[row], torch.cuda.max_memory_allocated(device))
                seconds[row].append(time.perf_counter() - started)
        # prompt lengths as the processor built them (text tokens plus the expanded image tokens)
        report.setdefault("prompt_tokens", _quantiles([record["prompt_tokens"] for record in accounting["none"].records]))
        finished = []
        for row, model_args in rows.items():
            total = sum(seconds[row])
            ratios = _spread([base / own for base, own in zip(seconds["none"], seconds[row])])
            finished.append({
                "row": row, "batch_size": batch_size, "model_args": model_args, "seconds": total,
                "prompts_per_s": len(requests) / total, "speedup": ratios["median"], "speedup_spread": ratios,
                "pieces": len(pieces), "answered": sum(bool(answer) for answer in answers[row]),
                "mean_visible_image_tokens": accounting[row].mean_visible(),
                "peak_cuda_memory_bytes": peak[row] if device.type == "cuda" else None,
            })
        results += finished  # a batch size is recorded whole: its rows were measured side by side
        for result in finished:
            spread = result["speedup_spread"]
            progress(f"  pass batch {batch_size} {result['row']}: {result['seconds']:.1f} s ({result['prompts_per_s']:.1f} "
                     f"prompts/s, {spread['median']:.2f}x, per piece {spread['min']:.2f}-{spread['max']:.2f})")
        if on_result:
            on_result(report)
        del model
        release_memory(device)
    return report


def release_memory(device: torch.device) -> None:
    """Free a deleted model's memory before the next one loads (a 7B model is 14 GB of GPU memory)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(report: dict) -> list[str]:
    """The pass's section of bench.md (`report` as run_bench stores it: time_pass's, plus `model` and `source`)."""
    tokens = report["prompt_tokens"]
    lines = [f"## ScienceQA-IMG-sized pass: {report['prompts']} prompts on {report['model']}, one output token", "",
             f"Prompt tokens (text + {report['image_tokens']} image tokens): mean {tokens['mean']:.0f}, median {tokens['median']:.0f}, "
             f"p90 {tokens['p90']}, max {tokens['max']}; {report['source']}. Through `LlavaSimignore.generate_until` "
             "(image preprocessing, batching, token choice, prefill), after two batches of warm-up per row; the rows take "
             "turns piece by piece, and the speed-up is the median of the per-piece ratios (min-max in brackets).", ""]
    body = []
    for result in report["results"]:
        visible, memory, spread = result["mean_visible_image_tokens"], result["peak_cuda_memory_bytes"], result["speedup_spread"]
        body.append([result["batch_size"], result["row"], f"{result['seconds']:.1f}", f"{result['prompts_per_s']:.1f}",
                     f"{result['speedup']:.2f} ({spread['min']:.2f}-{spread['max']:.2f})", result["pieces"],
                     "-" if visible is None else f"{visible:.0f}", "-" if memory is None else f"{memory / 2**30:.1f}"])
    header = ["batch", "row", "seconds", "prompts/s", "speed-up vs none", "pieces", "mean image tokens per layer", "peak GPU memory GiB"]
    return lines + [table(header, body, align="rlrrrrrr"), ""]
