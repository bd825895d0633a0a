"""The shipped ScienceQA-IMG recipe: same prompt and scoring as lmms-eval's built-in `scienceqa_img`."""

import subprocess
import sys

import pytest
import yaml

from lmms_simignore.shipped import tasks_dir
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.testbed.tiny import scienceqa_like_records

BUILTIN_KWARGS = {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}


def test_prompt_equals_the_builtin_scienceqa_img_prompt():
    builtin = pytest.importorskip("lmms_eval.tasks.scienceqa.utils")
    ours = yaml.safe_load(
        "\n".join(line for line in tasks_dir().joinpath("_scienceqa_img_template.yaml").read_text().splitlines() if "!function" not in line)
    )["lmms_eval_specific_kwargs"]["default"]
    for doc in scienceqa_like_records(num_docs=9, seed=4):
        assert scienceqa_utils.doc_to_text(doc, ours) == builtin.sqa_doc_to_text(doc, BUILTIN_KWARGS)
        assert scienceqa_utils.doc_to_target(doc) == builtin.sqa_doc_to_target(doc)


@pytest.mark.parametrize(
    "reply, letter",
    [("B", "B"), (" b ", "B"), ("B. blue", "B"), ("The answer is B.", None), ("blue", None), ("", None), ("BC", None)],
)
def test_answer_parsing(reply, letter):
    assert scienceqa_utils.parse_letter(reply) == letter


def test_scoring_equals_the_builtin_scoring():
    builtin = pytest.importorskip("lmms_eval.tasks.scienceqa.utils")
    doc = scienceqa_like_records(num_docs=1, seed=0)[0]
    target = scienceqa_utils.doc_to_target(doc)
    for reply in [target, target.lower(), f"{target}. x", "Z", "Z. x", "I think " + target, ""]:
        assert scienceqa_utils.process_results(doc, [reply]) == builtin.sqa_process_results(doc, [reply])


def test_text_only_docs_have_no_visual():
    doc = scienceqa_like_records(num_docs=3, seed=0, with_text_only=1)[-1]
    assert doc["image"] is None and scienceqa_utils.doc_to_visual(doc) == []


def test_make_task_writes_a_yaml_that_names_the_parquet(tmp_path, testbed):
    out = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "make-task", "--data", str(testbed["data"]), "--name", "my_sqa", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    config = yaml.safe_load(open(out))
    assert config["task"] == "my_sqa"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(testbed["data"].resolve())
    assert config["include"].endswith("_scienceqa_img_template.yaml")


def test_make_task_refuses_a_missing_parquet(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "make-task", "--parquet", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert completed.returncode != 0 and "--data" in completed.stderr and "no such file" in completed.stderr


def test_lmms_eval_loads_the_local_task_offline(testbed):
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("INFO", include_path=[str(tasks_dir()), str(testbed["tasks"])], include_defaults=False)
    assert sorted(manager.all_tasks) == ["scienceqa_img_llava", "scienceqa_img_local"]  # the shared templates are not tasks
    task = get_task_dict(["scienceqa_img_local"], manager)["scienceqa_img_local"]
    docs = list(task.test_docs())
    assert len(docs) == 12 and docs[-1]["image"] is None
    assert docs[0]["image"].size == (48, 48)
    assert task.doc_to_text(docs[0]).endswith("Answer with the option's letter from the given choices directly.")
    assert task.doc_to_target(docs[0]) == "ABCD"[docs[0]["answer"]]


# -- LLaVA-1.5's official protocol (scienceqa_img_llava) ----------------------------------------------

# The chat template llava-hf/llava-1.5-*-hf processors ship: a system message is written as plain text.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_llava_protocol_prompt_is_the_vicuna_v1_conversation_through_the_llava_hf_template():
    import jinja2

    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
    for doc in scienceqa_like_records(num_docs=4, seed=2, with_text_only=1):
        messages = scienceqa_utils.doc_to_messages_llava(doc, kwargs)
        rendered = jinja2.Template(LLAVA_HF_TEMPLATE).render(messages=messages, add_generation_prompt=True)
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCDE", doc["choices"]))
        question = f"{context}{doc['question']}\n{options}\nAnswer with the option's letter from the given choices directly."
        image = "<image>\n" if doc["image"] is not None else ""  # the last doc is text-only
        assert rendered == f"{VICUNA_SYSTEM} USER: {image}{question} ASSISTANT:"
        assert [part["url"] for part in messages[1]["content"] if part["type"] == "image"] == scienceqa_utils.doc_to_visual(doc)


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"), (" B\n", "B"), ("E", "E"),
        ("F", None),  # LLaVA accepts A-E only
        ("b", None),  # case-sensitive
        ("B. blue", "B"), ("B.blue", None),  # "X. " needs the space
        ("The answer is C.", "C"), ("Because of x. The answer is C.", "C"),
        ("The answer is C. The answer is D.", None),  # more than one answer sentence
        ("The answer is C", None),  # the sentence needs a character after the letter
        ("blue", None), ("", None),
    ],
)
def test_llava_answer_parsing(reply, letter):
    assert scienceqa_utils.parse_letter_llava(reply) == letter


