"""Synthetic local copies of the standard benchmarks' test splits, each in its lmms-eval built-in task's own schema.

A few docs per task about 64 px shapes scenes (`scenes`, questions from `shapes.ask`), with answers known by
construction, written as the parquet files `local_data.write_builtin_local_task` reads in place of the hub: lmms-eval's
own prompts, answer parsing and metrics then run offline on them, with a tiny model. `correct_reply` and `wrong_reply`
give, for a doc, a model reply that its task scores as right and one that it scores as wrong (for a multiple-choice
task: the index of the option of least loss).

Columns and types follow the hub datasets (their dataset cards); a column no task code reads is kept where cheap.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

from lmms_simignore.testbed import scenes
from lmms_simignore.testbed.scenes import COLOURS, SHAPES
from lmms_simignore.testbed.shapes import COUNTS, ask

# lmms-eval's built-in task names, in the suite's order.
SUITE_TASKS = (
    "gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "textvqa_val", "vqav2_val", "seedbench",
    "seedbench_ppl", "mmmu_val", "ocrbench", "chartqa",
)

LETTERS = "ABCDEFG"
MAX_OBJECTS = 3  # objects per scene
OPEN_KINDS = ("colour", "count")  # open questions alternate between these `shapes` question types
CIRCULAR = 1_000_000  # MMBench: a question's circular copies have index + k * CIRCULAR and rotated options
MME_CATEGORIES = ("existence", "commonsense_reasoning", "count", "code_reasoning")  # perception, cognition, ...
MME_SUFFIX = " Please answer yes or no."
POPE_CATEGORIES = ("adversarial", "popular", "random")
VIDEO_FRAMES = 3  # images of a SEED-Bench video doc
MMMU_SUBJECTS = ("Art", "Math", "Physics", "Computer_Science")
OCRBENCH_TYPES = (  # (question_type, dataset); HME100k is matched without spaces
    ("Regular Text Recognition", "IIIT5K"), ("Handwritten Mathematical Expression Recognition", "HME100k"),
    ("Scene Text-centric VQA", "textVQA"), ("Doc-oriented VQA", "docVQA"), ("Key Information Extraction", "FUNSD"),
)
CHARTQA_TYPES = ("human_test", "augmented_test")

# Column -> type: a datasets Value dtype, or "image", "images" (a list of images), "strings" (a list of strings),
# "vqa_answers" (VQAv2's list of {answer, answer_confidence, answer_id}).
SCHEMAS = {
    "gqa": {  # the processed copy (local_data.PROCESSED_COPIES): the image joined in
        "id": "string", "imageId": "string", "question": "string", "answer": "string", "fullAnswer": "string",
        "isBalanced": "bool", "image": "image",
    },
    "mmbench_en_dev_static": {
        "index": "int64", "question": "string", "hint": "string", "A": "string", "B": "string", "C": "string",
        "D": "string", "answer": "string", "category": "string", "image": "image", "source": "string",
        "L2-category": "string", "comment": "string", "split": "string",
    },
    "mme": {"question_id": "string", "image": "image", "question": "string", "answer": "string", "category": "string"},
    "pope": {
        "id": "string", "question_id": "string", "question": "string", "answer": "string", "image_source": "string",
        "image": "image", "category": "string",
    },
    "scienceqa_img": {
        "image": "image", "question": "string", "choices": "strings", "answer": "int8", "hint": "string",
        "task": "string", "grade": "string", "subject": "string", "topic": "string", "category": "string",
        "skill": "string", "lecture": "string", "solution": "string",
    },
    "textvqa_val": {
        "image_id": "string", "question_id": "int32", "question": "string", "question_tokens": "strings",
        "image": "image", "image_width": "int32", "image_height": "int32", "flickr_original_url": "string",
        "flickr_300k_url": "string", "answers": "strings", "image_classes": "strings", "set_name": "string",
        "ocr_tokens": "strings",
    },
    "vqav2_val": {
        "question_type": "string", "multiple_choice_answer": "string", "answers": "vqa_answers", "image_id": "int64",
        "answer_type": "string", "question_id": "int64", "question": "string", "image": "image",
    },
    "seedbench": {
        "answer": "string", "choice_a": "string", "choice_b": "string", "choice_c": "string", "choice_d": "string",
        "data_id": "string", "data_type": "string", "question": "string", "question_id": "string",
        "question_type_id": "int16", "image": "images",
    },
    "mmmu_val": {
        "id": "string", "question": "string", "options": "string", "explanation": "string",
        **{f"image_{number}": "image" for number in range(1, 8)},
        "img_type": "string", "answer": "string", "topic_difficulty": "string", "question_type": "string",
        "subfield": "string",
    },
    "ocrbench": {
        "dataset": "string", "question": "string", "question_type": "string", "answer": "strings", "image": "image",
    },
    "chartqa": {"type": "string", "question": "string", "answer": "string", "image": "image"},
}
SCHEMAS["seedbench_ppl"] = SCHEMAS["seedbench"]  # one hub dataset, scored by generation or by option likelihood


def _scene_question(rng: random.Random, kind: str) -> tuple[list, str, str]:
    """(objects, question, answer) of the `shapes` question type `kind` about a random scene."""
    while True:
        objects = scenes.random_scene(rng, rng.randint(1, MAX_OBJECTS))
        asked = ask(rng, objects, kind)
        if asked is not None:
            return objects, *asked


def _open_questions(rng: random.Random, num_docs: int):
    """`num_docs` (index, image, question, answer), colour and count questions alternately."""
    for index in range(num_docs):
        objects, question, answer = _scene_question(rng, OPEN_KINDS[index % len(OPEN_KINDS)])
        yield index, scenes.draw_scene(objects), question, answer


def _colour_options(rng: random.Random, answer: str, num_options: int = len(COLOURS)) -> list[str]:
    """`num_options` distinct colours in random order, `answer` among them."""
    options = rng.sample([colour for colour in COLOURS if colour != answer], num_options - 1) + [answer]
    rng.shuffle(options)
    return options


def _is_there(rng: random.Random, objects: list, present: bool) -> str:
    """A question whose answer is yes when `present`: about an object of the scene, or about one not in it."""
    names = sorted({obj.name for obj in objects})
    absent = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES if f"{colour} {shape}" not in names]
    return f"Is there a {rng.choice(names if present else absent)} in the image?"


def gqa_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """GQA testdev-balanced instructions, processed (image joined), open colour and count questions."""
    return [
        {"id": f"{201_000_000 + index}", "imageId": f"n{100_000 + index}", "question": question, "answer": answer,
         "fullAnswer": f"The answer is {answer}.", "isBalanced": True, "image": image}
        for index, image, question, answer in _open_questions(rng, num_docs)
    ]


def mmbench_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """MMBench-EN dev: each question followed by its circular copy (options rotated by one, index + CIRCULAR);
    colour questions with four options, and yes/no questions with two (C and D empty) and no hint."""
    docs = []
    for base in range(num_docs // 2):
        if base % 2 == 0:
            objects, question, answer = _scene_question(rng, "colour")
            options, category = _colour_options(rng, answer), "attribute_recognition"
            hint = "Colours are named plainly."
        else:
            objects, question, answer = _scene_question(rng, "exists")
            options, category, hint = ["yes", "no"], "image_scene", None
        image = scenes.draw_scene(objects)
        for copy in range(2):
            rotated = options[copy:] + options[:copy]
            columns = dict(zip("ABCD", rotated + [None] * (4 - len(rotated))))
            docs.append(
                {"index": base + copy * CIRCULAR, "question": question, "hint": hint, **columns,
                 "answer": LETTERS[rotated.index(answer)], "category": category, "image": image, "source": "synthetic",
                 "L2-category": "finegrained_perception (instance-level)", "comment": None, "split": "dev"}
            )
    return docs


def mme_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """MME: pairs of questions about one image (one yes, one no) sharing a question_id, as MME scores them."""
    docs = []
    for pair in range(num_docs // 2):
        objects = scenes.random_scene(rng, rng.randint(1, MAX_OBJECTS))
        category = MME_CATEGORIES[pair % len(MME_CATEGORIES)]
        image = scenes.draw_scene(objects)
        for present in (True, False):
            docs.append(
                {"question_id": f"{category}/{pair:06d}.png", "image": image,
                 "question": _is_there(rng, objects, present) + MME_SUFFIX, "answer": "Yes" if present else "No",
                 "category": category}
            )
    return docs


def pope_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """POPE: object-existence questions, yes and no alternately, the three sampling categories in turn."""
    docs = []
    for index in range(num_docs):
        objects = scenes.random_scene(rng, rng.randint(1, MAX_OBJECTS))
        present = index % 2 == 0
        docs.append(
            {"id": str(index), "question_id": str(index + 1), "question": _is_there(rng, objects, present),
             "answer": "yes" if present else "no", "image_source": f"COCO_val2014_{index:012d}",
             "image": scenes.draw_scene(objects), "category": POPE_CATEGORIES[index % len(POPE_CATEGORIES)]}
        )
    return docs


def scienceqa_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """ScienceQA-IMG: colour questions with two to four choices, a hint on every other doc."""
    docs = []
    for index in range(num_docs):
        objects, question, answer = _scene_question(rng, "colour")
        choices = _colour_options(rng, answer, 2 + index % 3)
        docs.append(
            {"image": scenes.draw_scene(objects), "question": question, "choices": choices,
             "answer": choices.index(answer), "hint": "" if index % 2 else "The page is grey.", "task": "closed choice",
             "grade": "grade2", "subject": "natural science", "topic": "colours", "category": "Identify colours",
             "skill": "Identify colours", "lecture": "", "solution": f"The answer is {answer}."}
        )
    return docs


def textvqa_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """TextVQA validation: lower-case questions (the prompt capitalizes them), ten annotators' answers."""
    return [
        {"image_id": f"{index:016x}", "question_id": 34_602 + index, "question": question.lower(),
         "question_tokens": question.lower().rstrip("?").split(), "image": image,
         "image_width": scenes.IMAGE_SIZE, "image_height": scenes.IMAGE_SIZE, "flickr_original_url": "",
         "flickr_300k_url": "", "answers": [answer] * 10, "image_classes": ["Shape"], "set_name": "val",
         "ocr_tokens": []}
        for index, image, question, answer in _open_questions(rng, num_docs)
    ]


