"""The stages before the first decoder layer, as a plan gives them: a stage in the vision tower (a shorter image in
the tower's space, then projected) and a stage after the projector (kept image tokens, masked or dropped, or a shorter
image); the prompt the LLM's first layer gets."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from lmms_simignore.engine.families import check_plan_support
from lmms_simignore.engine.prompt import (PromptEmbeddings, ReducedPrompt, build_prompt_embeddings,
                                          embed_texts, image_grid, image_tokens_per_image, reduce_prompt,
                                          with_image_blocks, with_longer_image_blocks, with_shorter_images)
from lmms_simignore.engine.views import ImageTokensView, TowerView
from lmms_simignore.methods.base import VisionStage
from lmms_simignore.settings import Plan, ReductionSettings


@torch.inference_mode()
def vision_tower_states(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vision tower's hidden states of each image: the embeddings, then each encoder layer's output, each (I, T, D)."""
    dtype = model.get_input_embeddings().weight.dtype
    return model.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states


def plan_for(config, settings: ReductionSettings) -> Plan:
    """The settings' stages on a model of this llava `config`; raises, naming the argument or method, on budgets or
    layers it cannot take or on what a method needs that it cannot give (before any weights load)."""
    plan = settings.plan(image_tokens_per_image(config), config.text_config.num_hidden_layers, image_grid(config))
    check_plan_support(config, plan)
    return plan


@torch.inference_mode()
def vision_stage_features(model, stage: VisionStage, tower_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(I, K, D) a vision-side stage's shorter images, projected into the LLM input space; tower_states: from
    `vision_tower_states`. An adaptive stage's images are padded to the longest (`vision_stage_images` gives lengths)."""
    return vision_stage_images(model, stage, tower_states)[0]


@torch.inference_mode()
def vision_stage_images(model, stage: VisionStage, tower_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A vision-side stage's shorter images, projected: (I, K, D), and (I,) each image's own length where the stage is
    adaptive (else None: every image K)."""
    view = TowerView.of(model.config, tower_states, model.model.vision_tower.encoder.layers)
    shorter, lengths = stage.shorten(view) if stage.adaptive else (stage.shorten(view), None)
    return model.model.multi_modal_projector(shorter), lengths


def every_image_token(prompt: PromptEmbeddings) -> torch.Tensor:
    """A choice that keeps everything: (I, N) indices of all of each image's tokens, or (I, N) flags of each image's
    own slots where the batch's images differ in size."""
    if prompt.image_lengths is not None:
        return prompt.image_slots
    return torch.arange(prompt.tokens_per_image, device=prompt.image_positions.device).expand(prompt.image_rows.shape[0], -1)


def choose_kept_image_tokens(plan: Plan, image_features: torch.Tensor, text_embeds: torch.Tensor | None = None,
                             text_mask: torch.Tensor | None = None, image_seeds: list[int] | None = None) -> torch.Tensor:
    """The plan's pre-LLM choice on `image_features` (I, N, D) alone: (I, K) indices (all N without such a stage), or
    (I, N) flags for an adaptive budget. text_embeds (I, T, D) and text_mask (I, T): each image's comparison text, as
    embedded (for a stage that reads text); image_seeds: one per image (random choices)."""
    images, tokens = image_features.shape[:2]
    if plan.pre_llm is None:
        return torch.arange(tokens, device=image_features.device).expand(images, -1)
    rows = torch.arange(images, device=image_features.device)
    view = ImageTokensView(image_features, rows, image_seeds, None, lambda with_bos: (text_embeds, text_mask))
    return plan.pre_llm.choose(view)


@torch.inference_mode()
def embed_prompt(model, plan: Plan, inputs, tower_states: tuple[torch.Tensor, ...] | None = None) -> PromptEmbeddings:
    """Processor outputs of a batch -> its embeddings, after the plan's vision-side stage if it has one (each image then
    the stage's K projected tokens, where the image was, at contiguous positions).

    tower_states: the tower's hidden states when already computed (`vision_tower_states`).
    """
    pixel_values = inputs.get("pixel_values")
    if plan.vision is None or pixel_values is None or not pixel_values.shape[0]:
        return build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], pixel_values)
    states = vision_tower_states(model, pixel_values) if tower_states is None else tower_states
    features, lengths = vision_stage_images(model, plan.vision, states)  # (I, K, D), (I,) or None
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    image_token_id = model.config.image_token_id
    image_tokens = (input_ids == image_token_id).sum(dim=1)  # (B,) what the rows' images had
    slots = image_tokens_per_image(model.config)
    if features.shape[1] > slots:  # an adaptive stage made an image longer than the model's: room for it
        input_ids, attention_mask = with_longer_image_blocks(input_ids, attention_mask, image_token_id,
                                                             features.shape[1] - slots)
        slots = features.shape[1]
    embedding = model.get_input_embeddings().weight
    placeholders = embedding.new_zeros(features.shape[0], slots, embedding.shape[1])
    prompt = build_prompt_embeddings(model, input_ids, attention_mask, image_features=placeholders, image_tokens=image_tokens)
    return with_shorter_images(prompt, features, lengths)


