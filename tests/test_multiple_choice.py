"""Multiple-choice (log-likelihood) tasks through lmms-eval's real evaluator: each option's loss survives lmms-eval's
post-processing, the task is built on the simple path for our chat class too, and the metric is the share of docs
whose correct option has the least mean negative log-likelihood, recomputed with transformers' own forward."""

import pytest
import torch

from lmms_simignore.evaluation.runs import EvalRun, read_samples, run_lmms_eval
from lmms_simignore.local_data import read_task_config
from lmms_simignore.models.base import LoglikelihoodResult

TASK = "shapes_mc_mc"
QUESTIONS = 12


def test_a_loglikelihood_result_reaches_the_task_as_the_pair_it_carries():
    from lmms_eval.api.instance import unwrap_generation_output

    result = LoglikelihoodResult((0.25, True))
    assert unwrap_generation_output(result) == ((0.25, True), None)
    assert unwrap_generation_output((0.25, True)) == ("(0.25, True)", None)  # why the pair travels in a result
    loss, greedy = result
    assert (loss, greedy, result[0]) == (0.25, True, 0.25)


def option_losses(model, processor, doc, context: str) -> list[float]:
    """Each option letter's mean negative log-likelihood right after LLaVA's simple prompt (lmms-eval's `llava_hf`:
    the image placeholder, a newline and the context as the user turn), from one transformers forward per option."""
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{context}"}], tokenize=False,
                                                     add_generation_prompt=True)
    image = doc["image"].convert("RGB")
    prompt_length = processor(images=image, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    losses = []
    for letter in "ABCDEF"[: len(doc["choices"])]:
        full = processor(images=image, text=[prompt + letter], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**full).logits[0, prompt_length - 1 : -1].float()
        target = full["input_ids"][0, prompt_length:]
        losses.append(-float(torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()))
    return losses


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    """`--model llava_simignore` (the chat class) on the shipped model, a multiple-choice shapes task."""
    from lmms_simignore.testbed.shapes import write_shapes_task

    folder = tmp_path_factory.mktemp("mc")
    write_shapes_task(folder / "tasks", num_questions=QUESTIONS, seed=7, task_name="shapes_mc", multiple_choice=True)
    run = EvalRun(name="mc", model="llava_simignore", model_args="pretrained=shipped:shapes-llava,reduction=none",
                  tasks=TASK, include_path=folder / "tasks", output_dir=folder / "run", batch_size=1)
    results = run_lmms_eval(run, timeout=600)
    return folder, results, read_samples(folder / "run", TASK)


def test_a_multiple_choice_task_scores_the_option_of_least_loss_through_lmms_eval(mc_run):
    from datasets import load_dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_simignore.shipped import resolve_pretrained

    folder, results, samples = mc_run
    assert results["config"]["model_backend"].startswith("lmms_simignore.models.llava_simignore.LlavaSimignoreChat ")
    data_files = read_task_config(folder / "tasks" / f"{TASK}.yaml")["dataset_kwargs"]["data_files"]
    docs = load_dataset("parquet", data_files=data_files)["test"]
    path = resolve_pretrained("shipped:shapes-llava")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert [sample["doc_id"] for sample in samples] == list(range(QUESTIONS))
    correct = []
    for sample in samples:
        doc = docs[sample["doc_id"]]
        expected = option_losses(model, processor, doc, sample["input"])
        logged = [float(loss) for loss, _ in sample["filtered_resps"]]
        assert logged == pytest.approx(expected, rel=1e-3, abs=1e-5)
        correct.append(float(min(range(len(expected)), key=expected.__getitem__) == doc["answer"]))
        assert sample["acc"] == correct[-1]
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert sum(correct) >= QUESTIONS - 2  # the shipped model answers these (a loss taken as a log-probability: ~0)
