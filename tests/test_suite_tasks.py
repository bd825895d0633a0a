"""The suite's synthetic local data through lmms-eval's real built-in task definitions, offline: each task reads the
synthetic docs as its test split, shows the images and the question, and its own `process_results` and aggregations
give the top score to correct replies and the bottom score to wrong ones."""

import inspect
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
from PIL import Image

from lmms_simignore.local_data import MULTIPLE_CHOICE_CLASS, read_task_config, write_builtin_local_task
from lmms_simignore.testbed.scenes import IMAGE_SIZE
from lmms_simignore.testbed.suite_data import (
    CIRCULAR, SUITE_TASKS, correct_reply, features, suite_docs, write_suite_data, wrong_reply,
)

DOCS = 4  # per task: MME's two question pairs are one perception and one cognition category

# Each task's aggregated metrics on all-correct replies (None: a submission file written, no score) ...
TOP = {
    "gqa": {"exact_match": 1.0},
    "mmbench_en_dev_static": {"gpt_eval_score": 100.0, "submission": None},
    "mme": {"mme_perception_score": 200.0, "mme_cognition_score": 200.0},  # per category: accuracy + accuracy+
    "pope": {
        "pope_accuracy": 1.0, "pope_precision": 1.0, "pope_recall": 1.0, "pope_f1_score": 1.0, "pope_yes_ratio": 0.5,
    },
    "scienceqa_img": {"exact_match": 1.0},
    "textvqa_val": {"exact_match": 1.0, "submission": None},
    "vqav2_val": {"exact_match": 1.0},
    "seedbench": {"seed_image": 1.0, "seed_video": 1.0, "seed_all": 1.0},
    "seedbench_ppl": {"acc": 1.0},
    "mmmu_val": {"mmmu_acc": 1.0},
    "ocrbench": {"ocrbench_accuracy": DOCS / 1000},  # hits out of OCRBench's 1000 questions
    "chartqa": {"relaxed_overall": 1.0, "relaxed_human_split": 1.0, "relaxed_augmented_split": 1.0},
}
# ... and on all-wrong replies (POPE's yes ratio is the share of yes among the true answers).
BOTTOM = {
    task: {metric: None if score is None else 0.0 for metric, score in scores.items()} for task, scores in TOP.items()
}
BOTTOM["pope"]["pope_yes_ratio"] = 0.5

GENERATION_TASKS = [task for task in SUITE_TASKS if task != "seedbench_ppl"]
IMAGES_PER_DOC = {"seedbench": {1, 3}, "seedbench_ppl": {1, 3}, "mmmu_val": {1, 2}}  # video frames; <image 2>


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The suite's data, a derived local task per suite task, and those tasks loaded by lmms-eval (simple kind)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path_factory.mktemp("suite")
    data = write_suite_data(folder / "data", docs_per_task=DOCS, seed=0)
    for task, parquet in data.items():
        write_builtin_local_task(folder / "tasks", task, parquet)
    manager = TaskManager("ERROR", include_path=[str(folder / "tasks")], include_defaults=False)
    tasks = get_task_dict([f"{task}_local" for task in SUITE_TASKS], manager)
    return SimpleNamespace(folder=folder, data=data, manager=manager, tasks=tasks)


@pytest.fixture(scope="module")
def chat_tasks(suite):
    """The same local tasks as lmms-eval builds them for a chat model class."""
    from lmms_eval.tasks import get_task_dict

    return get_task_dict([f"{task}_local" for task in SUITE_TASKS], suite.manager, task_type="chat")


@pytest.fixture
def fresh_ocrbench_counts(suite, monkeypatch):
    """OCRBench's aggregation adds its hits to counts its utils module keeps: each test starts from zero."""
    module = suite.tasks["ocrbench_local"].aggregation()["ocrbench_accuracy"].__globals__
    monkeypatch.setitem(module, "OCRBench_score", dict.fromkeys(module["OCRBench_score"], 0))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def question_words(doc: dict) -> set[str]:
    """The words of the doc's question up to its question mark (MME's prompts drop its "Please answer yes or no."),
    image placeholders left out (MMMU's chat messages put the images in their place)."""
    return words(re.sub(r"<image \d+>", "", doc["question"].split("?")[0]))


def model_results(task, doc, reply) -> list:
    """What lmms-eval hands `process_results` for one doc: the generated text, or for a multiple-choice task one
    (loss, is_greedy) pair per option, the least loss on the option numbered `reply`."""
    if task.OUTPUT_TYPE == "multiple_choice":
        return [(0.5, True) if option == reply else (2.0, False) for option in range(len(task.doc_to_choice(doc)))]
    return [reply]


def aggregate(task, name: str, reply_for, output_path) -> dict:
    """The task's aggregated metrics over its test docs, one reply per doc, as lmms-eval's evaluator computes them."""
    items = defaultdict(list)
    for doc in task.test_docs():
        for metric, value in task.process_results(doc, model_results(task, doc, reply_for(name, doc))).items():
            items[metric].append(value)
    scores = {}
    for metric, values in items.items():
        aggregation = task.aggregation().get(metric)  # a metric of no aggregation is logged only
        if aggregation is None:
            continue
        if "args" in inspect.signature(aggregation).parameters:  # writes its files under args.output_path
            scores[metric] = aggregation(values, args=SimpleNamespace(output_path=str(output_path)))
        else:
            scores[metric] = aggregation(values)
    return scores