def _comparison_embeddings(model, tokenizer, texts: list[str], image_rows: torch.Tensor, with_bos: bool):
    """(I, T, D), (I, T): the LLM input embeddings of each image's row's comparison text (BOS first with `with_bos`)."""
    if with_bos and tokenizer.bos_token_id is None:
        raise ValueError("text_bos=true compares image tokens with the BOS embedding too, but this model's tokenizer has no "
                         "BOS token (Qwen's have none); drop text_bos")
    bos = [tokenizer.bos_token_id] if with_bos else []
    token_ids = [bos + tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    embeds, mask = embed_texts(model, token_ids)
    return embeds[image_rows], mask[image_rows]


@torch.inference_mode()
def apply_pre_llm_stage(model, tokenizer, plan: Plan, prompt: PromptEmbeddings, comparison_texts: list[str],
                        image_seeds: list[int]) -> ReducedPrompt:
    """The plan's stage after the projector on every image of `prompt` (models whose images are of one size):
    `apply_image_plans_before_llm` with this plan for each image."""
    return apply_image_plans_before_llm(model, tokenizer, [plan] * prompt.image_rows.shape[0], prompt, comparison_texts,
                                        image_seeds)


def image_plans(config, settings: ReductionSettings, prompt: PromptEmbeddings) -> list[Plan]:
    """The plan of each image of `prompt` on a model whose images have their own sizes (dynamic resolution, tiles): each
    image's budget is of its own tokens (a fraction of them; a count larger than an image's tokens is refused, naming
    the image's size; with budget_per=tile, a count per tile), spatial methods work on its own grid(s), and images of
    one size share one plan."""
    lengths = prompt.image_lengths.tolist() if prompt.image_lengths is not None else \
        [prompt.tokens_per_image] * prompt.image_rows.shape[0]
    grids = [tuple(grid) for grid in prompt.image_grids.tolist()] if prompt.image_grids is not None else [None] * len(lengths)
    tiles = prompt.image_tiles if prompt.image_tiles is not None else [None] * len(lengths)
    views = prompt.image_views.tolist() if prompt.image_views is not None else [1] * len(lengths)
    keys = list(zip(lengths, grids, tiles, views))
    plans: dict[tuple, Plan] = {}
    for key in keys:
        if key not in plans:
            length, grid, tiling, view_count = key
            try:
                plans[key] = settings.plan(length, config.text_config.num_hidden_layers, grid, tiling, view_count)
            except ValueError as error:
                shape = f" ({grid[0]} x {grid[1]})" if grid else ""
                shape += f" in {view_count} tiles" if view_count > 1 else ""
                raise ValueError(f"an image of {length} tokens{shape} in this batch: {error}") from error
            check_plan_support(config, plans[key])
    return [plans[key] for key in keys]


def images_by_plan(plans: list[Plan]) -> list[list[int]]:
    """The indices of the images that share each plan (`image_plans` gives images of one size one plan), in order."""
    groups: dict[int, list[int]] = {}
    for index, plan in enumerate(plans):
        groups.setdefault(id(plan), []).append(index)
    return list(groups.values())


@torch.inference_mode()
def apply_vision_stages_to_views(model, prompt: PromptEmbeddings, plans: list[Plan]) -> PromptEmbeddings:
    """Each image's plan's stage in the tower, on a prompt whose images the tower saw as several views
    (`prompt.tower`: a `TowerView` with its tiling): each image's views shortened and arranged by the stage
    (`VisionStage.shorten_views`), projected, and placed as the image's whole block (its separators leave; the
    arrangement is the method's), at contiguous positions. Images of one plan are shortened together."""
    groups = images_by_plan(plans)
    tower, blocks = prompt.tower, [None] * len(plans)
    for indices in groups:
        stage = plans[indices[0]].vision
        if stage.shorten_views is None:
            raise ValueError(f"{stage.method} has no version for images the tower sees in several views (tiles)")
        view = tower if len(groups) == 1 else _views_of(tower, indices)  # one plan for all: the tower's states as they are
        for index, tokens in zip(indices, stage.shorten_views(view)):
            blocks[index] = model.model.multi_modal_projector(tokens)
    separators = [torch.zeros(len(block), dtype=torch.bool, device=block.device) for block in blocks]
    shorter = with_image_blocks(prompt, blocks, separators)
    shorter.image_views, shorter.lay_out = None, None
    return shorter


@torch.inference_mode()
def kept_in_views(prompt: PromptEmbeddings, plans: list[Plan]) -> torch.Tensor:
    """(I, N) bool: the image tokens each image's plan's stage in the tower keeps (`VisionStage.select_views`: the patches
    kept in each view, carried to the image's tokens where the model packs them, `TiledImage.token_views`). Images of
    one plan are chosen together."""
    groups = images_by_plan(plans)
    tower = prompt.tower
    kept = torch.zeros(prompt.image_positions.shape, dtype=torch.bool, device=prompt.image_positions.device)
    for indices in groups:
        view = tower if len(groups) == 1 else _views_of(tower, indices)
        flags = plans[indices[0]].vision.select_views(view)  # (V_g, P)
        for index, image in zip(indices, view.tiling):
            if image.token_views is None:
                raise ValueError(f"{plans[index].vision.method}: this model packs an image's views otherwise than as their "
                                 f"patches (a grid shrunk by interpolation), so the patches kept in each view cannot be "
                                 f"carried to the image's tokens")
            kept[index, : len(image.token_views)] = flags[image.views].flatten()[image.token_views]
    return kept


@torch.inference_mode()
def apply_image_plans_before_llm(model, tokenizer, plans: list[Plan], prompt: PromptEmbeddings, comparison_texts: list[str],
                                 image_seeds: list[int]) -> ReducedPrompt:
    """Each image's plan's stage after the projector on `prompt` (one plan per image: `image_plans`; images of one plan
    chosen together): the kept tokens masked or dropped (`plan.apply`), or each image replaced by its shorter image;
    without such stages, the prompt as it is.

    comparison_texts: one per row (a stage that reads text embeds it); image_seeds: one per image (random choices).
    """
    if all(plan.pre_llm is None for plan in plans):
        return reduce_prompt(prompt, every_image_token(prompt), "drop")
    groups = images_by_plan(plans)
    choices = []
    for indices in groups:
        plan, images = plans[indices[0]], torch.tensor(indices, device=prompt.image_positions.device)
        rows = prompt.image_rows[images]
        grid = tuple(prompt.image_grids[indices[0]].tolist()) if prompt.image_grids is not None else None
        seeds = [image_seeds[i] for i in indices] if image_seeds else []  # only random choices need them
        view = ImageTokensView(prompt.image_features[images, : plan.image_tokens], rows, seeds, grid,
                               partial(_comparison_embeddings, model, tokenizer, comparison_texts, rows))
        choices.append((images, plan, plan.pre_llm.choose(view)))
    if plans[0].pre_llm.replaces:
        return _with_shorter_images(prompt, choices)
    contiguous = plans[0].pre_llm.positions == "contiguous"
    if len(choices) == 1 and prompt.image_lengths is None:  # one plan for every image: its (I, K) indices as they are
        return reduce_prompt(prompt, choices[0][2], plans[0].apply, contiguous)
    kept = torch.zeros(prompt.image_positions.shape, dtype=torch.bool, device=prompt.image_positions.device)  # (I, N)
    for images, plan, chosen in choices:  # (I_g, K) indices, or (I_g, N_g) flags
        if chosen.dtype != torch.bool:
            chosen = torch.zeros(len(images), plan.image_tokens, dtype=torch.bool, device=kept.device).scatter_(1, chosen, True)
        kept[images, : plan.image_tokens] = chosen
    return reduce_prompt(prompt, kept, plans[0].apply, contiguous)


def _with_shorter_images(prompt: PromptEmbeddings, choices: list) -> ReducedPrompt:
    """The prompt with each image replaced by its group's `ShorterImage` ([(images (I_g,), plan, shorter)]): features
    padded to the longest, each image's grid, and its rows of each per-layer image addition, reduced the same way."""
    num_images = prompt.image_rows.shape[0]
    device = prompt.image_positions.device
    width = max(shorter.features.shape[1] for _, _, shorter in choices)
    features = prompt.image_features.new_zeros(num_images, width, prompt.image_features.shape[-1])
    lengths = torch.zeros(num_images, dtype=torch.long, device=device)
    grids = torch.zeros(num_images, 2, dtype=torch.long, device=device)
    additions = [addition.new_zeros(num_images, width, addition.shape[-1]) for addition in prompt.image_additions]
    for images, plan, shorter in choices:
        count = shorter.features.shape[1]
        features[images, :count] = shorter.features.to(features.dtype)
        lengths[images] = count
        if shorter.grid is not None:
            grids[images] = torch.tensor(shorter.grid, device=device)
        if additions and shorter.same is None:
            raise ValueError(f"{plan.pre_llm.method}'s shorter image cannot carry this model's per-layer image additions "
                             f"(DeepStack): the stage gives no way to reduce them alike")
        for addition, level in zip(additions, prompt.image_additions):
            addition[images, :count] = shorter.same(level[images, : plan.image_tokens]).to(addition.dtype)
    has_grids = all(shorter.grid is not None for _, _, shorter in choices)
    if prompt.lay_out is not None:  # separators between the image's rows: the family lays out each shorter image
        shorter_prompt = _with_laid_out_images(prompt, choices, features, lengths, grids if has_grids else None)
    else:
        shorter_prompt = with_shorter_images(prompt, features, lengths, grids if has_grids else None, tuple(additions))
    return reduce_prompt(shorter_prompt, every_image_token(shorter_prompt), "drop")


def _views_of(tower: TowerView, images: list[int]) -> TowerView:
    """The tower's states of `images`' views only (each image's base view and crops, in order), re-tiled."""
    parts = [tower.tiling[i] for i in images]
    views = torch.cat([torch.arange(part.views.start, part.views.stop) for part in parts]).to(tower.states[0].device)
    starts = [0, *torch.tensor([part.views.stop - part.views.start for part in parts]).cumsum(0).tolist()]
    tiling = tuple(dataclasses.replace(part, views=slice(start, stop)) for part, start, stop in zip(parts, starts, starts[1:]))
    return dataclasses.replace(tower, states=tuple(states[views] for states in tower.states), tiling=tiling)


def _with_laid_out_images(prompt: PromptEmbeddings, choices: list, features: torch.Tensor, lengths: torch.Tensor,
                          grids: torch.Tensor | None) -> PromptEmbeddings:
    """The prompt with each image's block replaced by its shorter image laid out by the family (`prompt.lay_out`: the
    shorter image's tokens with separators placed anew for its tiles)."""
    tiles: list = [None] * features.shape[0]
    for images, _, shorter in choices:
        for image in images.tolist():
            tiles[image] = shorter.tiles
    blocks, separators = zip(*(prompt.lay_out(features[image, : int(lengths[image])], tiles[image])
                               for image in range(features.shape[0])))
    return with_image_blocks(prompt, list(blocks), list(separators), grids,
                             tuple(tiles) if all(tile is not None for tile in tiles) else None)


def reduce_each_image(model, tokenizer, settings: ReductionSettings, prompt: PromptEmbeddings, comparison_texts: list[str],
                      image_seeds: list[int]) -> tuple[ReducedPrompt, list]:
    """A prompt of a family whose images have their own sizes (embedded by its adapter) -> the prompt the first decoder
    layer gets and one tuple of in-LLM stages per image: each image planned for its own tokens (`image_plans`), then
    reduced in the tower (on the views `prompt.tower` kept) or before the LLM."""
    plans = image_plans(model.config, settings, prompt)
    if any(plan.vision is not None and plan.vision.select_views is not None for plan in plans):
        return reduce_prompt(prompt, kept_in_views(prompt, plans), "drop", contiguous=True), [plan.layers for plan in plans]
    if any(plan.vision is not None for plan in plans):
        prompt = apply_vision_stages_to_views(model, prompt, plans)
    reduced = apply_image_plans_before_llm(model, tokenizer, plans, prompt, comparison_texts, image_seeds)
    return reduced, [plan.layers for plan in plans]


def prepare_reduced_prompt(model, tokenizer, plan: Plan, inputs, comparison_texts: list[str], image_seeds: list[int],
                           tower_states: tuple[torch.Tensor, ...] | None = None) -> ReducedPrompt:
    """Processor outputs of a batch -> the prompt after the plan's stages before the LLM (what the model classes run)."""
    prompt = embed_prompt(model, plan, inputs, tower_states)
    return apply_pre_llm_stage(model, tokenizer, plan, prompt, comparison_texts, image_seeds)
