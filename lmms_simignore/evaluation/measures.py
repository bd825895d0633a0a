"""The leaderboard's measures against the unreduced row, as pure functions of what finished rows logged.

A row's samples are matched with another row's by lmms-eval's `doc_id` (`--log_samples`); only the doc_ids both rows
logged are compared (rows run with other `--limit`s share their first docs), and their counts are reported.

- relative accuracy: a row's score as a percentage of the `none` row's (same model and task), and its mean over the
  tasks of the suite;
- agreement: the share of samples answered exactly as `none` answered them, and the share of `none`'s correct answers
  the row keeps;
- a row that saw no image token (every sample's prompt had image tokens, no decoder layer saw any): the image
  dependence of a task is `none`'s score minus that row's;
- VTC-Bench's split: the samples a downsampling (`pool`) row still answers correctly ("easy") and those it loses
  ("hard"), and each row's accuracy on both;
- the Pareto frontier of accuracy against cost, and which bench model (bench.json) ran a sweep model's decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_simignore.bench.flops import DecoderShape, sample_prefill_flops


@dataclass(frozen=True)
class Answer:
    """One logged sample: the model's answer (lmms-eval's `filtered_resps`), whether it was right (from the task's main
    metric for the sample; None when that does not say), and the prompt lmms-eval logged (`input`), to tell that two
    rows ran the same document."""

    response: object
    correct: bool | None
    prompt: str | None = None


def sample_correct(value) -> bool | None:
    """Whether one sample was answered correctly, from the value a task's `process_results` gave its main metric: a
    0/1 score; a record with a 0/1 `score` (MME, POPE, OCRBench); a record of `pred` and `answer` (SEED-Bench).
    None for anything else (a graded score such as 0.5, a record the task scores only over all samples)."""
    if isinstance(value, dict):
        if "score" in value:
            return sample_correct(value["score"])
        if {"pred", "answer"} <= value.keys() and isinstance(value["pred"], str):
            return value["pred"] == value["answer"]
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return value == 1
    return None


def answers(records: list[dict], metric: str, others: tuple[str, ...] = ()) -> dict[int, Answer]:
    """lmms-eval's per-sample records of one task -> {doc_id: Answer}; refuses (ValueError) a doc_id logged twice.

    A sample's correctness is read from its main `metric`, or, where the task gives that metric only to some samples
    (SEED-Bench: `seed_image` to image docs), from the first of the task's `others` it has. Agreement compares the
    answers of every sample; "kept" and the split count right and wrong answers, which only samples whose correctness
    `sample_correct` reads give."""
    found: dict[int, Answer] = {}
    for record in records:
        doc_id = record["doc_id"]
        if doc_id in found:
            raise ValueError(f"doc_id {doc_id} is logged twice")
        value = next((record[name] for name in (metric, *others) if name in record), None)
        found[doc_id] = Answer(record["filtered_resps"], sample_correct(value), record.get("input"))
    return found


def scored(docs: dict[int, Answer]) -> bool:
    """Whether every sample's correctness is known."""
    return all(answer.correct is not None for answer in docs.values())


def shared_docs(row: dict[int, Answer], other: dict[int, Answer]) -> list[int]:
    """The doc_ids both rows logged, sorted; refuses (ValueError) a doc_id whose logged prompts differ (the rows did not
    run the same documents)."""
    shared = sorted(row.keys() & other.keys())
    for doc_id in shared:
        a, b = row[doc_id].prompt, other[doc_id].prompt
        if a is not None and b is not None and a != b:
            raise ValueError(f"doc_id {doc_id} has different prompts in the two rows ({a[:60]!r} vs {b[:60]!r}): "
                             f"they did not run the same documents")
    return shared


def relative_accuracy(value: float, baseline: float | None) -> float | None:
    """100 * value / baseline: a row's score as a percentage of the `none` row's; None without a baseline or with 0."""
    return None if not baseline else 100 * value / baseline


@dataclass(frozen=True)
class SuiteAverage:
    """The mean relative accuracy over the `tasks` of a suite of `of` tasks that a row has one for (None for none)."""

    value: float | None
    tasks: int
    of: int

    def __str__(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.1f}" + ("" if self.tasks == self.of else f" ({self.tasks} of {self.of} tasks)")


