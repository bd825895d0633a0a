"""What a plain (non-editable) `pip install` ships: the task YAMLs and the lmms-eval entry point."""

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    return zipfile.ZipFile(next(out.glob("lmms_simignore-*.whl")))


def test_wheel_ships_the_task_yamls_inside_the_package(wheel):
    names = set(wheel.namelist())
    for task_file in ROOT.joinpath("tasks").glob("*.yaml"):
        assert f"lmms_simignore/tasks/{task_file.name}" in names
    assert "lmms_simignore/tasks/scienceqa_utils.py" in names
    assert "lmms_simignore/tasks/shapes_utils.py" in names


def test_wheel_ships_the_trained_testbed_model(wheel):
    names = set(wheel.namelist())
    for model_file in ROOT.joinpath("lmms_simignore", "testbed", "shapes-llava").iterdir():
        assert f"lmms_simignore/testbed/shapes-llava/{model_file.name}" in names


def test_wheel_registers_the_lmms_eval_model(wheel):
    entry_points_txt = next(name for name in wheel.namelist() if name.endswith("entry_points.txt"))
    text = wheel.read(entry_points_txt).decode()
    assert "[lmms_eval.models]" in text
    assert "llava_simignore = lmms_simignore.models.registration:llava_simignore_manifest" in text


def test_installed_entry_point_resolves_both_classes():
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "llava_simignore"]
    manifest = entry.load()()
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(manifest)
    assert registry.get_model_class("llava_simignore").__name__ == "LlavaSimignoreChat"
    assert registry.get_model_class("llava_simignore", force_simple=True).__name__ == "LlavaSimignore"


def test_tasks_dir_command_prints_a_folder_lmms_eval_can_index(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "tasks-dir"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert Path(printed, "_scienceqa_img_template.yaml").is_file()


@pytest.mark.parametrize("module, fails", [("lmms_simignore.engine", True), ("transformers.masking_utils", False)])
def test_a_deprecation_raised_from_our_package_fails_the_suite(tmp_path, module, fails):
    """pyproject's filterwarnings turns FutureWarning/DeprecationWarning attributed to lmms_simignore into errors
    (the next upstream release would break us), and leaves upstream's own warnings alone."""
    (tmp_path / "test_warns.py").write_text(
        "import warnings\n\n"
        "def test_warns():\n"
        f"    warnings.warn_explicit('`old` is deprecated', FutureWarning, 'somewhere.py', 1, module={module!r})\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_warns.py")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == (1 if fails else 0), completed.stdout[-2000:]
