"""`internvl_simignore`: the lmms-eval model class hosting InternVL3 checkpoints (transformers' `InternVLForConditionalGeneration`)
with visual-token reduction.

With `reduction=none` it answers exactly as lmms-eval 0.7.3's own `internvl_hf` (`models/chat/internvl_hf.py`, the
only lmms-eval InternVL class built on transformers' classes; `internvl3`, `internvl2` and `internvl` run the original
repository's remote code): a chat class only, the task's messages through the checkpoint's chat template with no system
turn added, 1..12 tiles per image, bfloat16, 1024 new tokens when the task sets none, no stop strings. Unlike it, ours
batches (left-padded; batch 4 = batch 1) and propagates errors instead of answering "".
"""

from __future__ import annotations

from loguru import logger

from lmms_simignore import engine
from lmms_simignore.engine.accounting import layer_runs
from lmms_simignore.families import internvl
from lmms_simignore.models.base import PromptRequest, ReducingModel, check_images, check_positive_int
from lmms_simignore.settings import Plan, ReductionSettings
from lmms_simignore.shipped import resolve_pretrained

DEFAULT_PRETRAINED = "OpenGVLab/InternVL3_5-8B-HF"  # lmms-eval's internvl_hf default
# the model_args of loading besides the reduction settings' and llava_simignore's: values, meaning (the README's table)
LOADER_ARGUMENTS = {
    "min_patches": ("`1`", "the fewest tiles an image is cut into (lmms-eval's internvl_hf: 1)"),
    "max_patches": ("`12`", "the most tiles an image is cut into, a thumbnail added when more than one (lmms-eval's: 12)"),
}


class InternVLSimignoreChat(ReducingModel):
    """lmms-eval "chat" model for InternVL3 (see the module docstring).

    model_args: pretrained, revision, device, device_map, dtype, batch_size, attn_implementation, use_cache, min_patches,
    max_patches, max_new_tokens, seed, token_log, preset, and the reduction settings (`ReductionSettings`).
    """

    is_simple = False
    model_name = "internvl_simignore"
    default_max_new_tokens = 1024
    stop_strings = "none"

    def _setup(
        self,
        pretrained: str = DEFAULT_PRETRAINED,
        revision: str = "main",
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "bfloat16",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        use_cache: bool = True,
        min_patches: int = 1,
        max_patches: int = 12,
        max_new_tokens: int | None = None,
        seed: int = 0,
        token_log: str | None = None,
        **reduction_args,
    ) -> None:
        settings = self._settings_from(reduction_args, seed, batch_size, max_new_tokens, token_log, use_cache, dtype)
        check_positive_int("min_patches", min_patches, "tiles per image")
        check_positive_int("max_patches", max_patches, "tiles per image")
        if min_patches > max_patches:
            raise ValueError(f"min_patches={min_patches} exceeds max_patches={max_patches}")
        self.min_patches, self.max_patches = min_patches, max_patches

        from transformers import AutoConfig, AutoProcessor

        pretrained = resolve_pretrained(str(pretrained))
        config = AutoConfig.from_pretrained(pretrained, revision=revision)
        if config.model_type not in internvl.MODEL_TYPES:
            raise ValueError(f"internvl_simignore hosts InternVLForConditionalGeneration checkpoints (model_type "
                             f"'internvl'); pretrained={pretrained!r} has model_type {config.model_type!r}")
        self._load(pretrained, config, revision, device, device_map, dtype, attn_implementation, settings)
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.pretrained = pretrained
        logger.info(
            f"internvl_simignore: {pretrained} on {self._device}, {min_patches}..{max_patches} tiles per image, {self.settings}; "
            f"image tokens visible per layer (requested, for an image of {max_patches} tiles): "
            f"{layer_runs(self.requested_visible_per_layer)}"
        )

    def _plan_for(self, settings: ReductionSettings) -> Plan:
        """The settings' stages for the largest image; each batch's images are then planned for their own sizes."""
        return internvl.nominal_plan(self.config, settings, self.max_patches)

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[2] if callable(args[1]) else args[1]

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Chat request (context, doc_to_messages, gen_kwargs, doc_id, task, split) -> prompt; a log-likelihood request
        (context, continuation, doc_to_visual, ...) becomes one user turn of its images and text."""
        if callable(args[1]):
            doc, _, images, messages = self._chat_request(args)
            user_text = self._user_text(messages)
        else:
            context, _, doc_to_visual, doc_id, task, split = args
            doc = self.task_dict[task][split][doc_id]
            images = check_images(doc_to_visual(doc), task, doc_id, self.model_name)
            user_text = context.replace("<image>", "").strip()
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": user_text}]}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return PromptRequest(prompt, images, self._comparison_text(doc, user_text, args[4]), args[3], args[4])

    def _encode_batch(self, batch: list[PromptRequest], texts: list[str] | None = None):
        images = [image for request in batch for image in request.images]
        inputs = self.processor(images=images or None, text=texts or [request.prompt for request in batch], padding=True,
                                return_tensors="pt", min_patches=self.min_patches, max_patches=self.max_patches)
        return inputs.to(self._device)

    def _reduce(self, batch: list[PromptRequest], inputs) -> tuple[engine.ReducedPrompt, list]:
        return self._reduce_each_image(internvl.embed_prompt, batch, inputs)

    def _decode(self, tokens) -> list[str]:
        return self.processor.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
