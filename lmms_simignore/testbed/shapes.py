"""Synthetic shapes benchmark: flat 2-D objects on a textured page, multiple-choice questions about them.

After "Seeing Beyond Redundancy" (Hannan et al., arXiv 2602.06914): the number and variety of objects
set the visual complexity. Everything is a deterministic function of a seed. The scenes (`scenes`) are
64 px pages read as 8 x 8 image tokens, with objects of three sizes spanning one to many tokens. Options
are listed in a fixed (canonical) order per question type and answered with the option's letter, in the
ScienceQA-IMG prompt format.
"""

from __future__ import annotations

import random
from pathlib import Path

from lmms_simignore.testbed import scenes
from lmms_simignore.testbed.scenes import COLOURS, SHAPES

YES_NO = ("yes", "no")
MAX_OBJECTS = 6
COUNTS = tuple(str(count) for count in range(1, MAX_OBJECTS + 1))
HELD_OUT_SEED = 10_000  # the shipped model's held-out questions; its training batches draw seeds >= 2**20
QUESTION_TYPES = ("colour", "shape", "exists", "count", "spatial")
OPTIONS = {"colour": COLOURS, "shape": SHAPES, "exists": YES_NO, "count": COUNTS, "spatial": YES_NO}
FEWEST_OBJECTS = {"spatial": 2}  # a relation needs two objects
# asked attribute -> (the attribute that names the object, question template)
ATTRIBUTE_QUESTIONS = {"colour": ("shape", "What colour is the {}?"), "shape": ("colour", "What shape is the {} object?")}


def _unique(objects: list, key) -> list:
    values = [key(obj) for obj in objects]
    return [obj for obj in objects if values.count(key(obj)) == 1]


def ask(rng: random.Random, objects: list, question_type: str, min_gap: int = scenes.MIN_GAP) -> tuple[str, str] | None:
    """(question, answer option) of `question_type` about the scene, or None when the scene cannot support it.

    `objects` have `colour`, `shape`, `name` and `centre_x` (pixels); a left-of question compares two objects
    whose centres are at least `min_gap` pixels apart horizontally.
    """
    if question_type in ATTRIBUTE_QUESTIONS:  # name an object by one attribute, ask for the other
        known, template = ATTRIBUTE_QUESTIONS[question_type]
        candidates = _unique(objects, lambda obj: getattr(obj, known))
        if not candidates:
            return None
        target = rng.choice(candidates)
        return template.format(getattr(target, known)), getattr(target, question_type)
    if question_type == "exists":
        present = {obj.name for obj in objects}
        if rng.random() < 0.5:
            return f"Is there a {rng.choice(sorted(present))}?", "yes"
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
        return f"Is there a {rng.choice(absent)}?", "no"
    if question_type == "count":
        return "How many objects are there?", str(len(objects))
    if question_type == "spatial":
        candidates = _unique(objects, lambda obj: obj.name)
        pairs = [(a, b) for a in candidates for b in candidates if abs(a.centre_x - b.centre_x) >= min_gap]
        if not pairs:
            return None
        first, second = rng.choice(pairs)
        return f"Is the {first.name} left of the {second.name}?", "yes" if first.centre_x < second.centre_x else "no"
    raise ValueError(f"question_type must be one of {', '.join(QUESTION_TYPES)}; got {question_type!r}")


def shapes_records(num_questions: int, seed: int, max_objects: int = MAX_OBJECTS, min_objects: int = 1,
                   question_types: tuple[str, ...] = QUESTION_TYPES, draw: bool = True) -> list[dict]:
    """`num_questions` records cycling through the question types, with ScienceQA-IMG columns plus
    `question_type`, `num_objects` (1..max_objects, uniform) and `objects` (`scenes.PlacedObject` fields).
    Same seed, same records.
    """
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    for question_type in question_types:
        if question_type not in QUESTION_TYPES:
            raise ValueError(f"question types must be among {', '.join(QUESTION_TYPES)}; got {question_type!r}")
    rng = random.Random(seed)
    records, attempts = [], 0
    while len(records) < num_questions:
        attempts += 1
        if attempts > 100 * num_questions + 1000:
            raise RuntimeError(f"could not draw {num_questions} questions of types {question_types} with {min_objects}-{max_objects} objects")
        question_type = question_types[len(records) % len(question_types)]
        fewest = max(min_objects, FEWEST_OBJECTS.get(question_type, 1))
        objects = scenes.random_scene(rng, rng.randint(fewest, max(fewest, max_objects)))
        asked = ask(rng, objects, question_type)
        if asked is None:
            continue
        question, answer = asked
        options = list(OPTIONS[question_type])
        records.append(
            {
                "image": scenes.draw_scene(objects) if draw else None,
                "question": question,
                "choices": options,
                "answer": options.index(answer),
                "hint": "",
                "question_type": question_type,
                "num_objects": len(objects),
                "objects": [obj.__dict__ for obj in objects],
            }
        )
    return records


def write_shapes_task(out_dir: str | Path, num_questions: int = 500, seed: int = 1, task_name: str = "shapes_local",
                      max_objects: int = MAX_OBJECTS, multiple_choice: bool = False) -> list[Path]:
    """Generate a split as parquet under `out_dir/data` and a task YAML `out_dir/{task_name}.yaml` (with
    `multiple_choice`, also `{task_name}_mc.yaml`: the same questions scored by log-likelihood); returns the YAMLs.

    Pass `out_dir` to lmms-eval's --include_path and the task names to --tasks.
    """
    import json

    from datasets import Dataset, Features, Image, Sequence, Value

    from lmms_simignore.local_data import write_local_task

    out_dir = Path(out_dir)
    records = shapes_records(num_questions, seed=seed, max_objects=max_objects)
    for record in records:
        record["objects"] = json.dumps(record["objects"])
    features = Features(
        {
            "image": Image(), "question": Value("string"), "choices": Sequence(Value("string")), "answer": Value("int64"),
            "hint": Value("string"), "question_type": Value("string"), "num_objects": Value("int64"), "objects": Value("string"),
        }
    )
    parquet = out_dir / "data" / f"{task_name}_seed{seed}_n{num_questions}.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(records, features=features).to_parquet(str(parquet))
    written = [write_local_task(out_dir, parquet, task_name=task_name, template="_shapes_template.yaml")]
    if multiple_choice:
        written.append(write_local_task(out_dir, parquet, task_name=f"{task_name}_mc", template="_shapes_mc_template.yaml"))
    return written
