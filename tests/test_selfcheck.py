"""Setup's evaluation check, and how a failed lmms-eval run is reported by every command that runs one.

A broken upstream release is simulated the way filelock 4.3 broke lmms-eval 0.7.3: a `sitecustomize`
on PYTHONPATH makes `import filelock._api` fail (filelock itself keeps working), in the subprocesses only.
"""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from lmms_simignore.evaluation.runs import first_error_line
from lmms_simignore.evaluation.selfcheck import diagnose, distribution_of, failing_module

BLOCK_FILELOCK_API = '''
import importlib, importlib.abc, pkgutil, sys
import filelock
for info in pkgutil.iter_modules(filelock.__path__):  # load filelock whole, under its own names
    try:
        importlib.import_module("filelock." + info.name)
    except ImportError:
        pass
del sys.modules["filelock._api"]

class BlockFilelockApi(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "filelock._api":
            raise ModuleNotFoundError("No module named 'filelock._api'", name=name)
        return None

sys.meta_path.insert(0, BlockFilelockApi())
'''


@pytest.fixture
def broken_filelock_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_FILELOCK_API)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def python_m(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmms_simignore", *args], capture_output=True, text=True, env=env, timeout=timeout)


LMMS_EVAL_FAILURE = """\
\x1b[32m2026-11-26 16:07:27\x1b[0m | \x1b[1mINFO    \x1b[0m | lmms_eval.__main__:cli_evaluate:516 - Verbosity set to INFO
/site-packages/transformers/utils/generic.py:1: FutureWarning: `past_key_values` is deprecated
Loading weights: 100%|##########| 82/82
Traceback (most recent call last):
  File "/site-packages/lmms_eval/evaluator.py", line 134, in _enable_reentrant_filelocks
    import filelock._api as _fl_api
ModuleNotFoundError: No module named 'filelock._api'
\x1b[32m2026-11-26 16:07:31\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | lmms_eval.__main__:cli_evaluate:614 - \
Error during evaluation: No module named 'filelock._api'. Please set `--verbosity=DEBUG` to get more information.
"""


@pytest.mark.parametrize(
    "output, first",
    [
        (LMMS_EVAL_FAILURE, "ModuleNotFoundError: No module named 'filelock._api'"),
        ("2026-11-26 | ERROR    | lmms_eval.__main__:cli_evaluate:614 - Tasks not found: shapes_x\n", "Tasks not found: shapes_x"),
        ("Traceback (most recent call last):\nRuntimeError: operator torchvision::nms does not exist\n\nThe above exception "
         "was the direct cause of the following exception:\n\nModuleNotFoundError: Could not import module 'AutoProcessor'.\n",
         "RuntimeError: operator torchvision::nms does not exist"),
        ("2026-11-26 | INFO | lmms_eval:run:1 - ok\nx.py:3: UserWarning: careful\n", None),
    ],
    ids=["traceback", "logged-error", "chained-cause-first", "no-error"],
)
def test_the_first_error_line_of_lmms_eval_output(output, first):
    assert first_error_line(output) == first


@pytest.mark.parametrize(
    "line, module",
    [
        ("ModuleNotFoundError: No module named 'filelock._api'", "filelock._api"),
        ("ImportError: cannot import name 'LlavaConfig' from 'transformers.models' (...)", "transformers.models"),
        ("RuntimeError: operator torchvision::nms does not exist", "torchvision"),
        ("ValueError: keep=999 is more than the 16 image tokens per image", None),
    ],
)
def test_the_module_an_error_line_blames(line, module):
    assert failing_module(line) == module


def test_a_module_is_traced_to_the_package_that_installs_it():
    assert distribution_of("filelock._api").lower() == "filelock"
    assert distribution_of("yaml").lower() == "pyyaml"
    assert distribution_of("no_such_module_anywhere") is None


def test_the_diagnosis_names_the_package_its_version_and_the_locked_one():
    installed = version("filelock")
    lines = diagnose("ModuleNotFoundError: No module named 'filelock._api'", {"filelock": "0.0.1"})
    assert lines[0] == f"package: 'filelock._api' belongs to filelock {installed}; the tested lock has filelock==0.0.1"
    assert "pip install 'filelock==0.0.1'" in lines[1]
    same = diagnose("ModuleNotFoundError: No module named 'filelock._api'", {"filelock": installed})
    assert "the tested lock has the same" in same[0] and "does not work with this lmms-eval/torch" in same[1]


def test_the_diagnosis_of_a_broken_torchvision_names_the_torch_it_must_match(monkeypatch):
    from lmms_simignore.evaluation import selfcheck

    monkeypatch.setattr(selfcheck, "distribution_of", lambda module: "torchvision")
    monkeypatch.setattr(selfcheck, "installed_version", {"torchvision": "0.28.0", "torch": "2.13.0+cpu"}.get)
    lines = diagnose("RuntimeError: operator torchvision::nms does not exist", {"torch": "2.14.1", "torchvision": "0.29.1"})
    assert lines[0] == "package: 'torchvision' belongs to torchvision 0.28.0, which does not work next to torch 2.13.0+cpu"
    assert "the tested lock pairs torch==2.14.1 with torchvision==0.29.1" in lines[1]


def test_a_local_version_label_is_not_taken_for_a_different_version(monkeypatch):
    from lmms_simignore.evaluation import selfcheck

    monkeypatch.setattr(selfcheck, "distribution_of", lambda module: "torch")
    monkeypatch.setattr(selfcheck, "installed_version", lambda distribution: "2.13.0+cpu")
    assert "the tested lock has the same torch==2.13.0" in diagnose("ImportError: cannot import name 'x' from 'torch.y'", {"torch": "2.13.0"})[0]


def test_selfcheck_evaluates_the_shipped_model_through_lmms_eval(tmp_path):
    completed = python_m("selfcheck", "--workdir", str(tmp_path / "check"))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "selfcheck: ok, lmms-eval evaluated shipped:shapes-llava (simignore_32+fastv_8) on 2 shapes_heldout questions" in completed.stdout
    assert len(list((tmp_path / "check").rglob("*_samples_shapes_heldout.jsonl"))) == 1


def test_selfcheck_names_the_package_behind_a_broken_import(tmp_path, broken_filelock_env):
    lock = tmp_path / "lock.txt"
    lock.write_text("# a lock\nfilelock==0.0.1\n")
    completed = python_m("selfcheck", "--workdir", str(tmp_path / "check"), "--lock", str(lock), env=broken_filelock_env)
    assert completed.returncode == 1
    assert "lmms-eval run 'simignore_32+fastv_8' failed: ModuleNotFoundError: No module named 'filelock._api'" in completed.stdout
    assert f"belongs to filelock {version('filelock')}; the tested lock has filelock==0.0.1" in completed.stdout
    assert (tmp_path / "check" / "simignore_32+fastv_8.partial" / "lmms_eval.log").is_file()  # the full log stays


@pytest.mark.parametrize("command", [("demo", "--num-questions", "2"), ("regression",)], ids=["demo", "regression"])
def test_commands_exit_non_zero_with_the_first_error_when_lmms_eval_fails(tmp_path, broken_filelock_env, command):
    completed = python_m(*command, "--workdir", str(tmp_path / "work"), env=broken_filelock_env)
    assert completed.returncode == 1
    assert "error: lmms-eval run 'none' failed: ModuleNotFoundError: No module named 'filelock._api'" in completed.stderr
    assert "Traceback" not in completed.stderr  # a message, not a crash


def test_sweep_exits_non_zero_with_our_own_refusal_as_the_first_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\ntasks: shapes_heldout\nshapes_task: {questions: 2}\nmodel_args: {pretrained: shipped:shapes-llava}\n"
                      "rows:\n  - {name: too_many, model_args: {reduction: simignore, keep: 99}}\n")
    completed = python_m("sweep", str(config), "--output", str(tmp_path / "out"))
    assert completed.returncode == 1
    assert "error: lmms-eval run 'too_many' failed: ValueError: keep=99" in completed.stderr
