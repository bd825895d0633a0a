"""Local copies of evaluation data (the hub is not needed): checking a test split on disk and writing an lmms-eval task
YAML that reads it with a shipped recipe."""

from __future__ import annotations

from pathlib import Path

# Named by every derived multiple-choice task: built on lmms-eval's simple path for chat model classes too.
MULTIPLE_CHOICE_CLASS = "lmms_simignore.tasks.multiple_choice.MultipleChoiceTask"


def check_local_data(data_path: str | Path) -> Path:
    """A local copy of a test split: a parquet file, or a `save_to_disk` folder of a DatasetDict with a `test` split."""
    data_path = Path(data_path)
    if data_path.is_file():
        if data_path.suffix != ".parquet":
            raise ValueError(f"data {data_path}: expected a .parquet file or a save_to_disk folder")
        return data_path
    if not data_path.is_dir():
        raise FileNotFoundError(f"data {data_path}: no such file or folder")
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(data_path))
    if not isinstance(dataset, DatasetDict) or "test" not in dataset:
        found = f"a DatasetDict with splits {sorted(dataset)}" if isinstance(dataset, DatasetDict) else "a single Dataset"
        raise ValueError(
            f"data {data_path}: lmms-eval needs a DatasetDict with a `test` split, found {found} "
            "(save one with DatasetDict({'test': dataset}).save_to_disk(folder))"
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


def output_type(yaml_path: str | Path) -> str | None:
    """The `output_type` of a task YAML, its `include:`s followed."""
    return read_task_config(yaml_path).get("output_type")


def derived_task_yaml(config: dict) -> str:
    """The YAML text of a task that `include:`s another; a multiple-choice one also names `MULTIPLE_CHOICE_CLASS`
    (a YAML tag, which JSON cannot hold; the recipe itself must not: lmms-eval indexes a YAML with `class:` as a task)."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, width=1000)
    if output_type(config["include"]) == "multiple_choice":
        text += f"class: !function {MULTIPLE_CHOICE_CLASS}\n"
    return text
