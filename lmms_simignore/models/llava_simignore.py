"""`llava_simignore`: lmms-eval model classes hosting any llava-hf checkpoint with visual-token reduction.

This module parses arguments, builds prompts the way lmms-eval's built-in `llava_hf` does, batches
requests and decodes answers. All token selection and generation happens in `lmms_simignore.engine`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch
from loguru import logger
from tqdm import tqdm

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from lmms_simignore import engine
from lmms_simignore.engine.accounting import TokenAccounting, layer_runs
from lmms_simignore.methods import sample_seed
from lmms_simignore.models.mipha import attach_head_bias, converted_folder, hub_mipha_snapshot, is_mipha_folder
from lmms_simignore.models.presets import PRESETS, resolve_model_args
from lmms_simignore.models.quantization import nf4_quantization_config
from lmms_simignore.settings import REDUCTION_ARGUMENTS, Plan, ReductionSettings, unknown_argument_message
from lmms_simignore.shipped import resolve_pretrained

IMAGE_PLACEHOLDER = "<image>"
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
DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "image_aspect_ratio"}
# image_aspect_ratio (a task's generation_kwargs, LLaVA's name for it): "pad" squares each image with the processor's
# mean colour before it is processed, as LLaVA's and Mipha's own evaluations do; "original" leaves it to the processor
IMAGE_ASPECT_RATIOS = ("original", "pad")
QUANTIZATIONS = ("none", "nf4")
# the model_args of loading and decoding (the reduction's come from the settings and the registry): values, meaning
LOADER_ARGUMENTS = {
    "pretrained": (f"`{DEFAULT_PRETRAINED}`", "any `LlavaForConditionalGeneration` checkpoint with a Llama or Phi language "
                   "model (hub id or folder; safetensors only), a Mipha folder in its released layout (converted once), or "
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


@dataclass
class PromptRequest:
    """One request turned into model input: the templated prompt, its images and the text Simignore compares with."""

    prompt: str
    images: list
    comparison_text: str
    doc_id: int
    task: str


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def options_text(options, style: str) -> str:
    """Simignore's comparison text from a doc's answer options: `options` joins them with spaces,
    `options_lettered` writes 'Options: (A) first (B) second ...'."""
    if style == "options":
        return " ".join(options)
    return "Options: " + " ".join(f"({chr(ord('A') + index)}) {option}" for index, option in enumerate(options))


class LlavaSimignore(lmms):
    """lmms-eval "simple" model (prompt = `<image>\\n` + task text in the chat template, like `llava_hf`).

    model_args: pretrained (hub id, local folder, or `shipped:shapes-llava`), revision, device, device_map, dtype, quantization, batch_size,
    attn_implementation, use_cache, chat_template, max_new_tokens, seed, token_log, preset, and the
    reduction settings (`ReductionSettings`): reduction, keep, ignore, apply, stage_positions and the arguments of the
    pipeline's methods (the registry's, `lmms_simignore.methods.registry`).
    """

    is_simple = True

    def __init__(self, preset: str | None = None, **model_args) -> None:
        super().__init__()
        self._setup(**resolve_model_args(preset, model_args))
        self.preset = preset

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
        unknown = [name for name in reduction_args if name not in REDUCTION_ARGUMENTS]
        if unknown:
            valid = ["preset", *(name for name in inspect.signature(LlavaSimignore._setup).parameters
                                 if name not in ("self", "reduction_args")), *REDUCTION_ARGUMENTS]
            raise ValueError(unknown_argument_message(unknown[0], valid, "llava_simignore"))
        settings = ReductionSettings(seed=seed, **reduction_args)
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer (it overrides the task's), got {max_new_tokens!r}")
        self.batch_size_per_gpu = int(batch_size)
        self.use_cache = bool(use_cache)
        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)
        self.token_log = token_log

        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        pretrained = resolve_pretrained(str(pretrained))
        pretrained = str(hub_mipha_snapshot(pretrained, revision) or pretrained)
        if is_mipha_folder(pretrained):  # a Mipha checkpoint in its released layout: converted once, then loaded
            pretrained, revision = str(converted_folder(pretrained)), "main"
        config = AutoConfig.from_pretrained(pretrained, revision=revision)
        if config.model_type != "llava":
            raise ValueError(
                f"llava_simignore hosts LlavaForConditionalGeneration checkpoints (model_type 'llava'); "
                f"pretrained={pretrained!r} has model_type {config.model_type!r}"
            )
        engine.check_model_support(config)
        self.config = config
        self.image_tokens_per_image = engine.image_tokens_per_image(config)
        self.num_layers = config.text_config.num_hidden_layers
        self._plan_for(settings)  # budgets, layers and what the methods need, before any download

        self._rank, self._world_size, local_rank = _world()
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self._world_size > 1:
            device = f"cuda:{local_rank}"
        self._device = torch.device(device)
        load_kwargs = {}
        if quantization == "nf4":
            load_kwargs["quantization_config"] = nf4_quantization_config(self._device)
            device_map = device_map or {"": str(self._device)}
        self._model = LlavaForConditionalGeneration.from_pretrained(
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
        self.accounting = TokenAccounting()
        self._warned: set[str] = set()
        logger.info(
            f"llava_simignore: {pretrained} on {self._device}, {self.image_tokens_per_image} image tokens per image, "
            f"{self.settings}; image tokens per image visible per layer (requested): {layer_runs(self.requested_visible_per_layer)}"
        )

    def _plan_for(self, settings: ReductionSettings) -> Plan:
        """The settings' stages on this model; raises on budgets or layers it cannot take, or on what a method needs
        that it cannot give."""
        return engine.plan_for(self.config, settings)

    def use_settings(self, settings: ReductionSettings) -> None:
        """Reduce with `settings` from now on (the loaded model stays; the speed pass switches rows this way)."""
        self.plan = self._plan_for(settings)
        self.settings = settings
        # what the settings ask for; the token accounting records what each layer really saw
        self.requested_visible_per_layer = self.plan.visible_per_layer()

    # -- lmms-eval plumbing ------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- prompts -------------------------------------------------------------------------------------
    def _template(self) -> str:
        return self.chat_template or self.tokenizer.chat_template or VICUNA_TEMPLATE

    def _comparison_text(self, doc: dict, user_text: str, task: str) -> str:
        """The text Simignore compares image tokens with: the doc's answer options, or the user prompt."""
        style = self.settings.text_style
        if style in ("options", "options_lettered"):
            for key in ("choices", "options"):
                options = doc.get(key) if isinstance(doc, dict) else None
                if isinstance(options, (list, tuple)) and options and all(isinstance(o, str) for o in options):
                    return options_text(options, style)
            if self.settings.reads_text:
                self._warn_once(
                    f"no-options:{task}",
                    f"task {task}: docs have no 'choices'/'options' list; Simignore compares with the prompt text instead",
                )
        return user_text

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Simple request (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> prompt."""
        context, _, doc_to_visual, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        images = _check_images(doc_to_visual(doc), task, doc_id)
        text = context
        if images and IMAGE_PLACEHOLDER not in context:
            text = f"{' '.join([IMAGE_PLACEHOLDER] * len(images))}\n{context}"
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=self._template(), tokenize=False, add_generation_prompt=True
        )
        user_text = context.replace(IMAGE_PLACEHOLDER, "").strip()
        return PromptRequest(prompt, images, self._comparison_text(doc, user_text, task), doc_id, task)

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[1]

    # -- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request; batches group equal generation settings and similar prompt lengths (lmms-eval's
        `Collator`, longest prompts first, as the built-in models batch).

        Prompts and images are prepared batch by batch, so memory does not grow with the task size.
        """
        from lmms_eval.utils import Collator

        collator = Collator([request.args for request in requests], sort_fn=lambda args: -len(str(args[0])),
                            group_fn=self._request_gen_kwargs, grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_simignore")
        for batch in collator.get_batched(n=self.batch_size):
            gen_kwargs = dict(self._request_gen_kwargs(batch[0]))
            prepared = self._squared([self._prompt_request(args) for args in batch], gen_kwargs.get("image_aspect_ratio"))
            for args, answer in zip(batch, self._generate_batch(prepared, gen_kwargs)):
                answers.append(answer)
                self.cache_hook.add_partial("generate_until", (args[0], gen_kwargs), answer)
            progress.update(len(batch))
        progress.close()
        self._report_accounting()
        return collator.get_original(answers)

    def _squared(self, batch: list[PromptRequest], aspect: str | None) -> list[PromptRequest]:
        """With image_aspect_ratio=pad, each image padded to a square (centred) with the image processor's mean colour."""
        if aspect in (None, "original"):
            return batch
        if aspect not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"generation kwarg image_aspect_ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}; got {aspect!r}")
        colour = tuple(int(mean * 255) for mean in self.processor.image_processor.image_mean)
        return [dataclasses.replace(request, images=[pad_to_square(image, colour) for image in request.images]) for request in batch]

    def _report_accounting(self) -> None:
        logger.info(f"llava_simignore token accounting: {self.accounting.summary()}")
        if self.token_log:
            path = self.token_log if self.world_size == 1 else f"{self.token_log}.rank{self.rank}"
            self.accounting.write(path)

    def _decoding_options(self, gen_kwargs: dict) -> tuple[engine.DecodingOptions, list[str]]:
        ignored = sorted(set(gen_kwargs) - KNOWN_GEN_KWARGS)
        if ignored:
            self._warn_once(f"gen:{ignored}", f"llava_simignore ignores generation kwargs {ignored}")
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"llava_simignore decodes greedily or by sampling; num_beams={gen_kwargs['num_beams']} is not supported")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        options = engine.DecodingOptions(
            max_new_tokens=self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or 1024),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=gen_kwargs.get("top_p"),
            seed=self.seed,
        )
        return options, [stop for stop in until if stop]

    def _encode_batch(self, batch: list[PromptRequest], texts: list[str] | None = None):
        images = [image for request in batch for image in request.images]
        inputs = self.processor(
            images=images or None,
            text=texts or [request.prompt for request in batch],
            return_tensors="pt",
            padding=True,
        )
        return inputs.to(self._device)

    def _reduced_prompt(self, batch: list[PromptRequest], inputs) -> engine.ReducedPrompt:
        seeds = [
            sample_seed(self.seed, request.task, request.doc_id, index)
            for request in batch
            for index in range(len(request.images))
        ]
        return engine.prepare_reduced_prompt(
            self._model, self.tokenizer, self.plan, inputs, [request.comparison_text for request in batch], seeds
        )

    def _in_llm_args(self) -> dict:
        return {"stages": self.plan.layers}

    def _account(self, batch: list[PromptRequest], inputs, image_tokens: torch.Tensor, seen: engine.ImageTokensSeen) -> None:
        """Record each sample's image tokens and, per decoder layer, the image tokens that layer computed on and
        could attend to in the prompt pass, as the engine observed them."""
        for row, request in enumerate(batch):
            visible = seen.visible[row].tolist()
            self.accounting.add(
                doc_id=request.doc_id,
                task=request.task,
                prompt_tokens=int(inputs["attention_mask"][row].sum()),
                image_tokens=int(image_tokens[row]),
                visible_per_layer=visible,
                mean_visible=sum(visible) / len(visible),
                computed_per_layer=seen.computed[row].tolist(),
            )

    def _generate_batch(self, batch: list[PromptRequest], gen_kwargs: dict) -> list[str]:
        options, until = self._decoding_options(gen_kwargs)
        inputs = self._encode_batch(batch)
        reduced = self._reduced_prompt(batch, inputs)
        stopped = None
        if until:
            longest = max(len(stop) for stop in until)

            def stopped(generated: torch.Tensor) -> torch.Tensor:
                tails = self.tokenizer.batch_decode(generated[:, -(longest + 2) :], skip_special_tokens=True)
                return torch.tensor([any(stop in tail for stop in until) for tail in tails], device=generated.device)

        generation = engine.generate(
            self._model,
            reduced,
            options,
            eos_token_ids=[self.eot_token_id],
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id,
            use_cache=self.use_cache,
            stopped=stopped,
            **self._in_llm_args(),
        )
        self._account(batch, inputs, reduced.image_tokens, generation.image_tokens_seen)
        answers = []
        for text in self.tokenizer.batch_decode(generation.tokens, skip_special_tokens=True):
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text)
        return answers

    # -- log-likelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its (reduced) prompt, and whether it is greedy."""
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="llava_simignore loglikelihood"
        ):
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            request = self._prompt_request((context, {}, doc_to_visual, doc_id, task, split))
            inputs = self._encode_batch([request], texts=[request.prompt + continuation])
            # the image placeholder is one token in both texts, so the tokenizer alone tells the continuation's length
            num_continuation = len(self.tokenizer(request.prompt + continuation).input_ids) - len(self.tokenizer(request.prompt).input_ids)
            prompt_length = inputs["input_ids"].shape[1] - num_continuation
            if num_continuation < 1:
                raise ValueError(f"task {task} doc {doc_id}: the continuation {continuation!r} adds no token")
            prompt_inputs = {"input_ids": inputs["input_ids"][:, :prompt_length], "attention_mask": inputs["attention_mask"][:, :prompt_length]}
            if "pixel_values" in inputs:
                prompt_inputs["pixel_values"] = inputs["pixel_values"]
            reduced = self._reduced_prompt([request], prompt_inputs)
            logprobs, greedy = engine.continuation_logprobs(
                self._model, reduced, inputs["input_ids"][:, prompt_length:], **self._in_llm_args()
            )
            results.append((float(logprobs.sum()), bool(greedy.all())))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("llava_simignore does not implement multi-round generation yet")


