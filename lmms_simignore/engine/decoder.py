"""Our loop over the decoder layers (`LanguageModelRun`): pruning stages inside the LLM, the KV-cache rules, the image
tokens each layer saw; and generation and teacher-forced log-probabilities on top of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmms_simignore.engine.attention import attention_from_queries, last_token_attention, layer_key_norms
from lmms_simignore.engine.families import check_model_support
from lmms_simignore.engine.prompt import ReducedPrompt, left_pack
from lmms_simignore.methods import fastv_scores, select_top_k
from lmms_simignore.methods.dart import DEFAULT_PIVOTS, dart_choice
from lmms_simignore.methods.visiondrop import received_attention
from lmms_simignore.methods.visionzip import contextual_plan, merge_into_targets


@dataclass
class ImageTokensSeen:
    """Image tokens of each prompt row that each decoder layer worked on in the prompt pass, read off the
    sequence and attention mask the layer was given (not the requested budget).

    computed: (B, n_layers) image tokens in the layer's sequence (masked ones included: they cost compute)
    visible:  (B, n_layers) of those, the ones the attention mask lets the prompt attend to
    """

    computed: torch.Tensor
    visible: torch.Tensor


@dataclass(frozen=True)
class DecodingOptions:
    """How to pick tokens. Greedy unless do_sample; `seed` makes sampling reproducible."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _next_tokens(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)  # (B, V)
    if options.top_p is not None and options.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > options.top_p  # keep the smallest nucleus
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Merge:
    """How a merging stage builds its contextual tokens from the previous segment's sequence (one per target).

    rest_columns: (I, R) the image tokens not kept as dominant, in the previous segment's sequence; targets: (C,)
    which of them are the targets; assignment: (I, R, C) which target each other one joins; target_columns:
    (I, C) where the targets sit in the new segment's sequence.
    """

    rest_columns: torch.Tensor
    targets: torch.Tensor
    assignment: torch.Tensor
    target_columns: torch.Tensor | None = None


@dataclass
class _Segment:
    """Decoder layers [start, end) and the prompt columns they see.

    columns: (B, S) the prompt columns in this segment's sequence (original coordinates, ascending);
    gather: (B, S) where each of them sits in the previous segment's sequence (None for the first segment);
    mask: (B, S + t) its 2-D attention mask (t = tokens fed so far); image_columns: (I, M) where each image's
    tokens sit in this segment's sequence; image_visible: (I, M) which of them are visible;
    keep: image tokens per image that the stage starting this segment keeps (None for the first segment);
    shift: (B, S) with repacked positions, how many tokens the stage starting this segment dropped before each
    prompt column (its position drops by that much); dropped: (B, 1) all it dropped (generated tokens shift by it).
    """

    start: int
    end: int
    keep: int | None = None
    columns: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    image_columns: torch.Tensor | None = None
    image_visible: torch.Tensor | None = None
    merge: _Merge | None = None
    shift: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


PRUNE_RULES = ("attention", "dart", "visiondrop")
STAGE_POSITIONS = ("original", "repacked")


