"""`qwen2_vl_simignore`, `qwen2_5_vl_simignore`, `qwen3_vl_simignore`: lmms-eval model classes hosting Qwen2-VL,
Qwen2.5-VL and Qwen3-VL checkpoints with visual-token reduction.

With `reduction=none` each answers exactly as lmms-eval 0.7.3's own class of the same name does on the same task: the
same messages and system prompt, the same image resizing (through `qwen_vl_utils.process_vision_info`, as they do,
with their pixel limits, JPEG re-encoding and `do_resize` choices), the same dtype, generation length and answer
trimming. What each built-in class does is one `BuiltinClass` entry below, read in lmms-eval's source
(`models/simple/qwen2_vl.py`, `qwen2_5_vl.py`, `qwen3_vl.py`, `models/chat/qwen2_5_vl.py`, `qwen3_vl.py`). The family
adapter (`lmms_simignore.families.qwen_vl`) embeds a processed batch as the model does; budgets are per image, each
image planned for its own number of tokens (`engine.image_plans`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loguru import logger

from lmms_simignore import engine
from lmms_simignore.engine.accounting import layer_runs
from lmms_simignore.families import qwen_vl
from lmms_simignore.models.base import DTYPES, PromptRequest, ReducingModel, check_images
from lmms_simignore.settings import Plan, ReductionSettings
from lmms_simignore.shipped import resolve_pretrained

IMAGE_PLACEHOLDER = "<image>"
INTERLEAVED_IMAGE = re.compile(r"<image (\d+)>")


@dataclass(frozen=True)
class BuiltinClass:
    """What lmms-eval's own class for a family does, which `reduction=none` reproduces.

    name: its `--model` name; model_type: the checkpoints it loads; pretrained: its default checkpoint; dtype: how it
    loads the weights; min_pixels / max_pixels: its pixel limits (its processor's, and each image's in the simple
    class); patch_size: the ViT patch `process_vision_info` resizes for (images become multiples of 2 x patch);
    jpeg_images: the simple class re-encodes each image as a JPEG (quality 85) data URL first; resizes_again: the
    processor resizes the images `process_vision_info` already resized (within its own limits; else `do_resize=False`);
    simple_max_new_tokens: the simple class's generation length when the task sets none (the chat class's is 128);
    stops: the simple class's use of the task's `until` ("all" / "all but blank lines"; the chat class cuts nothing);
    strips: the simple class strips each answer; chat_system_prompt: the chat class puts the system prompt first;
    chat: whether lmms-eval has a chat class (it is then what `--model NAME` runs).
    """

    name: str
    model_type: str
    pretrained: str
    dtype: str
    min_pixels: int
    max_pixels: int
    patch_size: int
    jpeg_images: bool
    resizes_again: bool
    simple_max_new_tokens: int
    stops: str
    strips: bool
    chat_system_prompt: bool
    chat: bool


BUILTIN_CLASSES = {
    "qwen2_vl": BuiltinClass("qwen2_vl", "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", dtype="auto", min_pixels=3136,
                             max_pixels=602112, patch_size=14, jpeg_images=True, resizes_again=True,
                             simple_max_new_tokens=128, stops="all", strips=True, chat_system_prompt=False, chat=False),
    "qwen2_5_vl": BuiltinClass("qwen2_5_vl", "qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16",
                               min_pixels=256 * 28 * 28, max_pixels=1605632, patch_size=14, jpeg_images=True,
                               resizes_again=True, simple_max_new_tokens=32768, stops="all but blank lines", strips=False,
                               chat_system_prompt=False, chat=True),
    "qwen3_vl": BuiltinClass("qwen3_vl", "qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct", dtype="bfloat16",
                             min_pixels=256 * 28 * 28, max_pixels=1605632, patch_size=16, jpeg_images=False,
                             resizes_again=False, simple_max_new_tokens=128, stops="all but blank lines", strips=False,
                             chat_system_prompt=True, chat=True),
}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# the model_args of loading and decoding besides the reduction settings': values, meaning (the README's table)
LOADER_ARGUMENTS = {
    "pretrained": ("lmms-eval's default for the family", "a checkpoint of the family (hub id or folder; safetensors only)"),
    "dtype": ("lmms-eval's: `auto` (Qwen2-VL), `bfloat16` (Qwen2.5-VL, Qwen3-VL) | " + " | ".join(f"`{name}`" for name in DTYPES),
              "weights dtype"),
    "min_pixels": ("lmms-eval's: 3136 (Qwen2-VL), 200704", "each image is resized to at least this many pixels"),
    "max_pixels": ("lmms-eval's: 602112 (Qwen2-VL), 1605632", "... and at most this many (both: the processor's limits too)"),
    "system_prompt": (f"`{DEFAULT_SYSTEM_PROMPT}`", "the system turn (the chat Qwen2.5-VL class, as lmms-eval's, adds none)"),
    "interleave_visuals": ("`false`", "place images at the text's `<image N>` markers instead of before the text"),
    "reasoning_prompt": ("none", "text appended to each question (simple classes)"),
    "enable_thinking": ("none", "Qwen3-VL's chat template switch; the answer keeps what follows `</think>`"),
}


class QwenVLSimignore(ReducingModel):
    """lmms-eval "simple" model for one Qwen-VL family (`builtin` says which): the system prompt, then the doc's images
    and its text in one user turn, as lmms-eval's own class builds them.

    model_args: pretrained, revision, device, device_map, dtype, batch_size, attn_implementation, use_cache,
    min_pixels, max_pixels, system_prompt, interleave_visuals, reasoning_prompt, enable_thinking (Qwen3-VL),
    max_new_tokens, seed, token_log, preset, and the reduction settings (`ReductionSettings`).
    """

    is_simple = True
    builtin: BuiltinClass = BUILTIN_CLASSES["qwen2_5_vl"]

    @property
    def model_name(self) -> str:
        return f"{self.builtin.name}_simignore"

    def _setup(
        self,
        pretrained: str | None = None,
        revision: str = "main",
        device: str | None = None,
        device_map: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        use_cache: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        interleave_visuals: bool = False,
        reasoning_prompt: str | None = None,
        enable_thinking: bool | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        token_log: str | None = None,
        **reduction_args,
    ) -> None:
        builtin = self.builtin
        dtype = builtin.dtype if dtype is None else dtype
        settings = self._settings_from(reduction_args, seed, batch_size, max_new_tokens, token_log, use_cache, dtype)
        self.min_pixels = builtin.min_pixels if min_pixels is None else min_pixels
        self.max_pixels = builtin.max_pixels if max_pixels is None else max_pixels
        for name, value in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        if enable_thinking is not None and builtin.model_type != "qwen3_vl":
            raise ValueError(f"enable_thinking switches Qwen3-VL's chat template; {self.model_name} hosts {builtin.model_type}")
        self.system_prompt = system_prompt
        self.interleave_visuals = bool(interleave_visuals)
        self.reasoning_prompt = reasoning_prompt.replace("\\n", "\n") if reasoning_prompt else None
        self.enable_thinking = enable_thinking

        from transformers import AutoConfig, AutoProcessor

        pretrained = resolve_pretrained(str(pretrained or builtin.pretrained))
        config = AutoConfig.from_pretrained(pretrained, revision=revision)
        if config.model_type != builtin.model_type:
            others = {"llava": "llava_simignore", **{kind: f"{kind}_simignore" for kind in BUILTIN_CLASSES}}
            hint = f"; for it use --model {others[config.model_type]}" if config.model_type in others else ""
            raise ValueError(f"{self.model_name} hosts {builtin.model_type} checkpoints; pretrained={pretrained!r} has "
                             f"model_type {config.model_type!r}{hint}")
        self._load(pretrained, config, revision, device, device_map, dtype, attn_implementation, settings)
        try:
            self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision, min_pixels=self.min_pixels,
                                                           max_pixels=self.max_pixels)
        except (ImportError, AttributeError) as error:  # transformers' Qwen-VL processors need torchvision
            raise ImportError(f"{self.model_name}: the {builtin.model_type} processor could not be built ({error}); it "
                              f"needs torchvision, the release made for the installed torch (bash scripts/setup.sh "
                              f"installs the tested pair)") from error
        self.processor.tokenizer.padding_side = "left"
        self.pretrained = pretrained
        logger.info(
            f"{self.model_name}: {pretrained} on {self._device}, images of {self.min_pixels}..{self.max_pixels} pixels, "
            f"{self.settings}; image tokens visible per layer (requested, for an image at max_pixels): "
            f"{layer_runs(self.requested_visible_per_layer)}"
        )

    @property
    def default_max_new_tokens(self) -> int:
        return self.builtin.simple_max_new_tokens

    @property
    def stop_strings(self) -> str:
        return self.builtin.stops

    @property
    def strip_answers(self) -> bool:
        return self.builtin.strips

    def _plan_for(self, settings: ReductionSettings) -> Plan:
        """The settings' stages for the largest image this model takes (max_pixels); each batch's images are then
        planned for their own sizes (`engine.image_plans`)."""
        return qwen_vl.nominal_plan(self.config, settings, self.max_pixels)

    # -- prompts -------------------------------------------------------------------------------------------------------
    def _image_entry(self, image) -> dict:
        """A message part for one image, as the built-in simple class writes it (its pixel limits; a JPEG data URL
        where it re-encodes)."""
        if self.builtin.jpeg_images:
            from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url

            image = encode_image_to_data_url(image, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True, quality=85)
        return {"type": "image", "image": image, "max_pixels": self.max_pixels, "min_pixels": self.min_pixels}

    def _user_content(self, context: str, images: list[dict], task: str, doc_id: int) -> list[dict]:
        """The user turn: the images then the text, or (interleave_visuals) each `<image N>` marker replaced by image N."""
        if not self.interleave_visuals:
            return images + [{"type": "text", "text": context}]
        texts = INTERLEAVED_IMAGE.split(context)[::2]
        content = [{"type": "text", "text": texts[0]}] if texts[0] else []
        for number, text in zip(INTERLEAVED_IMAGE.findall(context), texts[1:]):
            if not 1 <= int(number) <= len(images):
                raise ValueError(f"task {task} doc {doc_id}: the text names <image {number}>, but the doc has {len(images)} image(s)")
            content.append(images[int(number) - 1])
            if text:
                content.append({"type": "text", "text": text})
        return content

    def _rendered(self, messages: list[dict]) -> tuple[str, list]:
        """The templated prompt of `messages` and its images as `qwen_vl_utils` resizes them."""
        from qwen_vl_utils import process_vision_info

        options = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
        images, videos = process_vision_info(messages, image_patch_size=self.builtin.patch_size)
        if videos:
            raise ValueError(f"{self.model_name} takes images only, got a video")
        return prompt, images or []

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Simple request (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> prompt."""
        context, _, doc_to_visual, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        images = check_images(doc_to_visual(doc), task, doc_id, self.model_name)
        context = context.replace(IMAGE_PLACEHOLDER, "")
        if self.reasoning_prompt:
            context = context.strip() + self.reasoning_prompt
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": self._user_content(context, [self._image_entry(image) for image in images], task, doc_id)})
        prompt, resized = self._rendered(messages)
        return PromptRequest(prompt, resized, self._comparison_text(doc, context.strip(), task), doc_id, task)

    # -- the engine ----------------------------------------------------------------------------------------------------
    def _encode_batch(self, batch: list[PromptRequest], texts: list[str] | None = None):
        images = [image for request in batch for image in request.images]
        options = {} if self.builtin.resizes_again else {"do_resize": False}
        inputs = self.processor(text=texts or [request.prompt for request in batch], images=images or None,
                                padding=True, padding_side="left", return_tensors="pt", **options)
        return inputs.to(self._device)

    def _reduce(self, batch: list[PromptRequest], inputs) -> tuple[engine.ReducedPrompt, list]:
        return self._reduce_each_image(qwen_vl.embed_prompt, batch, inputs)

    def _decode(self, tokens) -> list[str]:
        answers = self.processor.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if self.enable_thinking:
            answers = [answer.partition("</think>")[2].strip() for answer in answers]
        return answers


