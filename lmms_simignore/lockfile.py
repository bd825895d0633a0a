"""The tested lock: the exact version of every package that the test suite passed with.

    requirements/lock-py311-cpu.txt     # header lines start with '#', then one `name==version` per line

`scripts/setup.sh` installs exactly these packages (`pip install --no-deps -r`), so the README's commands
get what CI tested; `LOCK=0` resolves the newest versions that pyproject.toml's bounds allow instead.
`scripts/refresh-lock.sh` re-resolves in a fresh environment, runs the tests and rewrites the lock with
`python -m lmms_simignore lock --write FILE` only when they pass.

torch and torchvision are locked as a pair that imports together (transformers' Qwen-VL, OneVision and InternVL
processors need torchvision); setup installs them first, together, unless a torch already imports. Left out on
purpose: this package itself, pip, timm (lmms-eval requires it, nothing on our path imports it), and the packages of
torch's own build (`nvidia-*`, `cuda-*`, `triton`: the torch wheel pins them exactly, and a GPU user's own build has
others).
"""

from __future__ import annotations

import platform
import re
import sys
from datetime import date
from importlib.metadata import distributions
from pathlib import Path

LOCK_FILE = "requirements/lock-py311-cpu.txt"
NOT_LOCKED = ("lmms-simignore", "pip", "timm")
TORCH_PAIR = ("torch", "torchvision")  # installed first, together, by scripts/setup.sh
TORCH_BUILD_PREFIXES = ("nvidia-", "cuda-", "triton")  # pinned by the torch wheel itself


def is_locked(name: str) -> bool:
    """Whether a (canonical) distribution name belongs in the lock."""
    return name not in NOT_LOCKED and not name.startswith(TORCH_BUILD_PREFIXES)


def canonical_name(name: str) -> str:
    """PyPI's normalised project name: 'Jinja2' -> 'jinja2', 'typing_extensions' -> 'typing-extensions'."""
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (with its local label, e.g. 2.13.0+cpu), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def read_lock(path: str | Path) -> dict[str, str]:
    """{canonical name: version} from a lock file; refuses lines that are not `name==version`."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected `name==version`, got {line!r}")
        name = canonical_name(match.group(1))
        if name in pins:
            raise ValueError(f"{path}:{number}: {name} is pinned twice")
        pins[name] = match.group(2)
    return pins


def installed_packages() -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment that `is_locked`; a local version label
    is dropped (torch 2.14.1+cu130 -> 2.14.1, which another build of the same release satisfies)."""
    found = {}
    for distribution in distributions():
        name = canonical_name(distribution.metadata["Name"])
        if is_locked(name):
            found[name] = distribution.version.split("+")[0]
    return dict(sorted(found.items()))


def lock_text(packages: dict[str, str], tested_with: str) -> str:
    """The lock file: a header saying what it was tested on and how it is refreshed, then the pins."""
    header = [
        "# lmms-simignore: the tested lock. Every package the test suite passed with, at its exact version.",
        f"# Tested: {tested_with}; Python {platform.python_version()} on {sys.platform} {platform.machine()}, {date.today().isoformat()}.",
        "# Installed by scripts/setup.sh (LOCK=0 for the newest versions the bounds allow);",
        "# refreshed by scripts/refresh-lock.sh (re-resolve, run the tests, rewrite only when they pass).",
        f"# Not locked on purpose: {', '.join(NOT_LOCKED)}, and torch's own build ({', '.join(p + '*' for p in TORCH_BUILD_PREFIXES)}; see lmms_simignore/lockfile.py).",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in packages.items()]) + "\n"


def unsatisfied_bounds(lock: dict[str, str], requirements: list[str]) -> list[str]:
    """The requirements (PEP 508 strings, e.g. pyproject's dependencies) that a locked version violates or that
    name a package the lock lacks; markers are evaluated for this interpreter."""
    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonical_name(requirement.name)
        if name not in lock:
            problems.append(f"{text}: {name} is not in the lock")
        elif not requirement.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{text}: the lock has {name}=={lock[name]}")
    return problems
