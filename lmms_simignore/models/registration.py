"""lmms-eval entry points: make `--model llava_simignore` (and `qwen2_vl_simignore`, `qwen2_5_vl_simignore`,
`qwen3_vl_simignore`, `internvl_simignore`) resolve to our classes after `pip install`."""

from __future__ import annotations


def llava_simignore_manifest():
    """The `lmms_eval.models` entry point: simple class (`--force_simple`) and chat class (default)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="llava_simignore",
        simple_class_path="lmms_simignore.models.llava_simignore.LlavaSimignore",
        chat_class_path="lmms_simignore.models.llava_simignore.LlavaSimignoreChat",
    )


def qwen2_vl_simignore_manifest():
    """`--model qwen2_vl_simignore`: a simple class only, as lmms-eval's own `qwen2_vl`."""
    return _qwen_manifest("qwen2_vl", "Qwen2VLSimignore", None)


def qwen2_5_vl_simignore_manifest():
    """`--model qwen2_5_vl_simignore`: the chat class by default, the simple one with `--force_simple`."""
    return _qwen_manifest("qwen2_5_vl", "Qwen2_5_VLSimignore", "Qwen2_5_VLSimignoreChat")


def qwen3_vl_simignore_manifest():
    """`--model qwen3_vl_simignore`: the chat class by default, the simple one with `--force_simple`."""
    return _qwen_manifest("qwen3_vl", "Qwen3VLSimignore", "Qwen3VLSimignoreChat")


def internvl_simignore_manifest():
    """`--model internvl_simignore`: a chat class only, as lmms-eval's own `internvl_hf`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="internvl_simignore",
                         chat_class_path="lmms_simignore.models.internvl_simignore.InternVLSimignoreChat")


def _qwen_manifest(model_id: str, simple: str, chat: str | None):
    from lmms_eval.models.registry_v2 import ModelManifest

    module = "lmms_simignore.models.qwen_vl_simignore"
    return ModelManifest(model_id=f"{model_id}_simignore", simple_class_path=f"{module}.{simple}",
                         chat_class_path=f"{module}.{chat}" if chat else None)
