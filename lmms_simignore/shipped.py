"""What the package ships: the lmms-eval task YAMLs and the trained testbed model."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED_PREFIX = "shipped:"
SHIPPED_MODELS = ("shapes-llava",)  # under lmms_simignore/testbed/


def tasks_dir() -> Path:
    """Folder to pass to `lmms-eval --include_path` (also printed by `python -m lmms_simignore tasks-dir`)."""
    return Path(str(files("lmms_simignore.tasks")))


def shipped_model_dir(name: str) -> Path:
    """Folder of a model shipped with the package (`shapes-llava`: the trained shapes testbed)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    return Path(str(files("lmms_simignore"))) / "testbed" / name


def resolve_pretrained(pretrained: str) -> str:
    """`shipped:shapes-llava` -> the shipped model's folder; an existing folder or a Hugging Face hub id unchanged.

    Anything else (a path that does not exist, a file) is refused before any download is attempted.
    A colon cannot appear in a hub id, so the prefix never shadows a hub model.
    """
    if pretrained.startswith(SHIPPED_PREFIX):
        return str(shipped_model_dir(pretrained[len(SHIPPED_PREFIX):]))
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"pretrained={pretrained!r} is a file; give the checkpoint's folder, a hub id (owner/name) or "
                         f"{SHIPPED_PREFIX}NAME ({', '.join(SHIPPED_MODELS)})")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        raise ValueError(f"pretrained={pretrained!r}: no such folder, and not a Hugging Face hub id (owner/name); give an "
                         f"existing checkpoint folder, a hub id or {SHIPPED_PREFIX}NAME ({', '.join(SHIPPED_MODELS)})") from None
    return pretrained
