"""`python -m lmms_simignore selfcheck`: prove in seconds that this environment can evaluate.

One real lmms-eval evaluation through the main job's path (a generated shapes task folder, the
`lmms-eval` CLI in a subprocess, results and token accounting read back): the shipped model, the first
two held-out questions, the main job's stacked row (Simignore before the LLM, FastV inside it), so the
engine's calls into transformers run too. `scripts/setup.sh` ends with it: when an upstream release
breaks lmms-eval or us, setup stops and names the failing import, the package it belongs to, its
installed and locked versions and what to do, instead of the main job failing half-way.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from importlib.metadata import packages_distributions
from pathlib import Path

from lmms_simignore.evaluation.runs import LmmsEvalFailed
from lmms_simignore.lockfile import NOT_LOCKED, canonical_name, installed_version, read_lock

SELFCHECK_QUESTIONS = 2
SELFCHECK_ROW = "simignore_32+fastv_8"  # one of the main job's rows: both kinds of stage

MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")
MISSING_NAME = re.compile(r"cannot import name '\w+' from '([\w.]+)'")
MISSING_OPERATOR = re.compile(r"operator (\w+)::\w+ does not exist")


def failing_module(error_line: str) -> str | None:
    """The module an error line blames: `No module named 'filelock._api'` -> 'filelock._api'; a missing
    torch operator `torchvision::nms` -> 'torchvision'; None when the line names no module."""
    for pattern in (MISSING_MODULE, MISSING_NAME, MISSING_OPERATOR):
        found = pattern.search(error_line)
        if found:
            return found.group(1)
    return None


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides `module`'s top-level package ('filelock._api' -> 'filelock')."""
    top = module.split(".")[0]
    names = packages_distributions().get(top)
    return names[0] if names else None


def diagnose(error_line: str | None, lock: dict[str, str] | None) -> list[str]:
    """Lines that explain a failed evaluation: the package behind the failing import, its installed and
    locked versions, and what to do. `lock` maps canonical package names to locked versions."""
    module = failing_module(error_line or "")
    if module is None:
        return ["what to do: read the full log above; if a package was upgraded since the lock was tested, "
                "install the lock (bash scripts/setup.sh, LOCK=1 is the default)"]
    distribution = distribution_of(module)
    if distribution is None:
        return [f"package: nothing installed provides {module.split('.')[0]!r}",
                "what to do: install the tested lock (bash scripts/setup.sh, LOCK=1 is the default)"]
    name, installed = canonical_name(distribution), installed_version(distribution)
    if name in NOT_LOCKED:
        return [f"package: {module!r} belongs to {name} {installed}, which lmms-eval requires but nothing here imports",
                f"what to do: `pip uninstall {name}` (setup removes it when it cannot import), or install the {name} "
                f"build made for this torch"]
    locked = (lock or {}).get(name)
    if name == "torchvision":
        torch_installed = installed_version("torch")
        pair = f"torch=={(lock or {}).get('torch')} with torchvision=={locked}" if locked else "torch with its torchvision"
        return [f"package: {module!r} belongs to torchvision {installed}, which does not work next to torch "
                f"{torch_installed}",
                f"what to do: install the torchvision release made for this torch (the tested lock pairs {pair}; "
                f"bash scripts/setup.sh installs that pair when no torch imports)"]
    if locked is not None and locked != (installed or "").split("+")[0]:
        return [f"package: {module!r} belongs to {name} {installed}; the tested lock has {name}=={locked}",
                f"what to do: install the tested lock (bash scripts/setup.sh, LOCK=1 is the default), "
                f"or `pip install '{name}=={locked}'`"]
    known = f" (the tested lock has the same {name}=={locked})" if locked is not None else " (not in the tested lock)"
    return [f"package: {module!r} belongs to {name} {installed}{known}",
            f"what to do: {name} {installed} does not work with this lmms-eval/torch; install a version that does "
            f"(the lock's, or see the bounds in pyproject.toml) and report it"]


def run_selfcheck(workdir: str | Path = "outputs/selfcheck", lock_path: str | Path | None = None, echo=print) -> int:
    """Evaluate the selfcheck row through lmms-eval afresh in `workdir` (its log stays there); 0 when it
    answered every question, 1 otherwise, with a diagnosis."""
    from lmms_simignore.evaluation.demo import demo_config
    from lmms_simignore.evaluation.sweep import run_sweep

    config = demo_config(SELFCHECK_QUESTIONS, batch_size=SELFCHECK_QUESTIONS)
    config = replace(config, name="selfcheck", rows=tuple(row for row in config.rows if row.name == SELFCHECK_ROW))
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # a check reuses nothing
    try:
        (summary,) = run_sweep(config, workdir, echo=lambda line: None, show_table=False)
    except LmmsEvalFailed as failure:
        echo(f"selfcheck: FAILED, lmms-eval could not evaluate {config.model_args['pretrained']}")
        echo(f"----- the last lines of its output -----\n{failure.tail}\n-----")
        echo(str(failure))
        lock = read_lock(lock_path) if lock_path is not None and Path(lock_path).is_file() else None
        for line in diagnose(failure.first_error, lock):
            echo(f"  {line}")
        return 1
    task = config.tasks
    answers = summary["answers"][task]
    if len(answers) != SELFCHECK_QUESTIONS:
        echo(f"selfcheck: FAILED, lmms-eval answered {len(answers)} of {SELFCHECK_QUESTIONS} questions (outputs: {workdir})")
        return 1
    echo(f"selfcheck: ok, lmms-eval evaluated {config.model_args['pretrained']} ({SELFCHECK_ROW}) on "
         f"{SELFCHECK_QUESTIONS} {task} questions (answers {answers})")
    return 0