class LlavaSimignoreChat(LlavaSimignore):
    """lmms-eval "chat" model: the task's messages go through the processor's chat template (like `llava_hf_chat`)."""

    is_simple = False

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[2]

    def _prompt_request(self, args: tuple) -> PromptRequest:
        """Chat request (context, doc_to_messages, gen_kwargs, doc_id, task, split) -> prompt."""
        from lmms_eval.protocol import ChatMessages

        context, doc_to_messages, _, doc_id, task, split = args
        if not callable(doc_to_messages):  # loglikelihood requests keep the simple layout
            return super()._prompt_request(args)
        doc = self.task_dict[task][split][doc_id]
        messages = ChatMessages(messages=doc_to_messages(doc))
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise ValueError(f"task {task} doc {doc_id}: llava_simignore takes images only, got video/audio inputs")
        images = _check_images(images, task, doc_id)
        hf_messages = messages.model_dump()["messages"]
        prompt = self.processor.apply_chat_template(
            hf_messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        user_text = " ".join(
            part["text"] for message in hf_messages if message["role"] == "user"
            for part in message["content"] if part.get("type") == "text"
        )
        return PromptRequest(prompt, images, self._comparison_text(doc, user_text, task), doc_id, task)


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


def _check_images(visuals, task: str, doc_id: int) -> list:
    """The doc's visuals as a flat list of RGB PIL images; anything else is an error naming the doc."""
    from PIL import Image

    flat = []
    for visual in visuals or []:
        flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    for visual in flat:
        if not isinstance(visual, Image.Image):
            raise ValueError(f"task {task} doc {doc_id}: llava_simignore takes PIL images, got {type(visual).__name__}")
    return [visual.convert("RGB") for visual in flat]

