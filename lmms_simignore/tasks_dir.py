"""Where the shipped lmms-eval task YAMLs live once the package is installed."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def tasks_dir() -> Path:
    """Folder to pass to `lmms-eval --include_path` (also printed by `python -m lmms_simignore tasks-dir`)."""
    return Path(str(files("lmms_simignore.tasks")))