def vqav2_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """VQAv2 validation: ten annotators' answers, distinct `answer_id`s (its leave-one-out compares whole dicts)."""
    docs = []
    for index, image, question, answer in _open_questions(rng, num_docs):
        number = answer.isdigit()
        answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": answer_id} for answer_id in range(1, 11)]
        docs.append(
            {"question_type": "how many" if number else "what color is the", "multiple_choice_answer": answer,
             "answers": answers,
             "image_id": 100 + index, "answer_type": "number" if number else "other", "question_id": 100_000 + index,
             "question": question, "image": image}
        )
    return docs


def seedbench_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """SEED-Bench: four-choice colour questions; image docs with one image and video docs with VIDEO_FRAMES frames
    (the asked scene first), alternately."""
    docs = []
    for index in range(num_docs):
        objects, question, answer = _scene_question(rng, "colour")
        options = _colour_options(rng, answer)
        video = index % 2 == 1
        frames = [scenes.draw_scene(objects)]
        if video:
            frames += [scenes.draw_scene(scenes.random_scene(rng, 1)) for _ in range(VIDEO_FRAMES - 1)]
        choices = {f"choice_{letter}": option for letter, option in zip("abcd", options)}
        docs.append(
            {"answer": LETTERS[options.index(answer)], **choices,
             "data_id": f"v{index}.mp4" if video else f"{index}.jpg", "data_type": "video" if video else "image",
             "question": question, "question_id": str(index), "question_type_id": 10 if video else 1, "image": frames}
        )
    return docs


