"""What every lmms-eval model class of ours shares, whatever the model family: model_args checked against the reduction
settings before any weights load, the process's place among several, lmms-eval's batching (its `Collator`), greedy or
sampled generation through the engine, stop strings, log-likelihoods, and the token accounting per sample.

A family's class (`llava_simignore`, `qwen2_5_vl_simignore`, ...) adds how a request becomes a prompt and its images
(`_prompt_request`), how a batch of them becomes processor outputs (`_encode_batch`), and how the engine reduces them
(`_reduce`); everything else is here, so every family batches, decodes and counts alike.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from loguru import logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from lmms_simignore import engine
from lmms_simignore.engine.accounting import TokenAccounting
from lmms_simignore.models.presets import resolve_model_args
from lmms_simignore.settings import REDUCTION_ARGUMENTS, ReductionSettings, unknown_argument_message

DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class PromptRequest:
    """One request turned into model input: the templated prompt, its images (as the processor takes them) and the text
    Simignore compares with."""

    prompt: str
    images: list
    comparison_text: str
    doc_id: int
    task: str


@dataclass
class LoglikelihoodResult(GenerationResult):
    """One log-likelihood response as lmms-eval's tasks read it: `text` holds the pair (loss, is_greedy), where loss is
    the mean negative log-likelihood of the continuation's tokens (lmms-eval's own `llava` and `llava_hf` classes
    return that, and its multiple-choice scoring takes the option of least loss).

    The pair travels in a `GenerationResult` because lmms-eval's evaluator passes such a result's text on untouched,
    while a bare tuple would become its string; it reads as the pair: `loss, is_greedy = result`."""

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index):
        return self.text[index]


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def options_text(options, style: str) -> str:
    """Simignore's comparison text from a doc's answer options: `options` joins them with spaces,
    `options_lettered` writes 'Options: (A) first (B) second ...'."""
    if style == "options":
        return " ".join(options)
    return "Options: " + " ".join(f"({chr(ord('A') + index)}) {option}" for index, option in enumerate(options))


def check_positive_int(name: str, value, what: str) -> None:
    """Refuse, naming the argument, anything but a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}")


