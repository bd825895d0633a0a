"""The Qwen-VL classes end to end through the real `lmms-eval` CLI (subprocesses): registered under their names, and
`reduction=none` answering as lmms-eval's own class of the same family on the offline ScienceQA-shaped task."""

import re
import sys

import pytest
from test_lmms_eval_cli import LAUNCHERS, TASK

from lmms_simignore.evaluation.runs import EvalRun, read_samples, run_lmms_eval

pytest.importorskip("torchvision")  # transformers' Qwen-VL processors need it

CLASSES = {"qwen2_vl": "Qwen2VLSimignore", "qwen2_5_vl": "Qwen2_5_VLSimignoreChat", "qwen3_vl": "Qwen3VLSimignoreChat"}


def evaluate(folder, tasks, output_dir, model, model_args="", extra_args=(), launcher=(), batch_size=1):
    run = EvalRun(name=output_dir.name, model=model, model_args=f"pretrained={folder},{model_args}".rstrip(","), tasks=TASK,
                  include_path=tasks, output_dir=output_dir, batch_size=batch_size, extra_args=tuple(extra_args),
                  launcher=tuple(launcher))
    return run_lmms_eval(run, timeout=600), read_samples(output_dir, TASK)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_reduction_none_answers_as_lmms_eval_s_own_class_through_the_cli(qwen_folders, testbed, tmp_path, family):
    """`--model qwen2_5_vl_simignore` runs our chat class as `--model qwen2_5_vl` runs lmms-eval's (Qwen2-VL: simple)."""
    flags = ("--limit", "4")
    ours, our_samples = evaluate(qwen_folders[family], testbed["tasks"], tmp_path / "ours", f"{family}_simignore",
                                 "reduction=none", extra_args=flags)
    theirs, their_samples = evaluate(qwen_folders[family], testbed["tasks"], tmp_path / "builtin", family,
                                     "device=cpu,device_map=cpu", extra_args=flags)
    assert ours["config"]["model_backend"].startswith(f"lmms_simignore.models.qwen_vl_simignore.{CLASSES[family]} ")
    assert [s["doc_id"] for s in our_samples] == list(range(4))
    assert [s["filtered_resps"] for s in our_samples] == [s["filtered_resps"] for s in their_samples]
    assert ours["results"][TASK]["exact_match,none"] == theirs["results"][TASK]["exact_match,none"]


def test_two_processes_answer_every_doc_once_as_one_process_does(qwen_folders, testbed, tmp_path):
    args = "reduction=pool,keep=0.25,dtype=float32,min_pixels=3136,max_pixels=50176"
    single, single_samples = evaluate(qwen_folders["qwen2_5_vl"], testbed["tasks"], tmp_path / "one", "qwen2_5_vl_simignore",
                                      args, batch_size=2)
    launch = (sys.executable, *LAUNCHERS["torchrun"])
    double, double_samples = evaluate(qwen_folders["qwen2_5_vl"], testbed["tasks"], tmp_path / "two", "qwen2_5_vl_simignore",
                                      args, launcher=launch, batch_size=2)
    assert [s["doc_id"] for s in double_samples] == list(range(12))
    assert [s["filtered_resps"] for s in double_samples] == [s["filtered_resps"] for s in single_samples]
    assert double["results"][TASK]["exact_match,none"] == single["results"][TASK]["exact_match,none"]
    shards = re.findall(r"token accounting: (\d+)/(\d+) samples", (tmp_path / "two" / "lmms_eval.log").read_text())
    assert sorted(int(total) for _, total in shards) == [6, 6]  # each process answered half of the docs
