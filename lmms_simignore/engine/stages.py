"""The stages before the first decoder layer: a pre-LLM choice among the projected image tokens (Simignore, random)
or a vision-side stage that shortens each image in the tower (VisionZip)."""

from __future__ import annotations

import torch

from lmms_simignore.engine.attention import check_vision_stage_support, vision_layer_attention
from lmms_simignore.engine.prompt import PromptEmbeddings, ReducedPrompt, build_prompt_embeddings, embed_texts, image_tokens_per_image, reduce_prompt
from lmms_simignore.methods import pairwise_similarity, random_scores, select_by_order, walk_scores
from lmms_simignore.methods.selection import within_margin_of_best
from lmms_simignore.methods.visionzip import visionzip_tokens
from lmms_simignore.settings import ReductionSettings


def choose_kept_image_tokens(
    settings: ReductionSettings,
    image_features: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    image_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Indices (I, K) into each image's N tokens that the pre-LLM stage keeps; K from the settings' budget (with
    keep=auto, (I, N) bool flags: each image its own number).

    image_features: (I, N, D); text_embeds: (I, T, D) and text_mask: (I, T), the text of each image's row
    (simignore only); image_seeds: one seed per image (random choices only).
    """
    num_images, tokens_per_image = image_features.shape[:2]
    keep = settings.kept_per_image(tokens_per_image)
    device = image_features.device
    if num_images == 0:  # no image in the batch: nothing to choose
        return torch.zeros(0, keep, dtype=torch.long, device=device)
    if settings.adaptive:  # (I, N) flags: each image keeps its own number
        if text_embeds is None or text_mask is None:
            raise ValueError("simignore needs the text embeddings of each image's row")
        scores = pairwise_similarity(image_features, text_embeds, text_mask, settings.similarity).amax(dim=-1)  # (I, N)
        return within_margin_of_best(scores, settings.margin)
    if settings.pre_llm is None or keep == tokens_per_image:
        return torch.arange(tokens_per_image, device=device).expand(num_images, -1)
    random_choice = settings.pre_llm == "random" or settings.order == "random"
    if random_choice:
        if image_seeds is None or len(image_seeds) != num_images:
            raise ValueError(f"random choices need one seed per image ({num_images}), got {image_seeds!r}")
        scores = random_scores(image_seeds, tokens_per_image, device)  # (I, N)
    else:
        if text_embeds is None or text_mask is None:
            raise ValueError("simignore needs the text embeddings of each image's row")
        pairwise = pairwise_similarity(image_features, text_embeds, text_mask, settings.similarity)  # (I, N, T)
        if settings.uses_walk:
            scores = walk_scores(pairwise, settings.simignore_start, settings.simignore_step)
        else:
            scores = pairwise.amax(dim=-1)  # (I, N)
    return select_by_order(scores, keep, "random" if random_choice else settings.order)


def apply_pre_llm_stage(
    model, tokenizer, settings: ReductionSettings, prompt: PromptEmbeddings, comparison_texts: list[str], image_seeds: list[int]
) -> ReducedPrompt:
    """Choose the kept image tokens of the pre-LLM stage and apply them (mask or drop).

    comparison_texts: one per row (Simignore's text); image_seeds: one per image (random choices).
    """
    text_embeds = text_mask = None
    if settings.pre_llm == "simignore" and prompt.image_rows.numel():
        bos = [tokenizer.bos_token_id] if settings.text_bos and tokenizer.bos_token_id is not None else []
        token_ids = [bos + tokenizer(text, add_special_tokens=False).input_ids for text in comparison_texts]
        text_embeds, text_mask = embed_texts(model, token_ids)
        text_embeds, text_mask = text_embeds[prompt.image_rows], text_mask[prompt.image_rows]
    kept = choose_kept_image_tokens(settings, prompt.image_features, text_embeds, text_mask, image_seeds)
    return reduce_prompt(prompt, kept, settings.apply)


@torch.inference_mode()
def vision_tower_states(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vision tower's hidden states of each image: the embeddings, then each encoder layer's output, each (I, T, D)."""
    dtype = model.get_input_embeddings().weight.dtype
    return model.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states


@torch.inference_mode()
def visionzip_image_features(model, tower_states: tuple[torch.Tensor, ...], dominant: int, contextual: int) -> torch.Tensor:
    """The images after VisionZip's vision-side stage, projected into the LLM input space: (I, dominant + contextual, D).

    tower_states: from `vision_tower_states`. The feature layer's CLS attention and keys are recomputed from
    that layer's parts on the layer's input.
    """
    check_vision_stage_support(model)
    feature_index = model.config.vision_feature_layer % len(tower_states)
    layer = model.model.vision_tower.encoder.layers[feature_index - 1]
    cls_attention, keys = vision_layer_attention(layer, tower_states[feature_index - 1])  # (I, H, T), (I, H, T, d)
    tokens = visionzip_tokens(tower_states[feature_index], cls_attention.sum(dim=1), keys.mean(dim=1), dominant, contextual)
    return model.model.multi_modal_projector(tokens)  # (I, K, D)


def apply_vision_stage(model, settings: ReductionSettings, inputs, tower_states: tuple[torch.Tensor, ...] | None = None) -> ReducedPrompt:
    """Processor outputs of a batch -> the prompt after a vision-side stage: each image becomes the K tokens the
    stage returns, placed where its image tokens were, at contiguous positions (the image is shorter).

    tower_states: the tower's hidden states when already computed (`vision_tower_states`).
    """
    pixel_values = inputs.get("pixel_values")
    features = None
    if pixel_values is not None and pixel_values.shape[0]:
        if tower_states is None:
            tower_states = vision_tower_states(model, pixel_values)
        dominant, contextual = settings.vision_budget(image_tokens_per_image(model.config))
        features = visionzip_image_features(model, tower_states, dominant, contextual)  # (I, K, D)
    prompt = build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], pixel_values, image_features=features)
    kept = torch.arange(prompt.image_features.shape[1], device=prompt.image_positions.device)
    return reduce_prompt(prompt, kept.expand(prompt.image_positions.shape[0], -1), "drop", positions="contiguous")


def prepare_reduced_prompt(
    model, tokenizer, settings: ReductionSettings, inputs, comparison_texts: list[str], image_seeds: list[int]
) -> ReducedPrompt:
    """Processor outputs of a batch -> the prompt after the vision-side or pre-LLM stage (what the model classes run)."""
    if settings.vision is not None:
        return apply_vision_stage(model, settings, inputs)
    prompt = build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))
    return apply_pre_llm_stage(model, tokenizer, settings, prompt, comparison_texts, image_seeds)