class ReducingModel(lmms):
    """The family-independent part of our lmms-eval model classes (see the module docstring).

    A subclass defines `_setup(self, <its model_args with defaults>, **reduction_args)` (its signature is the list of
    model_args it takes besides the reduction settings' and `preset`), and in it calls `_settings_from`, `_place` and
    `use_settings`; and it defines the hooks `_prompt_request`, `_encode_batch`, `_reduce`, `_plan_for`.
    """

    is_simple = True
    model_name = "reducing model"  # the `--model` name, in messages and progress bars
    default_max_new_tokens = 1024  # when neither the task nor max_new_tokens= says
    # the task's stop strings: "all" cut the answer at each (and end generation there), "all but blank lines" the same
    # without "\n\n" (lmms-eval's Qwen2.5-VL / Qwen3-VL classes drop it), "none" leave the answer whole
    stop_strings = "all"
    strip_answers = False  # whitespace stripped from each answer (lmms-eval's qwen2_vl does)

    def __init__(self, preset: str | None = None, **model_args) -> None:
        super().__init__()
        self._setup(**resolve_model_args(preset, model_args))
        self.preset = preset

    def _setup(self, **model_args) -> None:
        raise NotImplementedError

    # -- set-up steps a subclass's _setup calls ------------------------------------------------------------------------
    def _settings_from(self, reduction_args: dict, seed: int, batch_size, max_new_tokens, token_log: str | None,
                       use_cache: bool, dtype: str) -> ReductionSettings:
        """Check the model_args every class takes and the reduction settings (unknown names get the closest valid one);
        keep the decoding ones. Nothing is loaded yet."""
        unknown = [name for name in reduction_args if name not in REDUCTION_ARGUMENTS]
        if unknown:
            own = [name for name in inspect.signature(type(self)._setup).parameters if name not in ("self", "reduction_args")]
            raise ValueError(unknown_argument_message(unknown[0], ["preset", *own, *REDUCTION_ARGUMENTS], self.model_name))
        settings = ReductionSettings(seed=seed, **reduction_args)
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_new_tokens is not None:
            check_positive_int("max_new_tokens", max_new_tokens, "it overrides the task's")
        self.batch_size_per_gpu = int(batch_size)
        self.use_cache = bool(use_cache)
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)
        self.token_log = token_log
        self.accounting = TokenAccounting()
        self._warned: set[str] = set()
        return settings

    def _place(self, device: str | None) -> torch.device:
        """This process's rank and world size, and its device: `cuda:LOCAL_RANK` when CUDA is there and none is given."""
        self._rank, self._world_size, local_rank = world()
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self._world_size > 1:
            device = f"cuda:{local_rank}"
        self._device = torch.device(device)
        return self._device

    def _load(self, pretrained: str, config, revision: str, device: str | None, device_map: str | None, dtype: str,
              attn_implementation: str | None, settings: ReductionSettings) -> None:
        """Check `settings` on the checkpoint's `config` (its decoder, budgets, layers and what the methods need, before
        any weights load), place this process, load the checkpoint with transformers' `AutoModelForImageTextToText`
        (safetensors only) and reduce with `settings`."""
        from transformers import AutoModelForImageTextToText

        from lmms_simignore.engine.families import decoder_family

        decoder_family(config.text_config)
        self.config = config
        self._plan_for(settings)
        self._place(device)
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained, revision=revision, dtype=DTYPES[str(dtype)], attn_implementation=attn_implementation,
            device_map=device_map or None, use_safetensors=True,
        ).eval()
        if not device_map:
            self._model.to(self._device)
        else:
            self._device = self._model.get_input_embeddings().weight.device
        self.use_settings(settings)

    def _plan_for(self, settings: ReductionSettings):
        """The settings' stages on this model (raises on what it cannot take)."""
        raise NotImplementedError

    def use_settings(self, settings: ReductionSettings) -> None:
        """Reduce with `settings` from now on (the loaded model stays; the speed pass switches rows this way)."""
        self.plan = self._plan_for(settings)
        self.settings = settings
        # what the settings ask for; the token accounting records what each layer really saw
        self.requested_visible_per_layer = self.plan.visible_per_layer()

    # -- lmms-eval plumbing ----------------------------------------------------------------------------------------------
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

    # -- hooks of a family -------------------------------------------------------------------------------------------------
    def _prompt_request(self, args: tuple) -> PromptRequest:
        """A request's args -> its prompt, images and comparison text."""
        raise NotImplementedError

    def _request_gen_kwargs(self, args: tuple) -> dict:
        return args[1]

    def _prepared(self, batch: list[PromptRequest], gen_kwargs: dict) -> list[PromptRequest]:
        """The batch as the family's preprocessing leaves it before encoding (as it is, by default)."""
        return batch

    def _encode_batch(self, batch: list[PromptRequest], texts: list[str] | None = None):
        """Processor outputs of a batch (left-padded), on the model's device; `texts` replace the prompts."""
        raise NotImplementedError

    def _reduce(self, batch: list[PromptRequest], inputs) -> tuple[engine.ReducedPrompt, tuple | list]:
        """The batch's prompt after the stages before the LLM, and the in-LLM stages (a plan's, or one tuple per image)."""
        raise NotImplementedError

    def _reduce_each_image(self, embed_prompt, batch: list[PromptRequest], inputs) -> tuple[engine.ReducedPrompt, list]:
        """`_reduce` for a family whose images have their own sizes: embedded by the family's `embed_prompt(model,
        inputs)`, each image planned for its own tokens (`engine.image_plans`) and reduced in the tower (on the views
        `embed_prompt` kept) or before the LLM; one tuple of in-LLM stages per image."""
        return engine.reduce_each_image(self._model, self.tokenizer, self.settings, embed_prompt(self._model, inputs),
                                        [request.comparison_text for request in batch], self._image_seeds(batch))

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

    def _chat_request(self, args: tuple, first: dict | None = None) -> tuple[dict, object, list, list[dict]]:
        """A chat request (context, doc_to_messages, gen_kwargs, doc_id, task, split) -> its doc, its `ChatMessages`
        (after `first`, a message put before the task's), their images and their messages as transformers takes them;
        a video or audio input is refused naming the doc."""
        from lmms_eval.protocol import ChatMessages

        _, doc_to_messages, _, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        chat = ChatMessages(messages=([first] if first else []) + list(doc_to_messages(doc)))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"task {task} doc {doc_id}: {self.model_name} takes images only, got video/audio inputs")
        return doc, chat, check_images(images, task, doc_id, self.model_name), chat.model_dump()["messages"]

    @staticmethod
    def _user_text(messages: list[dict]) -> str:
        """The text parts of a conversation's user turns, joined by spaces."""
        return " ".join(part["text"] for message in messages if message["role"] == "user"
                        for part in message["content"] if part.get("type") == "text")

    def _image_seeds(self, batch: list[PromptRequest]) -> list[int]:
        from lmms_simignore.methods import sample_seed

        return [sample_seed(self.seed, request.task, request.doc_id, index)
                for request in batch for index in range(len(request.images))]

    def _decode(self, tokens: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    # -- generation --------------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request; batches group equal generation settings and similar prompt lengths (lmms-eval's
        `Collator`, longest prompts first, as the built-in models batch).

        Prompts and images are prepared batch by batch, so memory does not grow with the task size.
        """
        from lmms_eval.utils import Collator

        collator = Collator([request.args for request in requests], sort_fn=lambda args: -len(str(args[0])),
                            group_fn=self._request_gen_kwargs, grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=self.model_name)
        for batch in collator.get_batched(n=self.batch_size):
            gen_kwargs = dict(self._request_gen_kwargs(batch[0]))
            prepared = self._prepared([self._prompt_request(args) for args in batch], gen_kwargs)
            for args, answer in zip(batch, self._generate_batch(prepared, gen_kwargs)):
                answers.append(answer)
                self.cache_hook.add_partial("generate_until", (args[0], gen_kwargs), answer)
            progress.update(len(batch))
        progress.close()
        self._report_accounting()
        return collator.get_original(answers)

    def _report_accounting(self) -> None:
        logger.info(f"{self.model_name} token accounting: {self.accounting.summary()}")
        if self.token_log:
            path = self.token_log if self.world_size == 1 else f"{self.token_log}.rank{self.rank}"
            self.accounting.write(path)

    def _stops(self, gen_kwargs: dict) -> list[str]:
        """The stop strings this class honours of the task's `until`."""
        if self.stop_strings == "none":
            return []
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if self.stop_strings == "all but blank lines":
            until = [stop for stop in until if stop != "\n\n"]
        return [stop for stop in until if stop]

    def _known_gen_kwargs(self) -> set[str]:
        return {"until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample"}

    def _decoding_options(self, gen_kwargs: dict) -> tuple[engine.DecodingOptions, list[str]]:
        ignored = sorted(set(gen_kwargs) - self._known_gen_kwargs())
        if ignored:
            self._warn_once(f"gen:{ignored}", f"{self.model_name} ignores generation kwargs {ignored}")
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"{self.model_name} decodes greedily or by sampling; num_beams={gen_kwargs['num_beams']} is not supported")
        temperature = float(gen_kwargs.get("temperature") or 0)
        options = engine.DecodingOptions(
            max_new_tokens=self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=gen_kwargs.get("top_p"),
            seed=self.seed,
        )
        return options, self._stops(gen_kwargs)

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
        reduced, stages = self._reduce(batch, inputs)
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
            stages=stages,
        )
        self._account(batch, inputs, reduced.image_tokens, generation.image_tokens_seen)
        answers = []
        for text in self._decode(generation.tokens):
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text.strip() if self.strip_answers else text)
        return answers

    # -- log-likelihood --------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """Per request (context, continuation, doc_to_visual, doc_id, task, split): the mean negative log-likelihood of
        the continuation's tokens after the (reduced) prompt, and whether greedy decoding would produce them. Each
        request's prompt pass is counted in the token accounting (a multiple-choice doc: once per option)."""
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc=f"{self.model_name} loglikelihood"
        ):
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            request = self._prompt_request((context, {}, doc_to_visual, doc_id, task, split))
            inputs = self._encode_batch([request], texts=[request.prompt + continuation])
            # each image is one placeholder in both texts, so the tokenizer alone tells the continuation's length
            num_continuation = len(self.tokenizer(request.prompt + continuation).input_ids) - len(self.tokenizer(request.prompt).input_ids)
            prompt_length = inputs["input_ids"].shape[1] - num_continuation
            if num_continuation < 1:
                raise ValueError(f"task {task} doc {doc_id}: the continuation {continuation!r} adds no token")
            prompt_inputs = {key: value[:, :prompt_length] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
                             for key, value in inputs.items()}
            reduced, stages = self._reduce([request], prompt_inputs)
            logprobs, greedy, seen = engine.continuation_logprobs(self._model, reduced, inputs["input_ids"][:, prompt_length:], stages=stages)
            self._account([request], prompt_inputs, reduced.image_tokens, seen)  # each option's prompt pass
            results.append(LoglikelihoodResult((-float(logprobs.float().mean()), bool(greedy.all()))))
        self._report_accounting()
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{self.model_name} does not implement multi-round generation yet")


def check_images(visuals, task: str, doc_id: int, model_name: str) -> list:
    """The doc's visuals as a flat list of PIL images; anything else (a video path, audio) is an error naming the doc."""
    from PIL import Image

    flat = []
    for visual in visuals or []:
        flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    for visual in flat:
        if not isinstance(visual, Image.Image):
            raise ValueError(f"task {task} doc {doc_id}: {model_name} takes PIL images, got {type(visual).__name__}")
    return flat
