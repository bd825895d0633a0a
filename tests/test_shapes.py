"""The shapes benchmark generator and its lmms-eval task."""

import pytest

from lmms_simignore.testbed import scenes, shapes


def test_same_seed_same_questions_and_pixels():
    first, again = shapes.shapes_records(30, seed=5), shapes.shapes_records(30, seed=5)
    assert [r["question"] for r in first] == [r["question"] for r in again]
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(first, again))
    assert [r["question"] for r in shapes.shapes_records(30, seed=6)] != [r["question"] for r in first]


def test_question_types_come_in_turn_with_their_fixed_options():
    records = shapes.shapes_records(10, seed=0)
    assert [r["question_type"] for r in records] == list(shapes.QUESTION_TYPES) * 2
    for record in records:
        assert record["choices"] == list(shapes.OPTIONS[record["question_type"]])
        assert 0 <= record["answer"] < len(record["choices"])
        assert record["image"].size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_answers_follow_from_the_scene():
    for record in shapes.shapes_records(200, seed=1):
        objects = [scenes.PlacedObject(**obj) for obj in record["objects"]]
        answer = record["choices"][record["answer"]]
        question = record["question"]
        assert record["num_objects"] == len(objects)
        if record["question_type"] == "count":
            assert answer == str(len(objects))
        elif record["question_type"] == "colour":
            shape = question.removeprefix("What colour is the ").removesuffix("?")
            assert [obj.colour for obj in objects if obj.shape == shape] == [answer]
        elif record["question_type"] == "shape":
            colour = question.removeprefix("What shape is the ").removesuffix(" object?")
            assert [obj.shape for obj in objects if obj.colour == colour] == [answer]
        elif record["question_type"] == "exists":
            name = question.removeprefix("Is there a ").removesuffix("?")
            assert (answer == "yes") == any(obj.name == name for obj in objects)
        else:
            first, second = question.removeprefix("Is the ").removesuffix("?").split(" left of the ")
            a, b = (next(obj for obj in objects if obj.name == name) for name in (first, second))
            assert abs(a.centre_x - b.centre_x) >= scenes.MIN_GAP
            assert (answer == "yes") == (a.centre_x < b.centre_x)


@pytest.mark.parametrize("kwargs, message", [({"max_objects": 7}, "max_objects"), ({"question_types": ("size",)}, "question types")])
def test_bad_generator_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes.shapes_records(3, seed=0, **kwargs)


# -- the lmms-eval task ----------------------------------------------------------------------------------


def test_scoring_breaks_accuracy_down_by_type_and_object_count():
    import importlib

    utils = importlib.import_module("lmms_simignore.tasks.shapes_utils")
    doc = {"choices": list(shapes.COLOURS), "answer": 2, "question_type": "colour", "num_objects": 3}
    assert utils.process_results(doc, ["C"]) == {"exact_match": 1.0, "acc_colour": 1.0, "acc_objects_3": 1.0}
    assert utils.process_results(doc, ["blue"]) == {"exact_match": 0.0, "acc_colour": 0.0, "acc_objects_3": 0.0}


@pytest.fixture(scope="module")
def shapes_task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes_task")
    shapes.write_shapes_task(directory, num_questions=40, seed=1)
    return directory


def test_lmms_eval_loads_the_generated_shapes_task_offline(shapes_task_dir):
    from lmms_eval.tasks import TaskManager, get_task_dict

    from lmms_simignore.shipped import tasks_dir

    manager = TaskManager("INFO", include_path=[str(tasks_dir()), str(shapes_task_dir)], include_defaults=False)
    assert "shapes_local" in manager.all_tasks
    task = get_task_dict(["shapes_local"], manager)["shapes_local"]
    docs = list(task.test_docs())
    expected = shapes.shapes_records(40, seed=1)
    assert [d["question"] for d in docs] == [r["question"] for r in expected]
    assert docs[0]["image"].tobytes() == expected[0]["image"].tobytes()  # PNG round trip is lossless
    assert task.doc_to_text(docs[0]).startswith(f"{expected[0]['question']}\nA. red\nB. green")


def test_the_held_out_task_a_user_writes_is_the_one_the_main_job_evaluates(tmp_path):
    """`shapes-task --held-out` (for a hand-typed `lmms-eval --tasks shapes_heldout`) and the demo's own split."""
    import subprocess
    import sys

    import pandas

    from lmms_simignore.evaluation.demo import TASK, demo_config
    from lmms_simignore.evaluation.sweep import _shapes_task_dir

    subprocess.run([sys.executable, "-m", "lmms_simignore", "shapes-task", "--held-out", "--num-questions", "6", "--out",
                    str(tmp_path / "user")], check=True, capture_output=True, timeout=300)
    _shapes_task_dir(demo_config(6).shapes_task, tmp_path / "demo", write=True)
    for folder in ("user", "demo"):
        assert (tmp_path / folder / f"{TASK}.yaml").is_file()
    user, demo = (pandas.read_parquet(next((tmp_path / folder / "data").glob("*.parquet"))) for folder in ("user", "demo"))
    assert user.drop(columns="image").equals(demo.drop(columns="image"))
    assert list(user["image"].map(lambda image: image["bytes"])) == list(demo["image"].map(lambda image: image["bytes"]))