def suite_average(relative: dict[str, float | None], suite: list[str]) -> SuiteAverage:
    """The mean of a row's relative accuracies (task -> % or None) over the tasks of `suite` where it has one.

    A task the row did not run, or one without a `none` row, is left out of the mean and counted: the average then says
    it covers fewer tasks than the suite ('2 of 3 tasks'), so it is not read as comparable with a whole-suite one."""
    values = [relative[task] for task in suite if relative.get(task) is not None]
    return SuiteAverage(sum(values) / len(values) if values else None, len(values), len(suite))


@dataclass(frozen=True)
class Agreement:
    """A row against the `none` row over the samples both logged (`compared`)."""

    compared: int
    same: int  # answered exactly as `none` answered
    baseline_correct: int | None  # `none` answered correctly (None: correctness unknown)
    kept: int | None  # of those, the row answered correctly too

    @property
    def same_share(self) -> float | None:
        return self.same / self.compared if self.compared else None

    @property
    def kept_share(self) -> float | None:
        return self.kept / self.baseline_correct if self.baseline_correct else None


def agreement(row: dict[int, Answer], baseline: dict[int, Answer]) -> Agreement:
    """How often `row` gives `baseline`'s answer, and how many of `baseline`'s correct answers it keeps (None, None
    when a sample's correctness is unknown)."""
    shared = shared_docs(row, baseline)
    same = sum(row[doc_id].response == baseline[doc_id].response for doc_id in shared)
    if not (scored(row) and scored(baseline)):
        return Agreement(compared=len(shared), same=same, baseline_correct=None, kept=None)
    right = [doc_id for doc_id in shared if baseline[doc_id].correct]
    return Agreement(compared=len(shared), same=same, baseline_correct=len(right), kept=sum(row[doc_id].correct for doc_id in right))


def sees_no_image_tokens(records: list[dict]) -> bool:
    """Whether token-accounting records (one row's, one task's) show a row that saw no image token: every sample's
    prompt had image tokens and no decoder layer saw any of them. False without records or with a text-only prompt."""
    return bool(records) and all(record["image_tokens"] > 0 and not any(record["visible_per_layer"]) for record in records)


@dataclass(frozen=True)
class Split:
    """A row's correct answers on the samples a reference (downsampling) row answers correctly ("easy") and on those it
    gets wrong ("hard"), over the samples both logged."""

    easy: int
    easy_correct: int
    hard: int
    hard_correct: int

    @property
    def easy_accuracy(self) -> float | None:
        return self.easy_correct / self.easy if self.easy else None

    @property
    def hard_accuracy(self) -> float | None:
        return self.hard_correct / self.hard if self.hard else None


def split(reference: dict[int, Answer], row: dict[int, Answer]) -> Split | None:
    """`row`'s accuracy on the samples `reference` still answers correctly and on those it loses (VTC-Bench's split);
    None when a sample's correctness is unknown."""
    shared = shared_docs(row, reference)
    if not (scored(reference) and scored(row)):
        return None
    easy = [doc_id for doc_id in shared if reference[doc_id].correct]
    hard = [doc_id for doc_id in shared if not reference[doc_id].correct]
    return Split(len(easy), sum(row[doc_id].correct for doc_id in easy), len(hard), sum(row[doc_id].correct for doc_id in hard))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, value) points that no other point dominates (as cheap or cheaper and as good or better,
    strictly in one of them), ordered by cost. Identical points dominate neither other: both are on the front."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    front = [i for i, point in enumerate(points) if not any(dominates(other, point) for other in points)]
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def runs_decoder(bench_model: dict, shape: DecoderShape, layers: int, image_tokens: float) -> bool:
    """Whether a bench model (its entry in bench.json) ran the decoder of a sweep model: the same number of decoder
    layers and image tokens per image, and the prefill FLOPs of the bench's own `none` prompts recounted with the sweep
    model's `shape` equal to those the bench counted (which pins hidden, MLP, head and key/value sizes)."""
    none = bench_model["rows"].get("none")
    if none is None or bench_model["layers"] != layers or bench_model["image_tokens"] != image_tokens:
        return False
    recounted = sum(sample_prefill_flops(shape, {"prompt_tokens": prompt, "image_tokens": bench_model["image_tokens"],
                                                 "computed_per_layer": none["computed_per_layer"]})
                    for prompt in bench_model["prompt_tokens"])
    return math.isclose(recounted, none["prefill_flops"], rel_tol=1e-9)
