"""The shipped ScienceQA-IMG recipe: same prompt and scoring as lmms-eval's built-in `scienceqa_img`."""

import subprocess
import sys

import pytest
import yaml

from lmms_simignore.fixtures import scienceqa_like_records
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.tasks_dir import tasks_dir

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
        [sys.executable, "-m", "lmms_simignore", "make-task", "--parquet", str(testbed["data"]), "--name", "my_sqa", "--out", str(tmp_path)],
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
    assert completed.returncode != 0 and "--parquet" in completed.stderr and "no such file" in completed.stderr


def test_lmms_eval_loads_the_local_task_offline(testbed):
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("INFO", include_path=[str(tasks_dir()), str(testbed["tasks"])], include_defaults=False)
    assert manager.all_tasks == ["scienceqa_img_local"]  # the shared template is not a task
    task = get_task_dict(["scienceqa_img_local"], manager)["scienceqa_img_local"]
    docs = list(task.test_docs())
    assert len(docs) == 12 and docs[-1]["image"] is None
    assert docs[0]["image"].size == (48, 48)
    assert task.doc_to_text(docs[0]).endswith("Answer with the option's letter from the given choices directly.")
    assert task.doc_to_target(docs[0]) == "ABCD"[docs[0]["answer"]]
