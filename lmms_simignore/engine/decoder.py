"""Our loop over the decoder layers (`LanguageModelRun`): pruning stages inside the LLM, the KV-cache rules, the image
tokens each layer saw; and generation and teacher-forced log-probabilities on top of it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from lmms_simignore.engine.families import decoder_family
from lmms_simignore.engine.prompt import ReducedPrompt, left_pack
from lmms_simignore.engine.views import LayerView
from lmms_simignore.methods.base import LayerChoice, LayerStage


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
class _Segment:
    """Decoder layers [start, end) and the prompt columns they see.

    stage: the in-LLM stage that starts this segment (None for the first segment); columns: (B, S) the prompt columns
    in this segment's sequence (original coordinates, ascending); gather: (B, S) where each of them sits in the previous
    segment's sequence (None for the first segment); mask: (B, S + t) its 2-D attention mask (t = tokens fed so far);
    image_columns: (I, M) where each image's tokens sit in this segment's sequence; image_visible: (I, M) which of
    them are visible; rebuild: the stage's content of its kept image slots from the previous segment's image tokens
    (`LayerChoice.rebuild`), re-applied wherever the whole sequence passes; shift: (B, S) with repacked positions, how
    many tokens the stage dropped before each prompt column (its position drops by that much); dropped: (B, 1) all it
    dropped (generated tokens shift by it); image_token_index: (I, M) which of its image's original tokens each image
    column holds (where the prompt's per-layer image additions go).
    """

    start: int
    end: int
    stage: LayerStage | None = None
    columns: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    image_columns: torch.Tensor | None = None
    image_visible: torch.Tensor | None = None
    rebuild: Callable | None = None
    shift: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    image_token_index: torch.Tensor | None = None


STAGE_POSITIONS = ("original", "repacked")


class LanguageModelRun:
    """Runs the decoder layers of a model's language model (LLaVA, Mipha, Qwen-VL): the one place a reduction acts inside
    the LLM.

    In-LLM stages (`stages`: `LayerStage`s in layer order, from a plan, for every image; or one such tuple per image,
    each image's own plan's (`engine.image_plans`), all at the same layers) split the layers into segments. A stage at
    layer K chooses, after layer K-1 has run on the prompt and through its `choose(LayerView)`, the `keep` image tokens
    per image among those still visible that layers >= K (up to the next stage) see; a stage that merges also gives
    their new content (`LayerChoice.rebuild`). Positions "original": each token keeps its position id; "repacked":
    from the stage on, a token's position id drops by the number of tokens the stage dropped before it, and generated
    tokens by all it dropped, so the tokens left sit at consecutive positions (gaps left by a pre-LLM stage stay). The
    kept sets are chosen once, from the prompt, and then fixed: every generated token passes through each segment with
    that segment's prompt columns, with a KV cache (one entry per token and layer, each layer its own length) or by
    recomputing the whole sequence. `observe`, if given, sees every layer's input in the prompt pass: (layer index,
    layer, its input (B, S, D), rotary (cos, sin), the visible columns (B, S) bool, their prompt columns (B, S), which
    are image tokens (B, S) bool).
    """

    def __init__(self, model, prompt: ReducedPrompt, stages: tuple | list = (), use_cache: bool = True,
                 observe: Callable | None = None):
        from transformers import DynamicCache

        self.observe = observe  # observe(index, layer, layer_input, position_embeddings, mask, columns, is_image) in the prompt pass
        self.family = decoder_family(model.config.text_config)
        self.language_model = model.model.language_model
        self.final_norm = getattr(self.language_model, self.family.final_norm)
        self.lm_head = model.lm_head
        self.embedding = model.get_input_embeddings()
        self.prompt = prompt
        num_layers = len(self.language_model.layers)
        self.groups = image_groups(stages, prompt.image_columns.shape[0], prompt.image_columns.device)
        for images, group_stages in self.groups:
            self._check_stages(group_stages, num_layers, prompt.image_visible[images])
        stages = self.groups[0][1] if self.groups else ()
        bounds = [0, *(stage.layer for stage in stages), num_layers]
        self.segments = [_Segment(start, end, stage) for start, end, stage in zip(bounds, bounds[1:], [None, *stages])]
        first = self.segments[0]
        first.mask, first.image_columns, first.image_visible = prompt.attention_mask, prompt.image_columns, prompt.image_visible
        first.image_token_index = prompt.image_token_index if prompt.image_token_index is not None else \
            torch.arange(prompt.image_columns.shape[1], device=prompt.image_columns.device).expand_as(prompt.image_columns)
        self.cache = DynamicCache(config=self.language_model.config) if use_cache else None
        self.embeds = prompt.inputs_embeds  # (B, L, D), prompt + tokens fed so far (kept only without a cache)
        self.positions = prompt.position_ids  # (B, L + t), or (B, L + t, 3) with the multimodal rotary embedding
        self.prompt_length = prompt.inputs_embeds.shape[1]
        self.image_tokens_seen: ImageTokensSeen | None = None  # filled by the prompt pass
        self.stage_flops = 0  # FLOPs the in-LLM stages' own choices computed in the prompt pass (projections, scores)

    def _check_stages(self, stages: tuple[LayerStage, ...], num_layers: int, image_visible: torch.Tensor) -> None:
        """`stages` of the images whose candidates are `image_visible` (I_g, M)."""
        previous_layer, previous_keep = 0, int(image_visible.sum(dim=1).min()) if image_visible.numel() else None
        for stage in stages:
            if not previous_layer < stage.layer < num_layers:
                raise ValueError(f"{stage.method}'s stage at layer {stage.layer} must come after layer {previous_layer} and "
                                 f"before the last of {num_layers} decoder layers (stages at "
                                 f"{[other.layer for other in stages]})")
            if stage.keep < 0 or (previous_keep is not None and stage.keep > previous_keep):
                raise ValueError(f"{stage.method}'s stage at layer {stage.layer} keeps {stage.keep} image tokens per image, "
                                 f"but only {previous_keep} are visible before it")
            if stage.positions not in STAGE_POSITIONS:
                raise ValueError(f"{stage.method}'s stage positions must be one of {', '.join(STAGE_POSITIONS)}; got "
                                 f"{stage.positions!r}")
            if stage.positions == "repacked" and self.family.rotary_axes != 1:
                raise ValueError(f"{stage.method}'s stage re-packs positions, which is defined for 1-D positions only; on "
                                 f"{self.family.name} (multimodal rotary positions) the kept tokens keep their own: pass "
                                 f"stage_positions=original")
            previous_layer, previous_keep = stage.layer, stage.keep

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
        offsets = torch.arange(1, count + 1, device=tokens.device).view(1, count, *[1] * (self.positions.dim() - 2))
        new_positions = self.positions[:, -1:] + offsets  # (B, t), or (B, t, 3): each axis goes on from the last token
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
            repack = segment.stage is not None and segment.stage.positions == "repacked"
            if number and (prompt_pass or self.cache is None):  # the whole sequence is here: keep the segment's columns
                generated = torch.arange(previous_length, hidden.shape[1], device=hidden.device)
                index = torch.cat([segment.gather, generated.expand(hidden.shape[0], -1)], dim=1)  # (B, S + t)
                gathered = hidden[rows, index]
                if segment.rebuild is not None:
                    gathered = self._rebuilt(hidden, gathered, self.segments[number - 1], segment)
                hidden, positions = gathered, positions[rows, index]
                if repack:
                    shift = torch.cat([segment.shift, segment.dropped.expand(-1, index.shape[1] - segment.shift.shape[1])], dim=1)
                    positions = positions - shift
            elif number and repack:  # generated tokens only, through the cache
                positions = positions - segment.dropped
            if number:
                previous_length = segment.gather.shape[1]
            position_embeddings = model.rotary_emb(hidden, position_ids=self._rotary_positions(positions))
            sequence_positions = positions if self.family.rotary_axes == 1 else None  # M-RoPE models pass none either
            mask = create_causal_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=segment.mask,
                cache=self.cache, position_ids=sequence_positions, layer_idx=segment.start,
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
                    hidden, attention_mask=mask, position_ids=sequence_positions, position_embeddings=position_embeddings,
                    **cache_kwargs
                )
                if index < len(self.prompt.image_additions) and (prompt_pass or self.cache is None):
                    hidden = self._with_image_additions(hidden, segment, self.prompt.image_additions[index])
                if prompt_pass and index == segment.end - 1 and number + 1 < len(self.segments):
                    self._choose_next_segment(number + 1, layers[index], layer_input, hidden, position_embeddings)
        if prompt_pass:
            self.image_tokens_seen = ImageTokensSeen(*(torch.stack([counts[part] for counts in seen], dim=1) for part in range(2)))
        return self.final_norm(hidden)

    def _with_image_additions(self, hidden: torch.Tensor, segment: _Segment, additions: torch.Tensor) -> torch.Tensor:
        """`hidden` (B, S, D) with `additions` (I, N, D) added at each image token present (its own row of them)."""
        image_rows = self.prompt.image_rows[:, None]
        hidden = hidden.clone()
        hidden[image_rows, segment.image_columns] += additions.gather(
            1, segment.image_token_index[..., None].expand(-1, -1, additions.shape[-1])).to(hidden.dtype)
        return hidden

    def _rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """What the rotary module takes: (B, L) positions as they are, (B, L, 3) as (3, B, L)."""
        return positions if self.family.rotary_axes == 1 else positions.permute(2, 0, 1)

    def _image_columns_map(self, segment: _Segment, length: int) -> torch.Tensor:
        """(B, S) bool: which columns of the segment's prompt sequence hold an image token (masked or not)."""
        is_image = torch.zeros(segment.mask.shape[0], length, dtype=torch.bool, device=segment.mask.device)
        is_image[self.prompt.image_rows[:, None].expand_as(segment.image_columns), segment.image_columns] = True
        return is_image

    def _choose_next_segment(self, number: int, layer, layer_input: torch.Tensor, layer_output: torch.Tensor,
                             position_embeddings) -> None:
        """The stage after `layer` (the last layer before it; its input and output (B, S, D)): its choice among the
        image tokens still visible, through its `choose`; fill the next segment's columns and mask."""
        previous, segment = self.segments[number - 1], self.segments[number]
        image_rows = self.prompt.image_rows
        visible = previous.mask.bool()  # (B, S), the prompt pass: no generated token yet
        is_image = self._image_columns_map(previous, layer_output.shape[1])
        chosen_by_group = []
        for images, group_stages in self.groups:  # one group of images per plan (images of one size share one)
            stage = group_stages[number - 1]
            view = LayerView(
                layer=layer, next_layer=self.language_model.layers[segment.start], layer_input=layer_input,
                layer_output=layer_output, position_embeddings=position_embeddings, visible=visible,
                is_image=is_image, image_rows=image_rows[images], image_columns=previous.image_columns[images],
                image_visible=previous.image_visible[images], keep=stage.keep, final_norm=self.final_norm,
                count_flops=self._count_stage_flops, first_layer=partial(self._first_layer_inputs, previous, images),
            )
            group_choice = stage.choose(view)
            if tuple(group_choice.kept.shape) != (len(images), stage.keep):
                raise ValueError(f"{stage.method}'s stage at layer {segment.start} returned "
                                 f"{tuple(group_choice.kept.shape)} kept tokens; expected {(len(images), stage.keep)} "
                                 f"(images, keep)")
            chosen_by_group.append((images, group_choice))
        choice, slots = _combined(chosen_by_group, previous.image_columns.shape[0], segment.stage.method, segment.start)
        if choice.rebuild is not None and segment.start < len(self.prompt.image_additions):
            raise ValueError(f"{segment.stage.method}'s stage at layer {segment.start} merges image tokens, but this model "
                             f"adds image features to the outputs of layers up to {len(self.prompt.image_additions) - 1} "
                             f"(DeepStack), which a merged token has no row of; put the stage at layer "
                             f"{len(self.prompt.image_additions)} or later")
        chosen = previous.image_columns.gather(1, choice.kept)  # (I, K) columns, ascending (a short image's last repeated)
        keep = visible.clone()
        keep[image_rows[:, None].expand_as(previous.image_columns), previous.image_columns] = False
        keep[image_rows[:, None].expand_as(chosen)[slots], chosen[slots]] = True
        segment.gather, mask, target = left_pack(keep)
        if segment.stage.positions == "repacked":
            dropped = visible & ~keep  # (B, S): what this stage removed (masked and padding columns were not there)
            segment.shift = dropped.long().cumsum(dim=1).gather(1, segment.gather)  # (B, S')
            segment.dropped = dropped.long().sum(dim=1, keepdim=True)  # (B, 1)
        segment.mask = mask.to(previous.mask.dtype)
        base = previous.columns if previous.columns is not None else torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        segment.columns = base.gather(1, segment.gather)
        segment.image_columns = target[image_rows[:, None].expand_as(chosen), chosen]  # (I, K) in the new sequence
        segment.image_visible = slots
        segment.image_token_index = previous.image_token_index.gather(1, choice.kept)
        segment.rebuild = choice.rebuild

    def _first_layer_inputs(self, segment: _Segment, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`LayerView.first_layer_inputs` of `images` (I,) in `segment`'s sequence: from the prompt the first layer got."""
        prompt = self.prompt
        rows, image_columns = prompt.image_rows[images], prompt.image_columns[images]  # (I,), (I, N)
        embeds, length = prompt.inputs_embeds, prompt.inputs_embeds.shape[1]
        image = embeds[rows[:, None], image_columns]  # (I, N, D)
        is_image = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        is_image[prompt.image_rows[:, None].expand_as(prompt.image_columns), prompt.image_columns] = True
        columns = torch.arange(length, device=embeds.device)
        after = (columns[None] > image_columns.amax(dim=1, keepdim=True)) & prompt.attention_mask[rows].bool() & ~is_image[rows]
        counts = after.sum(dim=1)  # (I,)
        text_columns = torch.sort((~after).long(), dim=1, stable=True).indices[:, : int(counts.max()) if len(counts) else 0]
        text_real = torch.arange(text_columns.shape[1], device=embeds.device)[None] < counts[:, None]  # (I, T)
        text = embeds[rows[:, None], text_columns]  # (I, T, D)
        here = segment.columns[rows] if segment.columns is not None else columns.expand(len(rows), -1)  # (I, S) prompt column
        here = here.masked_fill(~segment.mask[rows, : here.shape[1]].bool(), -1)  # left padding first: ascending
        return image, prompt.image_visible[images], text, text_real, torch.searchsorted(here.contiguous(), text_columns.contiguous())

    def _count_stage_flops(self, flops: int) -> None:
        self.stage_flops += int(flops)

    def _rebuilt(self, previous_hidden: torch.Tensor, hidden: torch.Tensor, previous: _Segment, segment: _Segment) -> torch.Tensor:
        """`hidden` (B, S, D), the new segment's gathered sequence, with its image slots replaced by the stage's content
        built from the previous segment's image tokens in `previous_hidden` (B, S_prev, D)."""
        image_rows = self.prompt.image_rows[:, None]
        content = segment.rebuild(previous_hidden[image_rows, previous.image_columns])  # (I, K, D)
        hidden = hidden.clone()
        hidden[image_rows, segment.image_columns] = content.to(hidden.dtype)
        return hidden


def image_groups(stages, images: int, device) -> list[tuple[torch.Tensor, tuple[LayerStage, ...]]]:
    """The images that share in-LLM stages: `stages` for all of them (a plan's `layers`), or one tuple per image (the
    plan of each image's own size), grouped by plan -> [((I_g,) image indices, stages)]. Every group's stages must sit
    at the same layers with the same position rule (they differ in what they keep)."""
    if not stages or isinstance(stages[0], LayerStage):
        return [(torch.arange(images, device=device), tuple(stages))] if stages else []
    if len(stages) != images:
        raise ValueError(f"one tuple of in-LLM stages per image is needed: {images} images, {len(stages)} given")
    by_plan: dict[tuple, list[int]] = {}
    for index, own in enumerate(stages):
        by_plan.setdefault(tuple(own), []).append(index)
    groups = [(torch.tensor(indices, device=device), own) for own, indices in by_plan.items()]
    shapes = {tuple((stage.layer, stage.positions, stage.method) for stage in own) for _, own in groups}
    if len(shapes) > 1:
        raise ValueError(f"the images' in-LLM stages must sit at the same layers with the same position rule; got {sorted(shapes)}")
    return [group for group in groups if group[1]] if any(own for _, own in groups) else []


def _combined(chosen_by_group, images: int, method: str, layer: int) -> tuple[LayerChoice, torch.Tensor]:
    """One choice for all images from each group's -> (LayerChoice with (I, K) kept, K the largest group's keep: a group
    that keeps fewer repeats its last kept index, and, where the groups merge, its last content), (I, K) bool: which kept
    entries are real."""
    if len(chosen_by_group) == 1 and len(chosen_by_group[0][0]) == images:
        kept = chosen_by_group[0][1].kept
        return chosen_by_group[0][1], torch.ones(kept.shape, dtype=torch.bool, device=kept.device)
    width = max(choice.kept.shape[1] for _, choice in chosen_by_group)
    device = chosen_by_group[0][1].kept.device
    kept = torch.zeros(images, width, dtype=torch.long, device=device)
    slots = torch.zeros(images, width, dtype=torch.bool, device=device)
    for group, choice in chosen_by_group:
        count = choice.kept.shape[1]
        if count == 0 and width:
            raise ValueError(f"{method}'s stage at layer {layer} keeps no token of some images and some of others")
        kept[group, :count] = choice.kept
        kept[group, count:] = choice.kept[:, -1:] if count else 0
        slots[group, :count] = True
    merges = any(choice.rebuild is not None for _, choice in chosen_by_group)
    return LayerChoice(kept, partial(_rebuilt_by_group, chosen_by_group, width) if merges else None), slots


def _rebuilt_by_group(chosen_by_group, width: int, candidates: torch.Tensor) -> torch.Tensor:
    """The kept slots' content (I, K, D) of every image from its candidates' states (I, M, D), each group's by its own
    choice (the kept candidates as they are where a group merges nothing); a group's last content fills its slots past
    its own keep (repeats of its last kept index)."""
    content = candidates.new_zeros(candidates.shape[0], width, candidates.shape[-1])
    for group, choice in chosen_by_group:
        own = candidates[group]  # (I_g, M, D)
        if choice.rebuild is not None:
            own = choice.rebuild(own)
        else:
            own = own.gather(1, choice.kept[..., None].expand(-1, -1, own.shape[-1]))
        count = own.shape[1]
        content[group, :count] = own.to(content.dtype)
        content[group, count:] = own[:, -1:].to(content.dtype)
    return content


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
    stages: tuple[LayerStage, ...] = (),
) -> Generation:
    """Generate after a reduced prompt, with the plan's in-LLM `stages` (see `LanguageModelRun`): the new token ids
    and the image tokens each decoder layer saw.

    With `use_cache` the prompt is encoded once and each step feeds one token at position
    (last position + 1); without it the whole sequence is recomputed every step (same result, slower).
    `stopped(generated (B, t)) -> (B,) bool` marks rows that hit a stop string.
    """
    run = LanguageModelRun(model, prompt, stages=stages, use_cache=use_cache)
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
    model, prompt: ReducedPrompt, continuation: torch.Tensor, stages: tuple[LayerStage, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, ImageTokensSeen]:
    """Log-probabilities of `continuation` (B, C) token by token after a reduced prompt (teacher forcing), with the
    plan's in-LLM `stages`.

    Returns (B, C) float32 log-probabilities, (B, C) bool: whether each token was the greedy choice, and the image
    tokens each layer saw in the prompt pass.
    """
    run = LanguageModelRun(model, prompt, stages=stages, use_cache=True)
    first = run.prefill()[:, None]  # (B, 1, V)
    logits = first if continuation.shape[1] == 1 else torch.cat([first, run.feed(continuation[:, :-1])], dim=1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, C, V)
    return logprobs.gather(-1, continuation[..., None]).squeeze(-1), logits.argmax(-1) == continuation, run.image_tokens_seen
