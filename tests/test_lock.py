"""The tested lock (requirements/lock-py311-cpu.txt) against pyproject.toml's bounds and this environment."""

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from lmms_simignore.lockfile import LOCK_FILE, NOT_LOCKED, TORCH_PAIR, is_locked, read_lock, unsatisfied_bounds

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / LOCK_FILE


def project_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["test"]


def test_every_locked_version_satisfies_the_bounds_in_pyproject():
    assert unsatisfied_bounds(read_lock(LOCK), project_requirements()) == []


def test_the_lock_holds_the_evaluation_stack_and_leaves_out_what_breaks_it():
    lock = read_lock(LOCK)
    for package in ("torch", "torchvision", "lmms-eval", "transformers", "accelerate", "datasets", "filelock", "pytest"):
        assert package in lock, package
    for package in NOT_LOCKED:
        assert package not in lock, package
    assert not [name for name in lock if name.startswith(("nvidia-", "cuda-")) or name == "triton"]


def test_the_packages_of_torch_s_own_build_are_left_to_the_torch_wheel():
    assert not is_locked("nvidia-cublas") and not is_locked("triton") and not is_locked("cuda-bindings")
    assert is_locked("torch") and is_locked("torchvision") and is_locked("transformers")


def test_the_locked_torch_pair_imports_together_and_builds_what_needs_torchvision():
    """transformers' Qwen-VL processors need torchvision: the lock's pair must import and run side by side."""
    import torch
    import torchvision
    from transformers import Qwen2VLVideoProcessor

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9], [2.0, 2.0, 3.0, 3.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5).tolist() == [0, 2]
    assert type(Qwen2VLVideoProcessor()).__name__ == "Qwen2VLVideoProcessor"


def test_a_locked_version_outside_a_bound_is_named():
    lock = {"filelock": "4.3.1", "datasets": "5.2.0"}
    problems = unsatisfied_bounds(lock, ["filelock<4.3", "datasets>=3.0,<5.3", "pyarrow>=15", "decord; python_version < '3'"])
    assert problems == ["filelock<4.3: the lock has filelock==4.3.1", "pyarrow>=15: pyarrow is not in the lock"]


@pytest.mark.parametrize("line, message", [("numpy>=2\n", "expected `name==version`"), ("Jinja2==3.1.6\njinja2==3.1.5\n", "pinned twice")])
def test_a_lock_line_that_is_not_one_exact_pin_is_refused(tmp_path, line, message):
    path = tmp_path / "lock.txt"
    path.write_text("# header\n" + line)
    with pytest.raises(ValueError, match=message):
        read_lock(path)


def installed(package: str) -> str | None:
    try:
        return version(package).split("+")[0]
    except PackageNotFoundError:
        return None


@pytest.mark.skipif(os.environ.get("LOCK") == "0", reason="LOCK=0: the newest allowed versions, not the lock")
def test_this_environment_has_every_locked_version():
    """What `bash scripts/setup.sh` (LOCK=1) installs is the lock (the torch pair aside: a working torch is kept)."""
    differing = {name: (pinned, installed(name)) for name, pinned in read_lock(LOCK).items()
                 if name not in TORCH_PAIR and installed(name) != pinned}
    assert differing == {}, "locked vs installed; run `bash scripts/setup.sh`, or export LOCK=0 in an unlocked environment"


def test_the_lock_command_writes_this_environment_as_a_lock(tmp_path):
    path = tmp_path / "lock.txt"
    subprocess.run([sys.executable, "-m", "lmms_simignore", "lock", "--write", str(path), "--tested-with", "a test"],
                   check=True, capture_output=True, timeout=120)
    written = read_lock(path)
    assert written["transformers"] == installed("transformers") and written["torch"] == installed("torch")
    assert not set(NOT_LOCKED) & set(written)
    assert "# Tested: a test;" in path.read_text()