class QwenVLSimignoreChat(QwenVLSimignore):
    """lmms-eval "chat" model: the task's messages as they are (Qwen3-VL: after the system prompt), images at the
    default limits of `qwen_vl_utils` and then the processor's, generation to 128 tokens, no stop strings: as lmms-eval's
    own chat class."""

    is_simple = False
    default_max_new_tokens = 128
    stop_strings = "none"
    strip_answers = False

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[2]

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Chat request (context, doc_to_messages, gen_kwargs, doc_id, task, split) -> prompt."""
        if not callable(args[1]):  # loglikelihood requests keep the simple layout
            return super()._prompt_request(args)
        system = {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
        doc, chat, _, _ = self._chat_request(args, first=system if self.builtin.chat_system_prompt else None)
        hf_messages = chat.to_hf_messages()  # images as they are: lmms-eval's chat class gives them no pixel limits
        prompt, resized = self._rendered(hf_messages)
        return PromptRequest(prompt, resized, self._comparison_text(doc, self._user_text(hf_messages), args[4]), args[3], args[4])


class Qwen2VLSimignore(QwenVLSimignore):
    builtin = BUILTIN_CLASSES["qwen2_vl"]


class Qwen2_5_VLSimignore(QwenVLSimignore):
    builtin = BUILTIN_CLASSES["qwen2_5_vl"]


class Qwen2_5_VLSimignoreChat(QwenVLSimignoreChat):
    builtin = BUILTIN_CLASSES["qwen2_5_vl"]


class Qwen3VLSimignore(QwenVLSimignore):
    builtin = BUILTIN_CLASSES["qwen3_vl"]


class Qwen3VLSimignoreChat(QwenVLSimignoreChat):
    builtin = BUILTIN_CLASSES["qwen3_vl"]