def mmmu_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """MMMU validation: multiple-choice colour questions about `<image 1>`, and open count questions about
    `<image 1>` beside `<image 2>`; `options` is the string form of a list, as on the hub."""
    docs = []
    for index in range(num_docs):
        subject = MMMU_SUBJECTS[index % len(MMMU_SUBJECTS)]
        images = {f"image_{number}": None for number in range(1, 8)}
        if index % 2 == 0:
            objects, question, answer = _scene_question(rng, "colour")
            options = _colour_options(rng, answer)
            question, answer, kind = f"<image 1> {question}", LETTERS[options.index(answer)], "multiple-choice"
        else:
            objects, question, answer = _scene_question(rng, "count")
            options, kind = [], "open"
            question = f"{question.removesuffix('?')} in <image 1>? <image 2> is another page."
            images["image_2"] = scenes.draw_scene(scenes.random_scene(rng, 1))
        images["image_1"] = scenes.draw_scene(objects)
        docs.append(
            {"id": f"validation_{subject}_{index + 1}", "question": question, "options": str(options),
             "explanation": "", **images, "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy",
             "question_type": kind, "subfield": subject}
        )
    return docs


def ocrbench_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """OCRBench: open questions whose `answer` is a list of accepted strings; question types and datasets in turn."""
    docs = []
    for index, image, question, answer in _open_questions(rng, num_docs):
        question_type, dataset = OCRBENCH_TYPES[index % len(OCRBENCH_TYPES)]
        docs.append(
            {"dataset": dataset, "question": question, "question_type": question_type, "answer": [answer], "image": image}
        )
    return docs