def test_llava_scoring_compares_the_parsed_letter_with_the_target():
    doc = scienceqa_like_records(num_docs=1, seed=0)[0]
    target = scienceqa_utils.doc_to_target(doc)
    wrong = next(letter for letter in "ABCD" if letter != target)
    assert scienceqa_utils.process_results_llava(doc, [f"The answer is {target}."]) == {"exact_match": 1.0}
    assert scienceqa_utils.process_results_llava(doc, [f"{target}. something"]) == {"exact_match": 1.0}
    assert scienceqa_utils.process_results_llava(doc, [wrong]) == {"exact_match": 0.0}
    assert scienceqa_utils.process_results_llava(doc, [target.lower()]) == {"exact_match": 0.0}


def test_shipped_llava_task_reads_the_builtin_data_with_the_llava_recipe():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("INFO", include_path=[str(tasks_dir())], include_defaults=False)
    assert manager.all_tasks == ["scienceqa_img_llava"]
    config = yaml.safe_load("\n".join(line for line in tasks_dir().joinpath("scienceqa_img_llava.yaml").read_text().splitlines()))
    assert (config["dataset_path"], config["dataset_name"]) == ("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG")
    assert config["include"] == "_scienceqa_img_llava_template.yaml"


def save_to_disk_copy(testbed, folder, as_dict=True):
    from datasets import DatasetDict, load_dataset

    dataset = load_dataset("parquet", data_files={"test": str(testbed["data"])})["test"]
    (DatasetDict({"test": dataset}) if as_dict else dataset).save_to_disk(str(folder))
    return folder


def test_make_task_llava_protocol_on_a_save_to_disk_copy_loads_offline(testbed, tmp_path):
    from lmms_eval.tasks import TaskManager, get_task_dict

    data = save_to_disk_copy(testbed, tmp_path / "sqa_disk")
    out = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "make-task", "--data", str(data), "--protocol", "llava", "--out", str(tmp_path / "tasks")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    config = yaml.safe_load(open(out))
    assert config["task"] == "scienceqa_img_llava_local"
    assert config["dataset_kwargs"] == {"load_from_disk": True} and config["dataset_path"] == str(data.resolve())
    manager = TaskManager("INFO", include_path=[str(tmp_path / "tasks")], include_defaults=False)
    task = get_task_dict(["scienceqa_img_llava_local"], manager, task_type="chat")["scienceqa_img_llava_local"]
    docs = list(task.test_docs())
    assert len(docs) == 12
    messages = task.doc_to_messages(docs[0])
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": VICUNA_SYSTEM}]}
    assert task.config.generation_kwargs["max_new_tokens"] == 1024
    assert task.config.generation_kwargs["image_aspect_ratio"] == "pad"  # the official evaluation squares each image


def test_make_task_refuses_a_save_to_disk_folder_without_a_test_split(testbed, tmp_path):
    data = save_to_disk_copy(testbed, tmp_path / "single", as_dict=False)
    completed = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "make-task", "--data", str(data), "--out", str(tmp_path / "tasks")],
        capture_output=True, text=True,
    )
    assert completed.returncode != 0
    assert "--data" in completed.stderr and "DatasetDict with a `test` split" in completed.stderr