class LanguageModelRun:
    """Runs the decoder layers of a llava model's language model: the one place a reduction acts inside the LLM.

    In-LLM pruning stages split the layers into segments. A stage at layer K (`prune_stages=((K, keep), ...)`,
    or FastV's `fastv_layer=K, fastv_keep=keep`) chooses, among the image tokens still visible, the `keep` per
    image that layers >= K (up to the next stage) see, at their original position ids. `prune_rule` says how:
    "attention" (FastV, PyramidDrop): the most attended by the last prompt token in layer K-1 (mean over heads);
    "dart": DART's least duplicated tokens, from layer K-1's key norms and output (`dart_pivots` pivots);
    "visiondrop": the image tokens the image attends to most in layer K (its parts on layer K-1's output),
    and `merge_counts[i]` of the `keep` are contextual tokens merged from the rest (in their target's place).
    `stage_positions="repacked"` closes the ranks instead (PyramidDrop's and VisionDrop's code): from a stage on, a
    token's position id drops by the number of tokens the stage dropped before it, and generated tokens by all it
    dropped, so the tokens left sit at consecutive positions (gaps left by a pre-LLM stage stay). The kept sets
    are chosen once, from the prompt, and then fixed: every generated token passes through each segment with that
    segment's prompt columns, with a KV cache (one entry per token and layer, each layer its own length) or by
    recomputing the whole sequence. `observe`, if given, sees every layer's input in the prompt pass: (layer index,
    layer, its input (B, S, D), rotary (cos, sin), the visible columns (B, S) bool, their prompt columns (B, S), which
    are image tokens (B, S) bool).
    """

    def __init__(self, model, prompt: ReducedPrompt, fastv_layer: int | None = None, fastv_keep: int = 0,
                 use_cache: bool = True, prune_stages: tuple[tuple[int, int], ...] = (), prune_rule: str = "attention",
                 dart_pivots: int = DEFAULT_PIVOTS, merge_counts: tuple[int, ...] = (), stage_positions: str = "original",
                 observe: Callable | None = None):
        from transformers import DynamicCache

        if prune_rule not in PRUNE_RULES:
            raise ValueError(f"prune_rule must be one of {', '.join(PRUNE_RULES)}; got {prune_rule!r}")
        if stage_positions not in STAGE_POSITIONS:
            raise ValueError(f"stage_positions must be one of {', '.join(STAGE_POSITIONS)}; got {stage_positions!r}")
        self.repack = stage_positions == "repacked"
        self.observe = observe  # observe(index, layer, layer_input, position_embeddings, mask, columns, is_image) in the prompt pass
        merging = prune_rule == "visiondrop"
        if (merging and len(merge_counts) != len(prune_stages)) or (not merging and merge_counts):
            raise ValueError(f"merge_counts (one per stage) go with prune_rule='visiondrop' only; got {merge_counts} for "
                             f"{len(prune_stages)} stage(s) and rule {prune_rule!r}")
        if any(not 0 <= contextual <= keep for contextual, (_, keep) in zip(merge_counts, prune_stages)):
            raise ValueError(f"each stage's merge count must be in [0, its keep]; got {merge_counts} for {list(prune_stages)}")
        self.prune_rule, self.dart_pivots, self.merge_counts = prune_rule, dart_pivots, tuple(merge_counts)

        self.family = check_model_support(model.config)
        self.language_model = model.model.language_model
        self.final_norm = getattr(self.language_model, self.family.final_norm)
        self.lm_head = model.lm_head
        self.embedding = model.get_input_embeddings()
        self.prompt = prompt
        num_layers = len(self.language_model.layers)
        if fastv_layer is not None:
            if prune_stages:
                raise ValueError("give either fastv_layer/fastv_keep or prune_stages, not both")
            if not 1 <= fastv_layer < num_layers:
                raise ValueError(f"fastv_layer={fastv_layer} must be in [1, {num_layers - 1}] for {num_layers} decoder layers")
            available = int(prompt.image_visible.sum(dim=1).min()) if prompt.image_visible.numel() else fastv_keep
            if fastv_keep > available:
                raise ValueError(f"fastv_keep={fastv_keep} exceeds the {available} image tokens per image still visible")
            prune_stages = ((fastv_layer, fastv_keep),)
        self._check_stages(prune_stages, num_layers)
        bounds = [0, *(layer for layer, _ in prune_stages), num_layers]
        keeps = [None, *(keep for _, keep in prune_stages)]
        self.segments = [_Segment(start, end, keep) for start, end, keep in zip(bounds, bounds[1:], keeps)]
        first = self.segments[0]
        first.mask, first.image_columns, first.image_visible = prompt.attention_mask, prompt.image_columns, prompt.image_visible
        self.cache = DynamicCache(config=self.language_model.config) if use_cache else None
        self.embeds = prompt.inputs_embeds  # (B, L, D), prompt + tokens fed so far (kept only without a cache)
        self.positions = prompt.position_ids  # (B, L + t)
        self.prompt_length = prompt.inputs_embeds.shape[1]
        self.image_tokens_seen: ImageTokensSeen | None = None  # filled by the prompt pass

    def _check_stages(self, stages: tuple[tuple[int, int], ...], num_layers: int) -> None:
        prompt = self.prompt
        previous_layer, previous_keep = 0, int(prompt.image_visible.sum(dim=1).min()) if prompt.image_visible.numel() else None
        for layer, keep in stages:
            if not previous_layer < layer < num_layers:
                raise ValueError(f"a pruning stage at layer {layer} must come after layer {previous_layer} and before the "
                                 f"last of {num_layers} decoder layers (stages: {list(stages)})")
            if keep < 0 or (previous_keep is not None and keep > previous_keep):
                raise ValueError(f"the pruning stage at layer {layer} keeps {keep} image tokens per image, but only "
                                 f"{previous_keep} are visible before it (stages: {list(stages)})")
            previous_layer, previous_keep = layer, keep

    @property
    def kept_columns(self) -> torch.Tensor | None:
        """(B, S) prompt columns (original coordinates) that the last segment's layers see; None without pruning."""
        return self.segments[-1].columns

    @property
    def mask_high(self) -> torch.Tensor | None:
        """(B, S + t) the last segment's attention mask; None without pruning."""
        return self.segments[-1].mask if len(self.segments) > 1 else None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Encode the prompt; (B, V) logits of the next token."""
        hidden = self._forward(self.embeds, self.positions, prompt_pass=True)
        return self.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B, t) after everything so far; (B, t, V) logits after each of them."""
        count = tokens.shape[1]
        new_embeds = self.embedding(tokens)  # (B, t, D)
        offsets = torch.arange(1, count + 1, device=tokens.device)
        new_positions = self.positions[:, -1:] + offsets  # (B, t)
        ones = self.segments[0].mask.new_ones(tokens.shape[0], count)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        for segment in self.segments:
            segment.mask = torch.cat([segment.mask, ones], dim=1)
        if self.cache is not None:
            hidden = self._forward(new_embeds, new_positions, prompt_pass=False)
        else:
            self.embeds = torch.cat([self.embeds, new_embeds], dim=1)
            hidden = self._forward(self.embeds, self.positions, prompt_pass=False)[:, -count:]
        return self.lm_head(hidden)

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, prompt_pass: bool) -> torch.Tensor:
        """Run all decoder layers on `hidden` (B, q, D) at `positions` (B, q); returns the final-norm states."""
        from transformers.masking_utils import create_causal_mask

        model = self.language_model
        layers = model.layers
        cache_kwargs = {"cache": self.cache, "use_cache": self.cache is not None}
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        seen = []
        previous_length = self.prompt_length  # prompt columns in the previous segment's sequence
        for number, segment in enumerate(self.segments):
            if number and (prompt_pass or self.cache is None):  # the whole sequence is here: keep the segment's columns
                generated = torch.arange(previous_length, hidden.shape[1], device=hidden.device)
                index = torch.cat([segment.gather, generated.expand(hidden.shape[0], -1)], dim=1)  # (B, S + t)
                gathered = hidden[rows, index]
                if segment.merge is not None:
                    gathered = self._merged(hidden, gathered, segment.merge)
                hidden, positions = gathered, positions[rows, index]
                if self.repack:
                    shift = torch.cat([segment.shift, segment.dropped.expand(-1, index.shape[1] - segment.shift.shape[1])], dim=1)
                    positions = positions - shift
            elif number and self.repack:  # generated tokens only, through the cache
                positions = positions - segment.dropped
            if number:
                previous_length = segment.gather.shape[1]
            position_embeddings = model.rotary_emb(hidden, position_ids=positions)
            mask = create_causal_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=segment.mask,
                cache=self.cache, position_ids=positions, layer_idx=segment.start,
            )
            if prompt_pass:
                seen += [_image_columns_in(self._image_columns_map(segment, hidden.shape[1]), segment.mask)] * (segment.end - segment.start)
            for index in range(segment.start, segment.end):
                layer_input = hidden
                if prompt_pass and self.observe is not None:
                    columns = segment.columns if segment.columns is not None else \
                        torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                    self.observe(index, layers[index], hidden, position_embeddings, segment.mask.bool(), columns,
                                 self._image_columns_map(segment, hidden.shape[1]))
                hidden = layers[index](
                    hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings, **cache_kwargs
                )
                if prompt_pass and index == segment.end - 1 and number + 1 < len(self.segments):
                    self._choose_next_segment(number + 1, layers[index], layer_input, hidden, position_embeddings)
        if prompt_pass:
            self.image_tokens_seen = ImageTokensSeen(*(torch.stack([counts[part] for counts in seen], dim=1) for part in range(2)))
        return self.final_norm(hidden)

    def _image_columns_map(self, segment: _Segment, length: int) -> torch.Tensor:
        """(B, S) bool: which columns of the segment's prompt sequence hold an image token (masked or not)."""
        is_image = torch.zeros(segment.mask.shape[0], length, dtype=torch.bool, device=segment.mask.device)
        is_image[self.prompt.image_rows[:, None].expand_as(segment.image_columns), segment.image_columns] = True
        return is_image

    def _choose_next_segment(self, number: int, layer, layer_input: torch.Tensor, layer_output: torch.Tensor,
                             position_embeddings) -> None:
        """A pruning stage after `layer` (the last layer before the stage; its input and output (B, S, D)): keep
        `keep` image tokens per image among those still visible, by the run's rule; fill the next segment's
        columns and mask."""
        previous, segment = self.segments[number - 1], self.segments[number]
        image_rows = self.prompt.image_rows
        visible = previous.mask.bool()  # (B, S), the prompt pass: no generated token yet
        if self.prune_rule == "dart":
            index = self._dart_choice(previous, layer, layer_input, layer_output, position_embeddings, segment.keep)
        elif self.prune_rule == "visiondrop":
            index = self._visiondrop_choice(number, layer_output, position_embeddings, visible)
        else:
            attention = last_token_attention(layer, layer_input, position_embeddings, visible)  # (B, H, S)
            scores = fastv_scores(attention, previous.image_columns, image_rows, previous.image_visible)  # (I, M)
            index = select_top_k(scores, segment.keep)
        chosen = previous.image_columns.gather(1, index)  # (I, K) columns, ascending
        keep = visible.clone()
        keep[image_rows[:, None].expand_as(previous.image_columns), previous.image_columns] = False
        keep[image_rows[:, None].expand_as(chosen), chosen] = True
        segment.gather, mask, target = left_pack(keep)
        if self.repack:
            dropped = visible & ~keep  # (B, S): what this stage removed (masked and padding columns were not there)
            segment.shift = dropped.long().cumsum(dim=1).gather(1, segment.gather)  # (B, S')
            segment.dropped = dropped.long().sum(dim=1, keepdim=True)  # (B, 1)
        segment.mask = mask.to(previous.mask.dtype)
        base = previous.columns if previous.columns is not None else torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        segment.columns = base.gather(1, segment.gather)
        segment.image_columns = target[image_rows[:, None].expand_as(chosen), chosen]  # (I, K) in the new sequence
        segment.image_visible = torch.ones_like(segment.image_columns, dtype=torch.bool)
        if segment.merge is not None:
            target_columns = segment.merge.rest_columns[:, segment.merge.targets]  # (I, C) in the previous sequence
            segment.merge.target_columns = target[image_rows[:, None].expand_as(target_columns), target_columns]

    def _visiondrop_choice(self, number: int, layer_output: torch.Tensor, position_embeddings, visible: torch.Tensor) -> torch.Tensor:
        """VisionDrop's kept tokens (I, K), indices into the previous segment's image columns: the dominant ones by the
        attention they receive from the image's tokens in the next layer, and the targets of the contextual merge
        (the plan goes into the segment, to be applied wherever the whole sequence passes)."""
        previous, segment = self.segments[number - 1], self.segments[number]
        contextual = self.merge_counts[number - 1]
        image_rows, columns = self.prompt.image_rows, previous.image_columns  # (I,), (I, M)
        if not columns.numel():
            return columns[:, : segment.keep]
        next_layer = self.language_model.layers[segment.start]
        weights, keys = attention_from_queries(next_layer, layer_output, position_embeddings, image_rows, columns, visible)
        heads, tokens = weights.shape[1], columns.shape[1]
        on_images = weights.gather(3, columns[:, None, None, :].expand(-1, heads, tokens, -1))  # (I, H, M, M)
        dominant = select_top_k(received_attention(on_images, previous.image_visible), segment.keep - contextual)  # (I, d)
        rest_flags = previous.image_visible.clone()
        rest_flags.scatter_(1, dominant, False)
        rest = rest_flags.nonzero()[:, 1].reshape(columns.shape[0], -1)  # (I, R) ascending
        metric = keys.float().mean(dim=1)  # (I, L, d): the keys after the rotary embedding, averaged over heads
        metric = metric.gather(1, columns.gather(1, rest)[..., None].expand(-1, -1, metric.shape[-1]))  # (I, R, d)
        targets, assignment = contextual_plan(metric, contextual)
        segment.merge = _Merge(rest_columns=columns.gather(1, rest), targets=targets, assignment=assignment)
        return torch.sort(torch.cat([dominant, rest[:, targets]], dim=1), dim=1).values

    def _merged(self, previous_hidden: torch.Tensor, hidden: torch.Tensor, merge: _Merge) -> torch.Tensor:
        """`hidden` (B, S, D), the new segment's gathered sequence, with each target replaced by its contextual token
        built from `previous_hidden` (B, S_prev, D)."""
        image_rows = self.prompt.image_rows[:, None]
        contextual = merge_into_targets(previous_hidden[image_rows, merge.rest_columns], merge.targets, merge.assignment)
        hidden = hidden.clone()
        hidden[image_rows, merge.target_columns] = contextual.to(hidden.dtype)
        return hidden

    def _dart_choice(self, previous: _Segment, layer, layer_input, layer_output, position_embeddings, keep: int) -> torch.Tensor:
        """DART's kept tokens (I, K), indices into `previous.image_columns`: pivots by the L1 norm of `layer`'s keys,
        similarity of `layer`'s output through the final norm; text = the visible non-image columns after each image."""
        image_rows, columns = self.prompt.image_rows, previous.image_columns  # (I,), (I, M)
        key_norms = layer_key_norms(layer, layer_input, position_embeddings)  # (B, S)
        normed = self.final_norm(layer_output)  # (B, S, D)
        length = normed.shape[1]
        is_image = self._image_columns_map(previous, length)  # (B, S)
        after = torch.arange(length, device=normed.device)[None, :] > columns.amax(dim=1, keepdim=True)  # (I, S)
        text_mask = after & previous.mask[image_rows, :length].bool() & ~is_image[image_rows]  # (I, S)
        return dart_choice(
            normed[image_rows[:, None], columns], key_norms[image_rows[:, None], columns], previous.image_visible,
            normed[image_rows], key_norms[image_rows], text_mask, keep, self.dart_pivots,
        )