def chartqa_docs(rng: random.Random, num_docs: int) -> list[dict]:
    """ChartQA test: open questions, human-written and augmented splits alternately."""
    return [
        {"type": CHARTQA_TYPES[index % len(CHARTQA_TYPES)], "question": question, "answer": answer, "image": image}
        for index, image, question, answer in _open_questions(rng, num_docs)
    ]


DOCS = {
    "gqa": gqa_docs, "mmbench_en_dev_static": mmbench_docs, "mme": mme_docs, "pope": pope_docs,
    "scienceqa_img": scienceqa_docs, "textvqa_val": textvqa_docs, "vqav2_val": vqav2_docs, "seedbench": seedbench_docs,
    "seedbench_ppl": seedbench_docs, "mmmu_val": mmmu_docs, "ocrbench": ocrbench_docs, "chartqa": chartqa_docs,
}


def suite_docs(task: str, num_docs: int = 4, seed: int = 0) -> list[dict]:
    """`num_docs` synthetic docs of the suite task `task` (an even number: MME and MMBench docs come in pairs),
    images as PIL images. Same task and seed, same docs."""
    if task not in DOCS:
        raise ValueError(f"task must be one of {', '.join(SUITE_TASKS)}; got {task!r}")
    if num_docs < 2 or num_docs % 2:
        raise ValueError(f"num_docs must be even and at least 2 (MME and MMBench docs come in pairs); got {num_docs}")
    return DOCS[task](random.Random(f"{task}:{seed}"), num_docs)


def features(task: str):
    """The `datasets.Features` of the suite task's parquet file (`SCHEMAS`)."""
    from datasets import Features, Image, List, Value

    kinds = {
        "image": Image(), "images": List(Image()), "strings": List(Value("string")),
        "vqa_answers": List(
            {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
        ),
    }
    return Features({column: kinds[kind] if kind in kinds else Value(kind) for column, kind in SCHEMAS[task].items()})


def write_suite_data(out_dir: str | Path, docs_per_task: int = 4, seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/{task}.parquet` for each suite task: `docs_per_task` synthetic docs in the task's hub schema,
    a local copy of its test split for `local_data.write_builtin_local_task`. Same seed, same files."""
    from datasets import Dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in SUITE_TASKS:
        path = out_dir / f"{task}.parquet"
        Dataset.from_list(suite_docs(task, docs_per_task, seed), features=features(task)).to_parquet(str(path))
        written[task] = path
    return written


def _num_options(task: str, doc: dict) -> int:
    """How many options a doc of a letter-answered task offers."""
    if task == "mmbench_en_dev_static":
        return sum(doc[letter] is not None for letter in "ABCD")
    if task == "scienceqa_img":
        return len(doc["choices"])
    if task == "mmmu_val":
        return len(ast.literal_eval(doc["options"]))
    return 4  # SEED-Bench


def _is_letter_answer(task: str, doc: dict) -> bool:
    return task in ("mmbench_en_dev_static", "scienceqa_img", "seedbench") or (
        task == "mmmu_val" and doc["question_type"] == "multiple-choice"
    )


def correct_reply(task: str, doc: dict) -> str | int:
    """A reply that `task` scores as correct on `doc` (for seedbench_ppl: the index of the correct option)."""
    if task == "seedbench_ppl":
        return LETTERS.index(doc["answer"])
    if task == "scienceqa_img":
        return LETTERS[doc["answer"]]
    if task == "textvqa_val":
        return doc["answers"][0]
    if task == "vqav2_val":
        return doc["multiple_choice_answer"]
    if task == "ocrbench":
        return doc["answer"][0]
    return doc["answer"]


def _other_answer(answer: str) -> str:
    """Another answer of the same kind: the next colour, shape or count, the other of yes and no."""
    for values in (COLOURS, SHAPES, COUNTS, ("yes", "no"), ("Yes", "No")):
        if answer in values:
            return values[(values.index(answer) + 1) % len(values)]
    raise ValueError(f"no other answer known for {answer!r}")


def wrong_reply(task: str, doc: dict) -> str | int:
    """A reply that `task` scores as wrong on `doc`: another option's letter (for seedbench_ppl: its index), or
    another answer of the same kind."""
    correct = correct_reply(task, doc)
    if task == "seedbench_ppl":
        return (correct + 1) % 4
    if _is_letter_answer(task, doc):
        return LETTERS[(LETTERS.index(correct) + 1) % _num_options(task, doc)]
    return _other_answer(correct)