def test_the_suite_data_is_a_function_of_the_seed(tmp_path):
    written = [write_suite_data(tmp_path / folder, 2, seed=seed) for folder, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert list(written[0]) == list(SUITE_TASKS)
    contents = [[files[task].read_bytes() for task in SUITE_TASKS] for files in written]
    assert contents[0] == contents[1]
    assert all(same != other for same, other in zip(contents[0], contents[2]))


def test_docs_come_in_pairs():
    with pytest.raises(ValueError, match="even"):
        suite_docs("mme", 3)


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_the_local_task_reads_the_synthetic_docs_in_the_hub_schema(suite, name):
    task = suite.tasks[f"{name}_local"]
    assert task.dataset[task.config.test_split].features == features(name)
    docs = list(task.test_docs())
    assert [doc["question"] for doc in docs] == [doc["question"] for doc in suite_docs(name, DOCS, seed=0)]


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_doc_to_visual_gives_the_docs_images(suite, name):
    task = suite.tasks[f"{name}_local"]
    counts = set()
    for doc in task.test_docs():
        visuals = task.doc_to_visual(doc)
        assert all(isinstance(image, Image.Image) and image.size == (IMAGE_SIZE, IMAGE_SIZE) for image in visuals)
        counts.add(len(visuals))
    assert counts == IMAGES_PER_DOC.get(name, {1})


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_the_prompt_asks_the_question(suite, name):
    task = suite.tasks[f"{name}_local"]
    for doc in task.test_docs():
        assert question_words(doc) <= words(task.doc_to_text(doc))


@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_a_chat_model_gets_the_images_and_every_word_of_the_question(chat_tasks, name):
    task = chat_tasks[f"{name}_local"]
    for doc in task.test_docs():
        parts = [part for message in task.doc_to_messages(doc) for part in message["content"]]
        images = [part["url"] for part in parts if part["type"] == "image"]
        text = " ".join(part["text"] for part in parts if part["type"] == "text")
        assert len(images) == len(task.doc_to_visual(doc)) and all(isinstance(image, Image.Image) for image in images)
        assert question_words(doc) <= words(text)


@pytest.mark.usefixtures("fresh_ocrbench_counts")
@pytest.mark.parametrize("reply_for, expected", [(correct_reply, TOP), (wrong_reply, BOTTOM)], ids=["correct", "wrong"])
@pytest.mark.parametrize("name", SUITE_TASKS)
def test_the_task_scores_correct_replies_top_and_wrong_ones_bottom(suite, name, reply_for, expected, tmp_path):
    scores = aggregate(suite.tasks[f"{name}_local"], name, reply_for, tmp_path)
    assert scores == pytest.approx(expected[name])


def test_mmbench_counts_a_question_only_when_each_circular_copy_is_answered_right(suite, tmp_path):
    def right_but_on_copies(name, doc):
        return (wrong_reply if doc["index"] >= CIRCULAR else correct_reply)(name, doc)

    task = suite.tasks["mmbench_en_dev_static_local"]
    assert aggregate(task, "mmbench_en_dev_static", right_but_on_copies, tmp_path)["gpt_eval_score"] == 0.0


def test_mme_scores_a_category_by_accuracy_plus_pairs_answered_right_both_times(suite, tmp_path):
    def right_on_yes_only(name, doc):
        return (correct_reply if doc["answer"] == "Yes" else wrong_reply)(name, doc)

    scores = aggregate(suite.tasks["mme_local"], "mme", right_on_yes_only, tmp_path)
    assert scores == {"mme_perception_score": 50.0, "mme_cognition_score": 50.0}  # 50 % + no pair right


@pytest.mark.usefixtures("fresh_ocrbench_counts")
def test_ocrbench_aggregation_counts_the_hits_of_every_earlier_aggregation_of_the_task(suite, tmp_path):
    task = suite.tasks["ocrbench_local"]
    first = aggregate(task, "ocrbench", correct_reply, tmp_path)["ocrbench_accuracy"]
    assert aggregate(task, "ocrbench", correct_reply, tmp_path)["ocrbench_accuracy"] == pytest.approx(2 * first)


def test_seedbench_ppl_scores_the_option_text_of_the_answer_letter(suite):
    task = suite.tasks["seedbench_ppl_local"]
    for doc in task.test_docs():
        choices = task.doc_to_choice(doc)
        assert choices == [doc[f"choice_{letter}"] for letter in "abcd"]
        assert choices[correct_reply("seedbench_ppl", doc)] == task.doc_to_target(doc)


def test_the_multiple_choice_copy_is_a_simple_task_for_chat_models_too(suite, chat_tasks):
    from lmms_eval.api.task import ConfigurableMessagesTask

    config = read_task_config(suite.folder / "tasks" / "seedbench_ppl_local.yaml")
    assert config["class"].value == MULTIPLE_CHOICE_CLASS
    assert type(chat_tasks["seedbench_ppl_local"]).__name__ == "MultipleChoiceTask"
    assert not isinstance(chat_tasks["seedbench_ppl_local"], ConfigurableMessagesTask)
    assert isinstance(chat_tasks["seedbench_local"], ConfigurableMessagesTask)  # a generation task: the chat kind
    assert not isinstance(suite.tasks["seedbench_local"], ConfigurableMessagesTask)
