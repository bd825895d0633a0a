"""Local copies of evaluation data (the hub is not needed): checking a test split on disk and writing an lmms-eval task
YAML that reads it, with a shipped recipe (`write_local_task`) or with lmms-eval's own definition of a built-in task
(`write_builtin_local_task`: its prompt, answer parsing and metrics, for compute nodes without internet)."""

from __future__ import annotations

import functools
from pathlib import Path

# Named by every derived multiple-choice task: built on lmms-eval's simple path for chat model classes too.
MULTIPLE_CHOICE_CLASS = "lmms_simignore.tasks.multiple_choice.MultipleChoiceTask"


# Built-in tasks whose `process_docs` downloads more data (GQA joins its images from a second dataset): their local
# copy holds the processed docs (`save_task_data` writes them so) and the derived task does not process them again.
PROCESSED_COPIES = ("gqa",)


def check_local_data(data_path: str | Path, split: str = "test") -> Path:
    """A local copy of a test split: a parquet file, or a `save_to_disk` folder of a DatasetDict with that `split`."""
    data_path = Path(data_path)
    if data_path.is_file():
        if data_path.suffix != ".parquet":
            raise ValueError(f"data {data_path}: expected a .parquet file or a save_to_disk folder")
        return data_path
    if not data_path.is_dir():
        raise FileNotFoundError(f"data {data_path}: no such file or folder")
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(data_path))
    if not isinstance(dataset, DatasetDict) or split not in dataset:
        found = f"a DatasetDict with splits {sorted(dataset)}" if isinstance(dataset, DatasetDict) else "a single Dataset"
        raise ValueError(
            f"data {data_path}: lmms-eval needs a DatasetDict with a `{split}` split, found {found} "
            f"(save one with DatasetDict({{'{split}': dataset}}).save_to_disk(folder))"
        )
    return data_path


def write_local_task(
    task_dir: str | Path, data_path: str | Path, task_name: str = "scienceqa_img_local",
    template: str = "_scienceqa_img_template.yaml",
) -> Path:
    """Write an lmms-eval task YAML named `task_name` that reads local data with a shipped recipe (`template`).

    `data_path`: a parquet file of the test split, or a `save_to_disk` folder of a DatasetDict with a `test` split.
    """
    from lmms_simignore.shipped import tasks_dir

    data_path = check_local_data(data_path).resolve()
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = task_dir / f"{task_name}.yaml"
    config = {"include": str(tasks_dir() / template), "task": task_name}
    if data_path.is_dir():
        config.update({"dataset_path": str(data_path), "dataset_kwargs": {"load_from_disk": True}})
    else:
        config.update({"dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": str(data_path)}}})
    yaml_path.write_text(derived_task_yaml(config))
    return yaml_path


def read_task_config(yaml_path: str | Path) -> dict:
    """A task YAML as lmms-eval reads it, its `include:`s followed (`!function` tags left as their names)."""
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(yaml_path), mode="simple")


def derived_task_yaml(config: dict, included: dict | None = None) -> str:
    """The YAML text of a task that `include:`s another (`included`: that one as `read_task_config` reads it, read here
    when not given); a multiple-choice one also names `MULTIPLE_CHOICE_CLASS` (a YAML tag, which JSON cannot hold; the
    recipe itself must not: lmms-eval indexes a YAML with `class:` as a task)."""
    import yaml

    included = read_task_config(config["include"]) if included is None else included
    text = yaml.safe_dump(config, sort_keys=False, width=1000)
    if included.get("output_type") == "multiple_choice":
        text += f"class: !function {MULTIPLE_CHOICE_CLASS}\n"
    return text


@functools.cache
def builtin_task_index() -> dict:
    """lmms-eval's index of its built-in tasks, groups and tags (seconds to build: once per process)."""
    from loguru import logger
    from lmms_eval.tasks import TaskManager

    logger.disable("lmms_eval.tasks")  # it logs every YAML it cannot index
    try:
        return TaskManager("ERROR").task_index
    finally:
        logger.enable("lmms_eval.tasks")


def builtin_task_yaml(task: str) -> Path:
    """The YAML file of lmms-eval's built-in task `task` (a task, not a group)."""
    index = builtin_task_index()
    entry = index.get(task)
    if entry is None or entry["type"] != "task":
        kind = "a group or tag" if entry else "not a task"
        close = sorted(name for name, value in index.items() if value["type"] == "task" and name.startswith(task.split("_")[0]))[:8]
        raise ValueError(f"--tasks: {task} is {kind} of lmms-eval's built-in tasks" + (f"; tasks named like it: {', '.join(close)}" if close else ""))
    return Path(entry["yaml_path"])


def write_builtin_local_task(task_dir: str | Path, task: str, data_path: str | Path, task_name: str | None = None) -> Path:
    """Write `{task}_local.yaml` (or `task_name`): lmms-eval's built-in `task` (its YAML `include:`d: prompt, answer
    parsing, metrics) reading its test split from `data_path` (a parquet file, or a `save_to_disk` folder of a
    DatasetDict holding that split) instead of the hub."""
    builtin = builtin_task_yaml(task)
    included = read_task_config(builtin)
    split = included["test_split"]
    data_path = check_local_data(data_path, split).resolve()
    config = {"include": str(builtin), "task": task_name or f"{task}_local", "dataset_name": None}
    if data_path.is_dir():
        config.update({"dataset_path": str(data_path), "dataset_kwargs": {"load_from_disk": True}})
    else:
        config.update({"dataset_path": "parquet", "dataset_kwargs": {"data_files": {split: str(data_path)}}})
    if "tag" in included:
        config["tag"] = []  # the copy joins none of the built-in's tag groups
    if task in PROCESSED_COPIES:
        config["process_docs"] = None
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = task_dir / f"{config['task']}.yaml"
    yaml_path.write_text(derived_task_yaml(config, included))
    return yaml_path


def save_task_data(task: str, out_dir: str | Path, include_path: str | Path | None = None) -> Path:
    """Download lmms-eval's built-in `task` (on a machine with internet) and save its test split as
    `out_dir/{task}.parquet`, the local copy `write_builtin_local_task` reads (processed docs for PROCESSED_COPIES).
    `include_path`: a folder of more task YAMLs (lmms-eval's --include_path)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    loaded = get_task_dict([task], TaskManager("ERROR", include_path=[str(include_path)] if include_path else None))[task]
    split = loaded.config.test_split
    docs = loaded.test_docs() if task in PROCESSED_COPIES else loaded.dataset[split]
    out = Path(out_dir) / f"{task}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    docs.to_parquet(str(out))
    return out
