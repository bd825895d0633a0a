"""`llava_simignore`: lmms-eval model classes hosting any llava-hf checkpoint with visual-token reduction.

This module loads LLaVA-1.5-style checkpoints (and Mipha, converted) and builds prompts the way lmms-eval's built-in
`llava_hf` does; batching, decoding and accounting are the shared `ReducingModel`'s, and all token selection and
generation happens in `lmms_simignore.engine`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from loguru import logger

from lmms_simignore import engine
from lmms_simignore.engine.accounting import layer_runs
from lmms_simignore.families import llava_next
from lmms_simignore.families.qwen_vl import MODEL_TYPES as QWEN_MODEL_TYPES
from lmms_simignore.models.base import DTYPES, PromptRequest, ReducingModel, check_images
from lmms_simignore.models.mipha import attach_head_bias, converted_folder, hub_mipha_snapshot, is_mipha_folder
from lmms_simignore.models.presets import PRESETS
from lmms_simignore.models.quantization import nf4_quantization_config
from lmms_simignore.settings import Plan, ReductionSettings
from lmms_simignore.shipped import resolve_pretrained

IMAGE_PLACEHOLDER = "<image>"
# the checkpoints it hosts, by model_type: LLaVA-1.5 (and converted Mipha), LLaVA-NeXT and LLaVA-OneVision, as lmms-eval's
# llava_hf does
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
DEFAULT_PRETRAINED = "llava-hf/llava-1.5-7b-hf"

# Vicuna v1 conversation, used when neither `chat_template=` nor the checkpoint provides a template
# (the same conversation format as LLaVA-1.5 and lmms-eval's llava_hf fallback).
VICUNA_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# image_aspect_ratio (a task's generation_kwargs, LLaVA's name for it): "pad" squares each image with the processor's
# mean colour before it is processed, as LLaVA's and Mipha's own evaluations do; "original" leaves it to the processor
IMAGE_ASPECT_RATIOS = ("original", "pad")
QUANTIZATIONS = ("none", "nf4")
# the model_args of loading and decoding (the reduction's come from the settings and the registry): values, meaning
LOADER_ARGUMENTS = {
    "pretrained": (f"`{DEFAULT_PRETRAINED}`", "any `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` or "
                   "`LlavaOnevisionForConditionalGeneration` checkpoint with a Llama, Phi or Qwen2 language model (hub id or "
                   "folder; safetensors only), a Mipha folder in its released layout (converted once), or "
                   "`shipped:shapes-llava`"),
    "revision": ("`main`", "the checkpoint's revision on the hub"),
    "preset": ("none | " + " | ".join(f"`{name}`" for name in PRESETS), "a named set of model_args (see Paper presets); "
               "yours override it"),
    "token_log": ("none", "write per-sample token accounting as JSON lines (`.rankN` appended per process when distributed)"),
    "batch_size": ("`1`", "left-padded batches; answers equal batch size 1"),
    "max_batch_size": ("none", "accepted for lmms-eval's command line; batches are `batch_size`"),
    "device": ("`cuda:LOCAL_RANK` if available, else `cpu`", "where the model runs"),
    "device_map": ("none", "`device_map=auto` spreads one model over GPUs"),
    "dtype": (" | ".join(f"`{name}`" for name in DTYPES), "weights dtype"),
    "quantization": (" | ".join(f"`{name}`" for name in QUANTIZATIONS), "`nf4`: 4-bit weights through bitsandbytes (CUDA "
                     "only; the vision tower stays unquantized)"),
    "attn_implementation": ("transformers' default | `eager` | `sdpa` | `flash_attention_2`", "attention kernel (every "
                            "method reads what it needs from the layers' own parts, so any kernel works)"),
    "use_cache": ("`true`", "KV cache while decoding (ignored and pruned tokens stay hidden at every step either way)"),
    "max_new_tokens": ("the task's", "overrides the task's generation length (the paper presets answer with one token)"),
    "chat_template": ("none", "override the template"),
}


class LlavaSimignore(ReducingModel):
    """lmms-eval "simple" model (prompt = `<image>\\n` + task text in the chat template, like `llava_hf`).

    model_args: pretrained (hub id, local folder, or `shipped:shapes-llava`), revision, device, device_map, dtype, quantization, batch_size,
    attn_implementation, use_cache, chat_template, max_new_tokens, seed, token_log, preset, and the
    reduction settings (`ReductionSettings`): reduction, keep, ignore, apply, stage_positions and the arguments of the
    pipeline's methods (the registry's, `lmms_simignore.methods.registry`).
    """

    is_simple = True
    model_name = "llava_simignore"

    def _setup(
        self,
        pretrained: str = DEFAULT_PRETRAINED,
        revision: str = "main",
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "auto",
        quantization: str = "none",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        use_cache: bool = True,
        chat_template: str | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        token_log: str | None = None,
        **reduction_args,
    ) -> None:
        settings = self._settings_from(reduction_args, seed, batch_size, max_new_tokens, token_log, use_cache, dtype)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
        self.chat_template = chat_template

        from transformers import AutoConfig, AutoProcessor

        pretrained = resolve_pretrained(str(pretrained))
        pretrained = str(hub_mipha_snapshot(pretrained, revision) or pretrained)
        if is_mipha_folder(pretrained):  # a Mipha checkpoint in its released layout: converted once, then loaded
            pretrained, revision = str(converted_folder(pretrained)), "main"
        config = AutoConfig.from_pretrained(pretrained, revision=revision)
        if config.model_type not in MODEL_CLASSES:
            hint = f"; for it use --model {config.model_type}_simignore" if config.model_type in QWEN_MODEL_TYPES else ""
            raise ValueError(
                f"llava_simignore hosts {', '.join(MODEL_CLASSES.values())} checkpoints (model_type "
                f"{' or '.join(repr(kind) for kind in MODEL_CLASSES)}); pretrained={pretrained!r} has model_type "
                f"{config.model_type!r}{hint}"
            )
        engine.check_model_support(config)
        self.config = config
        self.tiled = config.model_type in llava_next.MODEL_TYPES  # images of their own sizes, in tiles
        self.image_tokens_per_image = llava_next.largest_image_tokens(config) if self.tiled else engine.image_tokens_per_image(config)
        self.num_layers = config.text_config.num_hidden_layers
        self._plan_for(settings)  # budgets, layers and what the methods need, before any download

        self._place(device)
        load_kwargs = {}
        if quantization == "nf4":
            load_kwargs["quantization_config"] = nf4_quantization_config(self._device)
            device_map = device_map or {"": str(self._device)}
        import transformers

        self._model = getattr(transformers, MODEL_CLASSES[config.model_type]).from_pretrained(
            pretrained,
            revision=revision,
            dtype=DTYPES[str(dtype)],
            attn_implementation=attn_implementation,
            device_map=device_map or None,
            use_safetensors=True,
            **load_kwargs,
        ).eval()
        attach_head_bias(self._model, pretrained)  # converted Mipha checkpoints: the head's bias
        if not device_map:
            self._model.to(self._device)
        else:
            self._device = self._model.get_input_embeddings().weight.device
        self.use_settings(settings)
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.processor.tokenizer.padding_side = "left"
        self.pretrained = pretrained
        logger.info(
            f"llava_simignore: {pretrained} on {self._device}, {self.image_tokens_per_image} image tokens per image"
            f"{' at the most (tiles)' if self.tiled else ''}, "
            f"{self.settings}; image tokens per image visible per layer (requested): {layer_runs(self.requested_visible_per_layer)}"
        )

    def _plan_for(self, settings: ReductionSettings) -> Plan:
        """The settings' stages on this model; raises on budgets or layers it cannot take, or on what a method needs
        that it cannot give."""
        if self.tiled:  # for the largest image; each batch's images are then planned for their own sizes
            return llava_next.nominal_plan(self.config, settings)
        return engine.plan_for(self.config, settings)

    # -- prompts -------------------------------------------------------------------------------------
    def _template(self) -> str:
        return self.chat_template or self.tokenizer.chat_template or VICUNA_TEMPLATE

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Simple request (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> prompt."""
        context, _, doc_to_visual, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        images = _rgb(check_images(doc_to_visual(doc), task, doc_id, self.model_name))
        text = context
        if images and IMAGE_PLACEHOLDER not in context:
            text = f"{' '.join([IMAGE_PLACEHOLDER] * len(images))}\n{context}"
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=self._template(), tokenize=False, add_generation_prompt=True
        )
        user_text = context.replace(IMAGE_PLACEHOLDER, "").strip()
        return PromptRequest(prompt, images, self._comparison_text(doc, user_text, task), doc_id, task)

    def _prepared(self, batch: list[PromptRequest], gen_kwargs: dict) -> list[PromptRequest]:
        return self._squared(batch, gen_kwargs.get("image_aspect_ratio"))

    def _known_gen_kwargs(self) -> set[str]:
        return super()._known_gen_kwargs() | {"image_aspect_ratio"}

    def _squared(self, batch: list[PromptRequest], aspect: str | None) -> list[PromptRequest]:
        """With image_aspect_ratio=pad, each image padded to a square (centred) with the image processor's mean colour."""
        if aspect in (None, "original"):
            return batch
        if aspect not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"generation kwarg image_aspect_ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}; got {aspect!r}")
        colour = tuple(int(mean * 255) for mean in self.processor.image_processor.image_mean)
        return [dataclasses.replace(request, images=[pad_to_square(image, colour) for image in request.images]) for request in batch]

    # -- the engine ----------------------------------------------------------------------------------
    def _encode_batch(self, batch: list[PromptRequest], texts: list[str] | None = None):
        images = [image for request in batch for image in request.images]
        inputs = self.processor(
            images=images or None,
            text=texts or [request.prompt for request in batch],
            return_tensors="pt",
            padding=True,
        )
        return inputs.to(self._device)

    def _reduce(self, batch: list[PromptRequest], inputs) -> tuple[engine.ReducedPrompt, tuple | list]:
        if self.tiled:
            return self._reduce_each_image(partial(llava_next.embed_prompt, keep_tower=self.plan.vision is not None),
                                           batch, inputs)
        reduced = engine.prepare_reduced_prompt(
            self._model, self.tokenizer, self.plan, inputs, [request.comparison_text for request in batch], self._image_seeds(batch)
        )
        return reduced, self.plan.layers


class LlavaSimignoreChat(LlavaSimignore):
    """lmms-eval "chat" model: the task's messages go through the processor's chat template (like `llava_hf_chat`)."""

    is_simple = False

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[2]

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Chat request (context, doc_to_messages, gen_kwargs, doc_id, task, split) -> prompt."""
        if not callable(args[1]):  # loglikelihood requests keep the simple layout
            return super()._prompt_request(args)
        doc, _, images, hf_messages = self._chat_request(args)
        prompt = self.processor.apply_chat_template(
            hf_messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        return PromptRequest(prompt, _rgb(images), self._comparison_text(doc, self._user_text(hf_messages), args[4]), args[3], args[4])


def pad_to_square(image, colour: tuple[int, ...]):
    """`image` centred on a square canvas of its longer side filled with `colour` (LLaVA's `expand2square`)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _rgb(images: list) -> list:
    return [image.convert("RGB") for image in images]
