"""lmms-eval entry point: makes `--model llava_simignore` resolve to our classes after `pip install`."""

from __future__ import annotations


def llava_simignore_manifest():
    """The `lmms_eval.models` entry point: simple class (`--force_simple`) and chat class (default)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="llava_simignore",
        simple_class_path="lmms_simignore.models.llava_simignore.LlavaSimignore",
        chat_class_path="lmms_simignore.models.llava_simignore.LlavaSimignoreChat",
    )
