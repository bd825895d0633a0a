"""The shapes benchmark generator, and the small LLaVA trained on it that ships with the package."""

from pathlib import Path

import pytest

from lmms_simignore import shapes

SHIPPED_MODEL = Path(shapes.__file__).parent / "testbed" / "shapes-llava"


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
        assert record["image"].size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_answers_follow_from_the_scene():
    for record in shapes.shapes_records(200, seed=1):
        objects = [shapes.ShapeObject(**obj) for obj in record["objects"]]
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
            assert (answer == "yes") == (a.column < b.column)


def test_objects_are_drawn_in_their_cell():
    record = shapes.shapes_records(1, seed=3, min_objects=1, max_objects=1, question_types=("colour",))[0]
    obj = shapes.ShapeObject(**record["objects"][0])
    centre = (obj.column * shapes.CELL + shapes.CELL // 2, obj.row * shapes.CELL + shapes.CELL // 2)
    assert record["image"].getpixel(centre) == shapes.RGB[obj.colour]
    assert record["image"].getpixel(((obj.column * shapes.CELL + 8 + shapes.CELL) % shapes.IMAGE_SIZE, 0)) == (255, 255, 255)


@pytest.mark.parametrize("kwargs, message", [({"max_objects": 7}, "max_objects"), ({"question_types": ("size",)}, "question types")])
def test_bad_generator_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes.shapes_records(3, seed=0, **kwargs)


def test_training_puts_the_loss_on_the_answer_letter_and_the_end_token_only():
    from lmms_simignore.train_shapes import build_shapes_llava, encode

    _, processor = build_shapes_llava()
    records = shapes.shapes_records(4, seed=2)
    batch = encode(processor, records, with_answers=True)
    for row, record in enumerate(records):
        labelled = batch["input_ids"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.convert_ids_to_tokens(labelled) == ["ABCDEF"[record["answer"]], "</s>"]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its answer


def test_a_short_training_run_writes_a_loadable_model_and_its_record(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from lmms_simignore.train_shapes import train

    summary = train(tmp_path, steps=2, batch_size=4, eval_every=1, held_out_size=10, log=lambda line: None)
    assert [entry["step"] for entry in summary["history"]] == [1, 2]
    assert set(summary["held_out"]["per_type"]) == set(shapes.QUESTION_TYPES)
    assert (tmp_path / "training.json").exists() and (tmp_path / "model.safetensors").exists()
    LlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_a_second_stage_starts_from_the_given_model_and_keeps_the_earlier_records(tmp_path):
    import json

    from lmms_simignore.train_shapes import train

    summary = train(tmp_path, steps=1, batch_size=4, lr=1e-9, eval_every=1, held_out_size=40, curriculum=0,
                    init_from=SHIPPED_MODEL, log=lambda line: None)
    shipped = json.loads((SHIPPED_MODEL / "training.json").read_text())
    assert summary["previous_stages"] == shipped["previous_stages"] + [{k: v for k, v in shipped.items() if k != "previous_stages"}]
    assert summary["curriculum"] == 0 and summary["init_from"] == str(SHIPPED_MODEL)
    # a near-zero learning rate leaves the trained model's answers: far above what a fresh model gets
    assert summary["held_out"]["overall"] >= 0.9
    with pytest.raises(ValueError, match="curriculum"):
        train(tmp_path, steps=1, curriculum=1.5)


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

    from lmms_simignore.demo import TASK, demo_config
    from lmms_simignore.sweep import _shapes_task_dir

    subprocess.run([sys.executable, "-m", "lmms_simignore", "shapes-task", "--held-out", "--num-questions", "6", "--out",
                    str(tmp_path / "user")], check=True, capture_output=True, timeout=300)
    _shapes_task_dir(demo_config(6).shapes_task, tmp_path / "demo", write=True)
    for folder in ("user", "demo"):
        assert (tmp_path / folder / f"{TASK}.yaml").is_file()
    user, demo = (pandas.read_parquet(next((tmp_path / folder / "data").glob("*.parquet"))) for folder in ("user", "demo"))
    assert user.drop(columns="image").equals(demo.drop(columns="image"))
    assert list(user["image"].map(lambda image: image["bytes"])) == list(demo["image"].map(lambda image: image["bytes"]))
