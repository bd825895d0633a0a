"""The leaderboard's measures against the unreduced row: relative accuracy, agreement, image dependence, VTC-Bench's
downsampling split, the Pareto frontier and measured prefill times, on answers and row folders written by hand."""

import csv
import json
import subprocess
import sys

import pytest

from lmms_simignore.bench.flops import DecoderShape, sample_prefill_flops
from lmms_simignore.evaluation.leaderboard import write_leaderboard
from lmms_simignore.evaluation.measures import (Answer, Agreement, Split, SuiteAverage, agreement, answers, pareto_front,
                                                relative_accuracy, runs_decoder, sample_correct, sees_no_image_tokens, shared_docs, split,
                                                suite_average)
from lmms_simignore.settings import ReductionSettings


def logged(responses, correct, prompts=None):
    """doc_id -> Answer from parallel lists (doc_ids 0, 1, ...)."""
    prompts = prompts or [f"question {doc_id}" for doc_id in range(len(responses))]
    return {doc_id: Answer(response, bool(right), prompt) for doc_id, (response, right, prompt) in enumerate(zip(responses, correct, prompts))}


# five questions, targets A B C C B
NONE = logged("ABCDA", [1, 1, 1, 0, 0])
POOL = logged("ACCDB", [1, 0, 1, 0, 1])


# -- per-sample records ---------------------------------------------------------------------------------------------


def test_answers_are_the_filtered_responses_scored_by_the_main_metric():
    records = [{"doc_id": 1, "filtered_resps": "B", "exact_match": 0.0, "input": "q1"},
               {"doc_id": 0, "filtered_resps": ["A"], "exact_match": True, "input": "q0"}]
    assert answers(records, "exact_match") == {0: Answer(["A"], True, "q0"), 1: Answer("B", False, "q1")}


def test_answers_refuse_a_doc_logged_twice():
    with pytest.raises(ValueError, match="doc_id 0 is logged twice"):
        answers([{"doc_id": 0, "filtered_resps": "A", "exact_match": 1.0}] * 2, "exact_match")


@pytest.mark.parametrize("value, correct", [
    (1.0, True), (0, False), (True, True), (0.5, None), (None, None),
    ({"question_id": "existence/1.png", "category": "existence", "score": 1.0}, True),  # MME
    ({"question_id": "1", "score": 0.0, "prediction": "no", "ground_truth": "yes"}, False),  # POPE
    ({"question_type": "Regular Text Recognition", "score": 1, "prediction": "cat"}, True),  # OCRBench
    ({"pred": "B", "answer": "B", "question_id": "7"}, True), ({"pred": "l", "answer": "D", "question_id": "0"}, False),  # SEED
    ({"index": 0, "answer": "A", "prediction": "A."}, None),  # MMBench: scored over a question's rotated copies only
    ({"id": "validation_Art_1", "answer": "B", "parsed_pred": ["D"]}, None),  # MMMU: parsed by its aggregation
])
def test_a_sample_is_right_or_wrong_where_the_task_s_per_sample_value_says_so(value, correct):
    assert sample_correct(value) is correct


def test_rows_that_logged_other_prompts_for_a_doc_id_are_not_compared():
    other = logged("ABCDA", [1, 1, 1, 0, 0], prompts=["question 0", "another question", "question 2", "question 3", "question 4"])
    with pytest.raises(ValueError, match="doc_id 1 has different prompts"):
        shared_docs(other, NONE)
    assert shared_docs(logged("AB", [1, 1], prompts=[None, None]), NONE) == [0, 1]  # no prompt logged: not checked


# -- relative accuracy and the suite average ------------------------------------------------------------------------


def test_relative_accuracy_is_the_percentage_of_the_none_rows_score():
    assert relative_accuracy(0.6, 0.8) == pytest.approx(75.0)
    assert relative_accuracy(0.9, 0.6) == pytest.approx(150.0)
    assert relative_accuracy(0.6, None) is None and relative_accuracy(0.6, 0.0) is None


