"""End to end through the real `lmms-eval` CLI (subprocesses), on the offline testbed."""

import re
import sys

import pytest

from lmms_simignore.evaluation.runs import EvalRun, LmmsEvalFailed, argument_changes, read_samples, reuse_state, run_lmms_eval

TASK = "scienceqa_img_local"


def evaluate(testbed, output_dir, model_args, model="llava_simignore", extra_args=(), launcher=(), batch_size=1):
    run = EvalRun(
        name=output_dir.name,
        model=model,
        model_args=f"pretrained={testbed['model']},{model_args}".rstrip(","),
        tasks=TASK,
        include_path=testbed["tasks"],
        output_dir=output_dir,
        batch_size=batch_size,
        extra_args=tuple(extra_args),
        launcher=tuple(launcher),
    )
    results = run_lmms_eval(run, timeout=600)
    return results, read_samples(output_dir, TASK)


def cut(text, stops=("\n\n",)):
    for stop in stops:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("path_flags", [(), ("--force_simple",)], ids=["chat", "simple"])
def test_reduction_none_answers_exactly_like_the_builtin_llava_hf(testbed, tmp_path, path_flags):
    """Same prompts, same greedy answers on the 11 docs with an image (the built-in crashes on the text-only
    doc 11). The built-in ignores the task's stop string "\\n\\n"; we honour it, so its answers are cut there."""
    flags = (*path_flags, "--limit", "11")
    ours, our_samples = evaluate(testbed, tmp_path / "ours", "reduction=none", extra_args=flags)
    theirs, their_samples = evaluate(testbed, tmp_path / "builtin", "device=cpu,device_map=cpu", model="llava_hf", extra_args=flags)
    expected_class = "LlavaSimignore" if path_flags else "LlavaSimignoreChat"
    assert ours["config"]["model_backend"].startswith(f"lmms_simignore.models.llava_simignore.{expected_class} ")
    assert [s["doc_id"] for s in our_samples] == list(range(11))
    assert [s["input"] for s in our_samples] == [s["input"] for s in their_samples]
    assert [s["filtered_resps"] for s in our_samples] == [cut(s["filtered_resps"]) for s in their_samples]


LAUNCHERS = {
    "torchrun": ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"),
    "accelerate": ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29518"),
}


@pytest.fixture(scope="module")
def one_process_run(testbed, tmp_path_factory):
    return evaluate(testbed, tmp_path_factory.mktemp("one") / "run", "reduction=simignore,keep=10,apply=drop", batch_size=2)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_evaluate_every_doc_once_with_the_one_process_score(testbed, tmp_path, one_process_run, launcher):
    single, single_samples = one_process_run
    launch = (sys.executable, *LAUNCHERS[launcher])
    double, double_samples = evaluate(testbed, tmp_path / "two", "reduction=simignore,keep=10,apply=drop", launcher=launch, batch_size=2)
    assert [s["doc_id"] for s in double_samples] == list(range(12))
    assert [s["filtered_resps"] for s in double_samples] == [s["filtered_resps"] for s in single_samples]
    assert double["results"][TASK]["exact_match,none"] == single["results"][TASK]["exact_match,none"]
    log = (tmp_path / "two" / "lmms_eval.log").read_text()
    assert "Running on rank 1 (local rank 1)" in log
    shards = re.findall(r"token accounting: (\d+)/(\d+) samples", log)
    assert sorted(int(total) for _, total in shards) == [6, 6]  # each process answered half of the docs


def test_a_failed_run_raises_with_the_first_error_line_instead_of_reporting_nothing(testbed, tmp_path):
    with pytest.raises(LmmsEvalFailed) as failure:
        evaluate(testbed, tmp_path / "bad", "reduction=simignore,keep=999")
    assert failure.value.first_error == "ValueError: keep=999 exceeds the model's 25 image tokens per image"
    assert str(failure.value).startswith(f"lmms-eval run 'bad' failed: {failure.value.first_error}\n  command: ")
    assert failure.value.log_path.is_file() and not (tmp_path / "bad").exists()


def test_a_finished_run_is_not_run_again(testbed, tmp_path):
    results, _ = evaluate(testbed, tmp_path / "done", "reduction=simignore,ignore=5")
    (tmp_path / "done" / "marker").write_text("still here")
    again, _ = evaluate(testbed, tmp_path / "done", "reduction=simignore,ignore=5")
    assert again == results and (tmp_path / "done" / "marker").exists()


def test_a_finished_run_whose_arguments_changed_is_run_again(testbed, tmp_path):
    """An edited row (here: a model_arg and --limit) must not be answered with the old row's results."""
    first, first_samples = evaluate(testbed, tmp_path / "row", "reduction=simignore,ignore=5", extra_args=("--limit", "3"))
    edited = EvalRun(name="row", model_args=f"pretrained={testbed['model']},reduction=simignore,ignore=20", tasks=TASK,
                     include_path=testbed["tasks"], output_dir=tmp_path / "row", extra_args=("--limit", "4"))
    assert reuse_state(edited) == ("changed", ["--limit: 3 -> 4", "model_args ignore: 5 -> 20"])
    again = run_lmms_eval(edited, timeout=600)
    assert "ignore=20" in again["config"]["model_args"] and len(read_samples(tmp_path / "row", TASK)) == 4
    assert reuse_state(edited) == ("finished", [])


def test_argument_changes_name_each_flag_and_model_arg():
    old = ["--model", "m", "--model_args", "a=1,b=2", "--tasks", "t", "--log_samples"]
    new = ["--model", "m", "--model_args", "a=1,b=3,c=4", "--tasks", "u", "--limit", "2"]
    assert argument_changes(old, new) == [
        "--limit: (none) -> 2", "--log_samples: (set) -> (none)", "model_args b: 2 -> 3", "model_args c: (none) -> 4", "--tasks: t -> u",
    ]


def test_the_results_file_is_lmms_eval_s_not_a_task_s_file_of_the_same_name(tmp_path):
    """MMBench's scorer writes submissions/mmbench_en_dev_static_results.json, before (and whether or not) lmms-eval
    writes its own results: a run that failed after it must not read as finished."""
    import json
    import os

    from lmms_simignore.evaluation.runs import find_results

    (tmp_path / "submissions").mkdir()
    scorer = tmp_path / "submissions" / "mmbench_en_dev_static_results.json"
    scorer.write_text(json.dumps({"overall_acc": 0.0, "category_acc": {}}))
    assert find_results(tmp_path) is None
    (tmp_path / "model").mkdir()
    ours = tmp_path / "model" / "20261207_151155_results.json"
    ours.write_text(json.dumps({"results": {"mmbench_en_dev_static": {}}, "config": {}}))
    os.utime(scorer, (ours.stat().st_mtime + 10,) * 2)  # newer than lmms-eval's file
    assert find_results(tmp_path) == ours