def _image_columns_in(is_image: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) image columns of a layer's sequence and its (B, >= S) 2-D mask -> (B,) image tokens present and
    (B,) of them attendable."""
    visible = is_image & attention_mask[:, : is_image.shape[1]].bool()
    return is_image.sum(dim=1), visible.sum(dim=1)


@dataclass
class Generation:
    """tokens: (B, T) generated ids (`pad_token_id` after a row ended); image_tokens_seen: what each layer saw."""

    tokens: torch.Tensor
    image_tokens_seen: ImageTokensSeen


@torch.inference_mode()
def generate(
    model,
    prompt: ReducedPrompt,
    options: DecodingOptions,
    eos_token_ids: list[int],
    pad_token_id: int,
    use_cache: bool = True,
    stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fastv_layer: int | None = None,
    fastv_keep: int = 0,
    prune_stages: tuple[tuple[int, int], ...] = (),
    prune_rule: str = "attention",
    dart_pivots: int = DEFAULT_PIVOTS,
    merge_counts: tuple[int, ...] = (),
    stage_positions: str = "original",
) -> Generation:
    """Generate after a reduced prompt, optionally with FastV pruning at `fastv_layer` or several pruning stages
    (`prune_stages`, `prune_rule`, `dart_pivots`, `merge_counts`, `stage_positions`: see `LanguageModelRun`): the new token ids and the image tokens
    each decoder layer saw.

    With `use_cache` the prompt is encoded once and each step feeds one token at position
    (last position + 1); without it the whole sequence is recomputed every step (same result, slower).
    `stopped(generated (B, t)) -> (B,) bool` marks rows that hit a stop string.
    """
    run = LanguageModelRun(model, prompt, fastv_layer=fastv_layer, fastv_keep=fastv_keep, use_cache=use_cache,
                           prune_stages=prune_stages, prune_rule=prune_rule, dart_pivots=dart_pivots, merge_counts=merge_counts,
                           stage_positions=stage_positions)
    device = prompt.inputs_embeds.device
    batch_size = prompt.inputs_embeds.shape[0]
    generator = torch.Generator(device=device).manual_seed(options.seed) if options.do_sample else None
    eos = torch.as_tensor(eos_token_ids, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    logits = run.prefill()  # (B, V)
    generated = []
    for _ in range(options.max_new_tokens):
        tokens = _next_tokens(logits, options, generator).masked_fill(finished, pad_token_id)  # (B,)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos)
        if stopped is not None:
            finished |= stopped(torch.stack(generated, dim=1))
        if finished.all() or len(generated) == options.max_new_tokens:
            break
        logits = run.feed(tokens[:, None])[:, -1]
    return Generation(torch.stack(generated, dim=1), run.image_tokens_seen)


@torch.inference_mode()
def continuation_logprobs(
    model, prompt: ReducedPrompt, continuation: torch.Tensor, fastv_layer: int | None = None, fastv_keep: int = 0,
    prune_stages: tuple[tuple[int, int], ...] = (), prune_rule: str = "attention", dart_pivots: int = DEFAULT_PIVOTS,
    merge_counts: tuple[int, ...] = (), stage_positions: str = "original",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `continuation` (B, C) token by token after a reduced prompt (teacher forcing).

    Returns (B, C) float32 log-probabilities and (B, C) bool: whether each token was the greedy choice.
    """
    run = LanguageModelRun(model, prompt, fastv_layer=fastv_layer, fastv_keep=fastv_keep, use_cache=True, prune_stages=prune_stages,
                           prune_rule=prune_rule, dart_pivots=dart_pivots, merge_counts=merge_counts, stage_positions=stage_positions)
    first = run.prefill()[:, None]  # (B, 1, V)
    logits = first if continuation.shape[1] == 1 else torch.cat([first, run.feed(continuation[:, :-1])], dim=1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, C, V)
    return logprobs.gather(-1, continuation[..., None]).squeeze(-1), logits.argmax(-1) == continuation