def test_the_suite_average_leaves_out_and_counts_the_tasks_a_row_lacks():
    suite = ["mme", "gqa", "pope"]
    assert suite_average({"mme": 90.0, "gqa": 80.0, "pope": 100.0}, suite) == SuiteAverage(90.0, 3, 3)
    partial = suite_average({"mme": 90.0, "gqa": None}, suite)  # gqa without a none row, pope not run
    assert partial == SuiteAverage(90.0, 1, 3) and str(partial) == "90.0 (1 of 3 tasks)"
    assert str(suite_average({"mme": 90.0, "gqa": 80.0, "pope": 100.0}, suite)) == "90.0"
    assert str(suite_average({}, suite)) == "-"


# -- agreement with none --------------------------------------------------------------------------------------------


def test_agreement_counts_identical_answers_and_the_none_rows_correct_answers_kept():
    # same answer on docs 0, 2, 3; none is right on 0, 1, 2, of which pooling keeps 0 and 2
    result = agreement(POOL, NONE)
    assert result == Agreement(compared=5, same=3, baseline_correct=3, kept=2)
    assert result.same_share == pytest.approx(0.6) and result.kept_share == pytest.approx(2 / 3)
    assert agreement(NONE, NONE) == Agreement(5, 5, 3, 3)


def test_agreement_of_a_row_with_fewer_samples_is_over_the_samples_both_logged():
    first_three = logged("ABA", [1, 1, 0])  # e.g. a row run with --limit 3
    assert agreement(first_three, NONE) == Agreement(compared=3, same=2, baseline_correct=3, kept=2)


def test_kept_is_undefined_when_none_answered_nothing_correctly():
    wrong = logged("DD", [0, 0])
    assert agreement(wrong, wrong).kept_share is None and agreement({}, NONE).same_share is None


# -- the zero-image-token row ---------------------------------------------------------------------------------------


def record(visible, image_tokens=64):
    return {"doc_id": 0, "task": "quiz", "prompt_tokens": 100, "image_tokens": image_tokens, "visible_per_layer": visible,
            "mean_visible": sum(visible) / len(visible), "computed_per_layer": visible}


def test_a_row_sees_no_image_token_when_no_layer_saw_any_of_every_prompts_image_tokens():
    assert sees_no_image_tokens([record([0, 0, 0, 0]), record([0, 0, 0, 0])])
    assert not sees_no_image_tokens([record([0, 0, 0, 0]), record([1, 0, 0, 0])])  # one token seen once
    assert not sees_no_image_tokens([record([0, 0, 0, 0], image_tokens=0)])  # a text-only prompt: nothing to leave out
    assert not sees_no_image_tokens([])


# -- VTC-Bench's split ----------------------------------------------------------------------------------------------


def test_the_split_is_by_the_samples_the_pool_row_answers_correctly():
    # pooling is right on 0, 2, 4 (easy) and wrong on 1, 3 (hard); none is right on 0, 1, 2
    by_none = split(POOL, NONE)
    assert by_none == Split(easy=3, easy_correct=2, hard=2, hard_correct=1)
    assert by_none.easy_accuracy == pytest.approx(2 / 3) and by_none.hard_accuracy == pytest.approx(0.5)
    assert split(POOL, POOL) == Split(3, 3, 2, 0)  # the pool row itself: all easy ones, no hard one
    assert split(POOL, logged("ABA", [1, 1, 0])) == Split(easy=2, easy_correct=1, hard=1, hard_correct=1)  # docs 0-2 only
    assert split(logged("A", [1]), NONE).hard_accuracy is None  # no hard sample


# -- the Pareto frontier --------------------------------------------------------------------------------------------


def test_the_frontier_is_the_points_nothing_cheaper_and_better_dominates_in_cost_order():
    #          0: none     1: dominated  2: cheapest  3: best per cost  4: same cost, worse
    points = [(10.0, 0.9), (8.0, 0.5), (2.0, 0.3), (5.0, 0.8), (5.0, 0.7)]
    assert pareto_front(points) == [2, 3, 0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # identical rows: neither dominates
    assert pareto_front([]) == []


# -- which bench model ran a sweep model's decoder ------------------------------------------------------------------

SHAPE = DecoderShape(hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32)  # the shipped testbed's decoder


def bench_model(shape=SHAPE, image_tokens=64, layers=4, prompts=(120, 130), rows=None):
    """A bench.json model entry whose none row's FLOPs `shape` gives for its prompts."""
    flops = sum(sample_prefill_flops(shape, {"prompt_tokens": n, "image_tokens": image_tokens, "computed_per_layer": [image_tokens] * layers})
                for n in prompts)
    none = {"settings": repr(ReductionSettings()), "computed_per_layer": [image_tokens] * layers, "prefill_flops": flops,
            "prefill_s": {"median": 0.010, "min": 0.009, "max": 0.011}}
    return {"image_tokens": image_tokens, "layers": layers, "batch_size": len(prompts), "prompt_tokens": list(prompts),
            "rows": {"none": none, **(rows or {})}}


def test_a_bench_model_runs_a_sweep_models_decoder_when_its_flops_recount_with_that_shape():
    assert runs_decoder(bench_model(), SHAPE, layers=4, image_tokens=64)
    assert not runs_decoder(bench_model(shape=DecoderShape(128, 512, 4, 2, 32)), SHAPE, 4, 64)  # another MLP width
    assert not runs_decoder(bench_model(), SHAPE, layers=6, image_tokens=64)
    assert not runs_decoder(bench_model(image_tokens=16), SHAPE, layers=4, image_tokens=64)


# -- the leaderboard's sections, from row folders written as a finished sweep leaves them ---------------------------

MODEL = "shipped:shapes-llava"  # its config ships with the package: a FLOP estimate offline
TARGETS = "ABCCB"


def write_row(sweep, name, model_args, responses, visible, task="quiz", metric="exact_match", scores=None, prompts=None):
    """A finished row: provenance.json, lmms-eval's results and samples (one per response, doc_ids 0, 1, ...) and the
    token accounting (`visible` image tokens at each of 4 layers of 64)."""
    row = sweep / name
    output = row / "lmms_eval" / "shipped__shapes-llava"
    output.mkdir(parents=True)
    scores = scores or [float(answer == target) for answer, target in zip(responses, TARGETS)]
    samples = [{"doc_id": doc_id, "target": TARGETS[doc_id], "filtered_resps": answer, "doc_hash": "same for all", metric: score,
                "input": (prompts or {}).get(doc_id, f"question {doc_id}")}
               for doc_id, (answer, score) in enumerate(zip(responses, scores))]
    (output / f"20260101_000000_samples_{task}.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    value = sum(scores) / len(scores)
    (output / "20260101_000000_results.json").write_text(json.dumps({"results": {task: {"alias": task, f"{metric},none": value,
                                                                                          f"{metric}_stderr,none": 0.1}}}))
    (row / "tokens.jsonl").write_text("".join(json.dumps({"doc_id": doc_id, "task": task, "prompt_tokens": 100, "image_tokens": 64,
                                                          "visible_per_layer": [visible] * 4, "mean_visible": float(visible),
                                                          "computed_per_layer": [visible] * 4}) + "\n"
                                              for doc_id in range(len(responses))))
    args = f"pretrained={MODEL},{model_args},token_log={{run_dir}}/tokens.jsonl"
    (row / "provenance.json").write_text(json.dumps({
        "command": ["python", "-m", "lmms_eval", "--model", "llava_simignore", "--model_args", args, "--tasks", task],
        "model": "llava_simignore", "model_args": args, "tasks": task, "git_commit": "0" * 40, "date": "2026-01-01T00:00:00+00:00",
        "wall_s": 1.0, "versions": {"lmms-simignore": "0.1.0", "lmms-eval": "0.7.3", "transformers": "5", "torch": "2"}}))


def read_csv(path):
    with open(path) as handle:
        return {row["row"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def sweep(tmp_path):
    """none, pooling to 16 tokens, Simignore at 8 run on the first 3 docs only, and a row that saw no image token."""
    write_row(tmp_path, "none", "reduction=none", "ABCDA", 64)  # right on 0, 1, 2: 0.6
    write_row(tmp_path, "pool_16", "reduction=pool,keep=16", "ACCDB", 16)  # right on 0, 2, 4: 0.6
    write_row(tmp_path, "simignore_8", "reduction=simignore,keep=8", "ABA", 8)  # right on 0, 1: 2/3
    write_row(tmp_path, "blind", "reduction=random,keep=0", "BBBBB", 0)  # right on 1, 4: 0.4
    return tmp_path


def test_the_leaderboard_gives_each_rows_measures_against_none(sweep):
    write_leaderboard(sweep, echo=lambda line: None)
    rows = read_csv(sweep / "leaderboard.csv")
    assert {name: float(row["relative_accuracy"]) for name, row in rows.items()} == pytest.approx(
        {"none": 100.0, "pool_16": 100.0, "simignore_8": 100 * (2 / 3) / 0.6, "blind": 100 * 0.4 / 0.6})
    assert rows["simignore_8"]["suite_average"] == rows["simignore_8"]["relative_accuracy"] and rows["simignore_8"]["suite_tasks"] == "1/1"
    assert (rows["pool_16"]["compared_samples"], float(rows["pool_16"]["agreement"]), float(rows["pool_16"]["kept"])) == ("5", 0.6, pytest.approx(2 / 3))
    assert (rows["simignore_8"]["compared_samples"], float(rows["simignore_8"]["agreement"])) == ("3", pytest.approx(2 / 3))
    assert {row["zero_image_row"] for row in rows.values()} == {"blind"}
    assert [float(row["image_dependence"]) for row in rows.values()] == pytest.approx([0.6 - 0.4] * 4)
    easy_hard = {name: (float(row["easy_accuracy_pool_16"]), float(row["hard_accuracy_pool_16"])) for name, row in rows.items()}
    assert easy_hard == {"none": (pytest.approx(2 / 3), 0.5), "pool_16": (1.0, 0.0), "simignore_8": (0.5, 1.0),
                         "blind": (pytest.approx(1 / 3), 0.5)}
    # cheapest first: blind (0 tokens), simignore_8 (8 tokens, the best score); pooling and none cost more for less
    assert {name: row["flops_frontier"] for name, row in rows.items()} == {"blind": "True", "simignore_8": "True",
                                                                           "pool_16": "False", "none": "False"}
    markdown = (sweep / "leaderboard.md").read_text()
    assert "| simignore_8 | simignore | 111.1 | 111.1 |" in markdown
    assert "| pool_16 | quiz | 5 | 60.0% (3/5) | 66.7% (2/3) |" in markdown
    assert "| simignore_8 | quiz | 3 | 66.7% (2/3) | 66.7% (2/3) |" in markdown
    assert f"| {MODEL} | quiz | exact_match | 0.6000 | blind | 0.4000 | +0.2000 |" in markdown
    assert "by pool_16 (16 image tokens per layer) on quiz: easy = the 3 samples it answers correctly, hard = the 2 it loses" in markdown
    assert "| simignore_8 | simignore | 0.500 (1/2) | 1.000 (1/1) |" in markdown
    assert "- quiz, mean prefill FLOPs per sample: blind, simignore_8" in markdown
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_none_pool_or_zero_image_rows_the_leaderboard_says_so(tmp_path):
    write_row(tmp_path, "simignore_8", "reduction=simignore,keep=8", "ABA", 8)
    write_row(tmp_path, "random_8", "reduction=random,keep=8", "BBB", 8)
    write_leaderboard(tmp_path, echo=lambda line: None)
    rows = read_csv(tmp_path / "leaderboard.csv")
    assert {(row["relative_accuracy"], row["agreement"], row["image_dependence"]) for row in rows.values()} == {("", "", "")}
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert "| simignore_8 | simignore | - | - |" in markdown
    assert "- no agreement for simignore_8 (quiz): no `none` row" in markdown
    assert f"| {MODEL} | quiz | exact_match | no none row | no zero-image row | - | - |" in markdown
    assert "Downsampling split (VTC-Bench): no `pool` row, no split" in markdown


def test_a_graded_per_sample_score_leaves_kept_and_the_split_out_and_says_why(tmp_path):
    write_row(tmp_path, "none", "reduction=none", "ABC", 64, metric="anls", scores=[1.0, 0.5, 1.0])
    write_row(tmp_path, "pool_16", "reduction=pool,keep=16", "ABD", 16, metric="anls", scores=[1.0, 0.5, 0.0])
    write_leaderboard(tmp_path, echo=lambda line: None)
    rows = read_csv(tmp_path / "leaderboard.csv")
    assert float(rows["pool_16"]["relative_accuracy"]) == pytest.approx(100 * 0.5 / (2.5 / 3))  # the aggregate still compares
    assert float(rows["pool_16"]["agreement"]) == pytest.approx(2 / 3)  # answers A, B are none's; D is not
    assert rows["pool_16"]["kept"] == rows["pool_16"]["easy_accuracy_pool_16"] == ""
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert "| pool_16 | quiz | 3 | 66.7% (2/3) | - |" in markdown
    assert "Downsampling split by pool_16 (quiz): the task's anls does not say per sample whether an answer is right" in markdown


def test_rows_that_ran_other_documents_under_one_task_name_are_refused(tmp_path):
    write_row(tmp_path, "none", "reduction=none", "ABC", 64)
    write_row(tmp_path, "pool_16", "reduction=pool,keep=16", "ABC", 16, prompts={2: "a question of another split"})
    with pytest.raises(ValueError, match="doc_id 2 has different prompts"):
        write_leaderboard(tmp_path, echo=lambda line: None)


# -- measured prefill times from bench.json -------------------------------------------------------------------------


def test_bench_times_go_to_the_rows_run_with_the_same_settings_on_the_same_decoder(sweep):
    pool = {"settings": repr(ReductionSettings(reduction="pool", keep=16)), "prefill_s": {"median": 0.004}}
    other = {"settings": repr(ReductionSettings(reduction="simignore", keep=16)), "prefill_s": {"median": 0.003}}
    report = {"machine": {"cpu_threads": 2}, "settings": {"batch_size": 2},
              "models": {"paper-shaped": bench_model(image_tokens=576, layers=6),
                         "testbed": bench_model(rows={"pool_25": pool, "simignore_drop_25": other})}}
    (sweep / "bench.json").write_text(json.dumps(report))
    write_leaderboard(sweep, echo=lambda line: None, bench=sweep / "bench.json")
    rows = read_csv(sweep / "leaderboard.csv")
    assert {name: row["bench_prefill_s"] for name, row in rows.items()} == {"none": "0.01", "pool_16": "0.004", "simignore_8": "",
                                                                            "blind": ""}
    assert {name: row["time_frontier"] for name, row in rows.items()} == {"none": "False", "pool_16": "True", "simignore_8": "",
                                                                          "blind": ""}
    markdown = (sweep / "leaderboard.md").read_text()
    assert "- quiz, measured LLM prefill (2 of 4 rows measured): pool_16" in markdown
    assert f"the bench model that ran the decoder of {MODEL}: testbed" in markdown


def test_a_bench_of_other_decoders_is_refused_with_what_was_compared(sweep):
    report = {"machine": {"cpu_threads": 2}, "settings": {"batch_size": 2}, "models": {"testbed": bench_model(image_tokens=16)}}
    (sweep / "bench.json").write_text(json.dumps(report))
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "leaderboard", str(sweep), "--bench", str(sweep / "bench.json")],
                               capture_output=True, text=True)
    assert completed.returncode != 0
    assert "no bench model ran the decoder of a sweep model" in completed.stderr
    assert "4 layers, 64 image tokens" in completed.stderr and "testbed: 4 layers, 16 image tokens" in completed.stderr


def test_a_sample_without_the_main_metric_is_scored_by_the_task_s_next_metric_it_has():
    """SEED-Bench gives `seed_image` to image docs only; a video doc is scored by `seed_video`."""
    records = [{"doc_id": 0, "filtered_resps": ["B"], "seed_image": {"pred": "B", "answer": "B"}, "seed_all": {"pred": "B", "answer": "B"}},
               {"doc_id": 1, "filtered_resps": ["C"], "seed_video": {"pred": "C", "answer": "A"}, "seed_all": {"pred": "C", "answer": "A"}}]
    assert [answer.correct for answer in answers(records, "seed_image", ("seed_video", "seed_all")).values()] == [True, False]
    assert answers(records, "seed_image")[1].correct is None
