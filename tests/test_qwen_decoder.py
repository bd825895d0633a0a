"""Our loop over the decoder layers on Qwen2-VL and Qwen2.5-VL (multimodal rotary positions), on tiny random models
of transformers' own classes: the prompt embedded by the family adapter, then the model's own forward and generate
are what the loop must reproduce, and an in-LLM rule's attention row is what transformers' eager weights give."""

import math

import pytest
import torch
from method_checks import eager_attention_weights
from PIL import Image

from lmms_simignore import engine
from lmms_simignore.families import qwen_vl
from lmms_simignore.methods.base import LayerChoice, LayerStage
from lmms_simignore.methods.fastv import choose_by_last_token_attention, fastv_stage
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny_qwen import build_tiny_qwen

pytest.importorskip("torchvision")  # transformers' Qwen-VL processors need it

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
QUESTIONS = ["What colour is the circle?", "Is there a red square in the picture on the left?"]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tmp_path_factory):
    """(model, eager model, processor) of one tiny family."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    return model, eager, processor


def batch(processor, size=(84, 56)):
    """Two left-padded prompts of different lengths, one image each (of one size)."""
    images = [Image.new("RGB", size, (200, 30, 30)), Image.effect_noise(size, 60).convert("RGB")]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in QUESTIONS]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def unreduced(model, inputs):
    prompt = qwen_vl.embed_prompt(model, inputs)
    return prompt, engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")


def test_the_prompt_holds_each_image_s_merged_patches_at_its_pad_tokens_with_the_model_s_own_positions(qwen):
    model, _, processor = qwen
    inputs = batch(processor)
    prompt = qwen_vl.embed_prompt(model, inputs)
    height, width = (int(x) for x in inputs["image_grid_thw"][0, 1:])
    assert prompt.image_positions.shape == (2, height * width // 4)  # one token per 2x2 block of 14 px patches
    expected, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    assert torch.equal(prompt.position_ids, expected.permute(1, 2, 0))
    first = prompt.image_positions[0]
    rows_and_columns = prompt.position_ids[0, first, 1:] - prompt.position_ids[0, first, :1]  # (N, 2) height, width
    assert rows_and_columns[: width // 2, 0].tolist() == [0] * (width // 2)  # raster order: the first row of blocks
    assert rows_and_columns[: width // 2, 1].tolist() == list(range(width // 2))


def test_the_loop_gives_the_model_s_own_logits(qwen):
    model, _, processor = qwen
    inputs = batch(processor)
    _, reduced = unreduced(model, inputs)
    with torch.inference_mode():
        expected = model(**inputs).logits[:, -1]
    assert torch.allclose(engine.LanguageModelRun(model, reduced).prefill(), expected, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_continues_the_positions_as_transformers_generate_does(qwen, use_cache):
    model, _, processor = qwen
    inputs = batch(processor)
    _, reduced = unreduced(model, inputs)
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                  pad_token_id=tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    ours = engine.generate(model, reduced, engine.DecodingOptions(max_new_tokens=8), eos_token_ids=[-1],
                           pad_token_id=tokenizer.pad_token_id, use_cache=use_cache).tokens
    assert ours.tolist() == expected.tolist()


def test_masking_and_dropping_image_tokens_compute_the_same_logits(qwen):
    model, _, processor = qwen
    inputs = batch(processor)
    prompt, _ = unreduced(model, inputs)
    kept = torch.randperm(prompt.tokens_per_image, generator=torch.Generator().manual_seed(0))[:5].sort().values
    kept = kept.expand(prompt.image_positions.shape[0], -1)
    masked = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, kept, "mask")).prefill()
    dropped = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, kept, "drop")).prefill()
    assert torch.allclose(masked, dropped, atol=1e-5)
    assert not torch.allclose(masked, engine.LanguageModelRun(model, unreduced(model, inputs)[1]).prefill(), atol=1e-4)


def test_fastv_keeps_what_the_eager_attention_of_the_last_token_ranks_highest(qwen):
    """Independently of the engine: layer 0's eager attention weights (transformers' own, at the model's own M-RoPE
    positions) of each row's last token, mean over heads, ranked over the image's tokens."""
    model, eager, processor = qwen
    inputs = batch(processor)
    prompt, reduced = unreduced(model, inputs)
    with torch.inference_mode():
        weights = eager(**inputs, output_attentions=True).attentions[0]  # (B, H, L, L)
    received = weights[:, :, -1].mean(dim=1)  # (B, L)
    keep = 4
    run = engine.LanguageModelRun(model, reduced, stages=fastv_stage(1, keep))
    run.prefill()
    for row in range(2):
        columns = prompt.image_positions[prompt.image_rows == row][0]  # (N,)
        expected = sorted(columns[received[row, columns].topk(keep).indices].tolist())
        kept = run.kept_columns[row][run.mask_high[row].bool()].tolist()
        assert sorted(set(kept) & set(columns.tolist())) == expected


def test_a_stage_that_repacks_positions_is_refused_on_multimodal_rotary_positions(qwen):
    model, _, processor = qwen
    _, reduced = unreduced(model, batch(processor))
    stage = LayerStage("probe", 1, 4, choose_by_last_token_attention, positions="repacked")
    with pytest.raises(ValueError, match="re-packs positions, which is defined for 1-D positions only"):
        engine.LanguageModelRun(model, reduced, stages=(stage,))


def ragged_batch(processor):
    """Images of different sizes: a wide one in the first prompt, a small and a tall one in the second."""
    sizes = [[(224, 160)], [(96, 96), (120, 200)]]
    images = [Image.effect_noise(size, 50 + 10 * index).convert("RGB") for index, size in enumerate(sum(sizes, []))]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(row) + [
        {"type": "text", "text": question}]}], add_generation_prompt=True) for row, question in zip(sizes, QUESTIONS)]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_images_of_different_sizes_and_several_per_prompt_run_as_the_model_runs_them(qwen):
    model, _, processor = qwen
    inputs = ragged_batch(processor)
    prompt, reduced = unreduced(model, inputs)
    lengths = [int(grid.prod()) // 4 for grid in inputs["image_grid_thw"]]
    assert len(set(lengths)) == 3 and prompt.image_lengths.tolist() == lengths and prompt.image_rows.tolist() == [0, 1, 1]
    assert reduced.visible_image_tokens.tolist() == [lengths[0], lengths[1] + lengths[2]]
    with torch.inference_mode():
        expected = model(**inputs).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    assert torch.allclose(engine.LanguageModelRun(model, reduced).prefill(), expected, atol=1e-5)
    ours = engine.generate(model, reduced, engine.DecodingOptions(max_new_tokens=6), eos_token_ids=[-1],
                           pad_token_id=processor.tokenizer.pad_token_id)
    assert ours.tokens.tolist() == generated.tolist()
    assert ours.image_tokens_seen.computed[:, 0].tolist() == [lengths[0], lengths[1] + lengths[2]]


def test_masking_and_dropping_tokens_of_images_of_different_sizes_compute_the_same_logits(qwen):
    model, _, processor = qwen
    prompt, _ = unreduced(model, ragged_batch(processor))
    kept = prompt.image_slots & (torch.arange(prompt.tokens_per_image) % 3 == 0)[None, :]  # every third own token
    masked = engine.reduce_prompt(prompt, kept, "mask")
    dropped = engine.reduce_prompt(prompt, kept, "drop")
    assert masked.visible_image_tokens.tolist() == dropped.visible_image_tokens.tolist() == [
        int(kept[0].sum()), int(kept[1:].sum())]
    assert torch.allclose(engine.LanguageModelRun(model, masked).prefill(),
                          engine.LanguageModelRun(model, dropped).prefill(), atol=1e-5)


def test_an_in_llm_stage_chooses_among_each_image_s_own_tokens_where_images_differ_in_size(qwen):
    model, eager, processor = qwen
    inputs = ragged_batch(processor)
    prompt, reduced = unreduced(model, inputs)
    with torch.inference_mode():
        received = eager(**inputs, output_attentions=True).attentions[0][:, :, -1].mean(dim=1)  # (B, L)
    run = engine.LanguageModelRun(model, reduced, stages=fastv_stage(1, 5))
    run.prefill()
    for row in range(2):
        kept = set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
        for image in (prompt.image_rows == row).nonzero().flatten().tolist():
            columns = prompt.image_positions[image, : int(prompt.image_lengths[image])]
            assert sorted(kept & set(columns.tolist())) == sorted(columns[received[row, columns].topk(5).indices].tolist())


# -- Qwen3-VL's DeepStack: tower features added to the first decoder layers' outputs at the image tokens ----------------
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_qwen(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl")
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval(), processor


def transformers_parts(model, inputs, row):
    """One row as transformers builds it, without padding: (1, L, D) embeddings with the image features scattered in,
    (3, 1, L) positions, (L,) image flags, and each DeepStack level's (N, D) rows of the row's image (none but on
    Qwen3-VL)."""
    real = inputs["attention_mask"][row].bool()
    ids = inputs["input_ids"][row : row + 1, real]
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    embeds = model.get_input_embeddings()(ids)
    is_image = ids[0] == model.config.image_token_id
    embeds[0, is_image] = features.pooler_output[row]
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    levels = getattr(features, "deepstack_features", None) or ()  # Qwen3-VL's DeepStack; none on Qwen2/2.5-VL
    return embeds, positions[:, row : row + 1, real], is_image, [level[row] for level in levels]


def test_image_tokens_dropped_before_the_llm_take_their_deepstack_rows_with_them(qwen3):
    """Against transformers' own text model fed only the kept tokens (at their own positions) and their DeepStack rows."""
    model, processor = qwen3
    inputs = batch(processor)
    prompt = qwen_vl.embed_prompt(model, inputs)
    assert len(prompt.image_additions) == len(model.config.vision_config.deepstack_visual_indexes) == 2
    kept = torch.tensor([1, 4, 5, 9, 12])
    ours = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, kept.expand(2, -1), "drop")).prefill()
    with torch.inference_mode():
        for row in range(2):
            embeds, positions, is_image, levels = transformers_parts(model, inputs, row)
            image_columns = is_image.nonzero().flatten()
            keep = ~is_image
            keep[image_columns[kept]] = True
            hidden = model.model.language_model(
                inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep], visual_pos_masks=is_image[keep][None],
                deepstack_visual_embeds=[level[kept] for level in levels]).last_hidden_state
            assert torch.allclose(ours[row], model.lm_head(hidden[0, -1]), atol=1e-5)


def test_a_stage_inside_the_deepstack_layers_keeps_each_token_s_own_rows(qwen3):
    """A stage at layer 1 (DeepStack adds after layers 0 and 1) keeps every other image token. Independently: the full
    sequence through transformers' decoder layers, the dropped tokens hidden from layer 1 on by the mask, and every image
    token given its DeepStack row in place."""
    model, processor = qwen3
    inputs = batch(processor)
    prompt = qwen_vl.embed_prompt(model, inputs)
    _, reduced = unreduced(model, inputs)
    every_other = torch.arange(0, prompt.tokens_per_image, 2)
    stage = LayerStage("probe", 1, len(every_other), lambda view: LayerChoice(every_other.expand(2, -1)))
    ours = engine.LanguageModelRun(model, reduced, stages=(stage,)).prefill()
    language_model = model.model.language_model
    with torch.inference_mode():
        for row in range(2):
            embeds, positions, is_image, levels = transformers_parts(model, inputs, row)
            length = embeds.shape[1]
            dropped = torch.zeros(length, dtype=torch.bool)
            dropped[is_image.nonzero().flatten()[1::2]] = True
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            hidden, rotary = embeds, language_model.rotary_emb(embeds, positions)
            for index, layer in enumerate(language_model.layers):
                mask = causal & ~dropped[None, :] if index >= 1 else causal
                hidden = layer(hidden, attention_mask=mask[None, None], position_embeddings=rotary)
                if index < len(levels):
                    hidden = hidden.clone()
                    hidden[0, is_image] += levels[index]
            assert torch.allclose(ours[row], model.lm_head(language_model.norm(hidden[0, -1])), atol=1e-5)


def test_a_merging_stage_inside_the_deepstack_layers_is_refused(qwen3):
    model, processor = qwen3
    _, reduced = unreduced(model, batch(processor))
    merging = LayerStage("probe", 1, 4, lambda view: LayerChoice(torch.arange(4).expand(2, -1), rebuild=lambda hidden: hidden[:, :4]))
    with pytest.raises(ValueError, match="merges image tokens, but this model adds image features to the outputs of layers up to 1"):
        engine.LanguageModelRun(model, reduced, stages=(merging,)).prefill()
    settings = ReductionSettings(reduction="sparsevlm", sparsevlm_layers="0/1", sparsevlm_schedule="6/3", stage_positions="original")
    with pytest.raises(ValueError, match="sparsevlm's stage at layer 1 merges image tokens, but qwen3_vl adds image features to "
                                         "the outputs of layers 0-1 \\(DeepStack\\), .* at layer 2 or later"):
        qwen_vl.nominal_plan(model.config, settings, max_pixels=40 * 28 * 28)  # before any compute


# -- budgets per image under dynamic resolution: each image planned for its own tokens ---------------------------------
def reduced_with(model, processor, settings, inputs):
    """(prompt, reduced prompt, per-image in-LLM stages) of a processed batch under `settings`, as a model class runs it."""
    prompt = qwen_vl.embed_prompt(model, inputs)
    plans = engine.image_plans(model.config, settings, prompt)
    seeds = list(range(prompt.image_rows.shape[0]))
    reduced = engine.apply_image_plans_before_llm(model, processor.tokenizer, plans, prompt, ["red circle"] * 2, seeds)
    return prompt, reduced, [plan.layers for plan in plans]


def test_a_fraction_is_of_each_image_s_own_tokens_and_a_larger_count_than_an_image_s_is_refused_naming_it(qwen):
    model, _, processor = qwen
    inputs = ragged_batch(processor)
    prompt = qwen_vl.embed_prompt(model, inputs)
    grids = (inputs["image_grid_thw"][:, 1:] // 2).tolist()
    plans = engine.image_plans(model.config, ReductionSettings(reduction="random", keep=0.3), prompt)
    assert [plan.pre_llm.keep for plan in plans] == [math.floor(0.3 * h * w + 0.5) for h, w in grids]
    smallest = min(h * w for h, w in grids)
    with pytest.raises(ValueError, match=rf"an image of {smallest} tokens \(\d+ x \d+\) in this batch: keep={smallest + 1} exceeds"):
        engine.image_plans(model.config, ReductionSettings(reduction="random", keep=smallest + 1), prompt)


@pytest.mark.parametrize("settings", [dict(reduction="random", keep=0.3), dict(reduction="simignore", keep=0.4),
                                      dict(reduction="fastv", keep=0.5), dict(reduction="pdrop", pdrop_layers="1/2", stage_positions="original"),
                                      dict(reduction="dart", keep=0.5, dart_layer=1),
                                      dict(reduction="random+fastv", keep=0.6, fastv_keep=0.25),
                                      dict(reduction="pool", keep=0.25),
                                      dict(reduction="sparsevlm", sparsevlm_layers="1", sparsevlm_schedule="3",
                                           stage_positions="original")])
def test_each_prompt_of_a_batch_of_images_of_different_sizes_answers_as_it_does_alone(qwen, settings):
    """Batch = each prompt alone (its images keep what their own plans keep), and the layers see each image's budget."""
    model, _, processor = qwen
    settings = ReductionSettings(**settings)
    inputs = ragged_batch(processor)
    prompt, reduced, stages = reduced_with(model, processor, settings, inputs)
    run = engine.LanguageModelRun(model, reduced, stages=stages)
    logits = run.prefill()
    plans = engine.image_plans(model.config, settings, prompt)
    for row in range(2):
        images = (prompt.image_rows == row).nonzero().flatten().tolist()
        expected = [sum(plans[image].visible_per_layer()[layer] for image in images) for layer in range(3)]
        assert run.image_tokens_seen.visible[row].tolist() == expected
        alone = {key: value[row : row + 1] for key, value in inputs.items() if key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        first = sum(int(inputs["image_grid_thw"][i].prod()) for i in range(images[0]))
        patches = sum(int(inputs["image_grid_thw"][i].prod()) for i in images)
        alone["pixel_values"] = inputs["pixel_values"][first : first + patches]
        alone["image_grid_thw"] = inputs["image_grid_thw"][images]
        real = alone["attention_mask"][0].bool()
        alone = {key: (value[:, real] if key != "pixel_values" and key != "image_grid_thw" else value) for key, value in alone.items()}
        single_prompt = qwen_vl.embed_prompt(model, alone)
        single_plans = engine.image_plans(model.config, settings, single_prompt)
        single = engine.apply_image_plans_before_llm(model, processor.tokenizer, single_plans, single_prompt, ["red circle"],
                                                     images)  # the same seed per image as in the batch
        alone_logits = engine.LanguageModelRun(model, single, stages=[plan.layers for plan in single_plans]).prefill()
        assert torch.allclose(logits[row], alone_logits[0], atol=1e-5)


def test_fastv_keeps_half_of_each_image_by_the_eager_attention_where_images_differ_in_size(qwen):
    model, eager, processor = qwen
    inputs = ragged_batch(processor)
    prompt, reduced, stages = reduced_with(model, processor, ReductionSettings(reduction="fastv", fastv_layer=1), inputs)
    with torch.inference_mode():
        received = eager(**inputs, output_attentions=True).attentions[0][:, :, -1].mean(dim=1)  # (B, L)
    run = engine.LanguageModelRun(model, reduced, stages=stages)
    run.prefill()
    for image in range(prompt.image_rows.shape[0]):
        row, length = int(prompt.image_rows[image]), int(prompt.image_lengths[image])
        columns = prompt.image_positions[image, :length]
        kept = set(run.kept_columns[row][run.mask_high[row].bool()].tolist()) & set(columns.tolist())
        assert sorted(kept) == sorted(columns[received[row, columns].topk(math.floor(length / 2 + 0.5)).indices].tolist())


def test_what_qwen_cannot_give_is_refused_by_name(qwen):
    model, _, processor = qwen
    with pytest.raises(ValueError, match="visionzip ranks patches by the CLS token's attention; the vision tower .* has no CLS token"):
        reduced_with(model, processor, ReductionSettings(reduction="visionzip", keep=4), batch(processor))


# -- pooling each image's own grid: the shorter image where the model would place an image of the pooled grid ---------
def pooled_by_hand(features: torch.Tensor, rows: int, cols: int, stride: int) -> torch.Tensor:
    """(N, D) row-major on rows x cols -> (K, D): the mean of each stride x stride window's tokens inside the grid."""
    grid = features.reshape(rows, cols, -1)
    return torch.stack([grid[top : top + stride, left : left + stride].reshape(-1, grid.shape[-1]).mean(dim=0)
                        for top in range(0, rows, stride) for left in range(0, cols, stride)])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pooled_image_answers_as_the_model_does_on_a_prompt_written_with_the_pooled_grid(family, tmp_path):
    """keep=0.25 pools a 5 x 7 grid with stride 2 into 3 x 4 (the last row and column of windows are partial).
    Independently of the engine: the prompt written with 12 image tokens, their M-RoPE positions by hand (T = p,
    H = p + row, W = p + col, text from p + 4) and, on Qwen3-VL, each DeepStack level pooled alike, through
    transformers' own text model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_qwen(tmp_path, family)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    patch = model.config.vision_config.patch_size
    inputs = batch(processor, size=(7 * 2 * patch, 5 * 2 * patch))  # width x height: 5 x 7 merged tokens
    assert (inputs["image_grid_thw"][:, 1:] // 2).tolist() == [[5, 7], [5, 7]]
    _, reduced, stages = reduced_with(model, processor, ReductionSettings(reduction="pool", keep=0.25), inputs)
    ours = engine.LanguageModelRun(model, reduced, stages=stages).prefill()
    image_token = model.config.image_token_id
    with torch.inference_mode():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        for row in range(2):
            ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
            start = int((ids == image_token).nonzero()[0])
            ids = torch.cat([ids[:start], torch.full((12,), image_token), ids[start + 35 :]])[None]  # (1, L')
            embeds = model.get_input_embeddings()(ids)
            is_image = ids[0] == image_token
            embeds[0, is_image] = pooled_by_hand(features.pooler_output[row], 5, 7, 2)
            columns = torch.arange(ids.shape[1])
            rows_and_columns = torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], dim=1)  # (12, 2)
            positions = torch.stack([columns, columns, columns])  # text before the image: t = h = w = its index
            positions[:, start : start + 12] = start
            positions[1:, start : start + 12] += rows_and_columns.T
            positions[:, start + 12 :] = columns[start + 12 :] - 12 + 4  # the text after resumes at start + max(3, 4)
            assert reduced.position_ids[row, reduced.attention_mask[row].bool()].T.tolist() == positions.tolist()
            extra = {}
            if family == "qwen3_vl":
                extra = {"visual_pos_masks": is_image[None],
                         "deepstack_visual_embeds": [pooled_by_hand(level[row], 5, 7, 2) for level in features.deepstack_features]}
            hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions[:, None], **extra).last_hidden_state
            assert torch.allclose(ours[row], model.lm_head(hidden[0, -1]), atol=1e-5)


# -- the other in-LLM rules against transformers' own computation at the model's own positions ------------------------
def kept_image_columns(run, prompt, row):
    """The image columns (of the prompt, padding included) that the last segment of `run` sees in `row`."""
    kept = set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
    columns = set(prompt.image_positions[prompt.image_rows == row].flatten().tolist())
    return sorted(kept & columns)


def test_dart_keeps_what_its_rule_gives_on_the_model_s_own_cached_keys_and_hidden_states(qwen):
    """Independently of the engine: transformers' own forward of the batch, its cached keys of layer 1 (after M-RoPE,
    and Qwen3's key norm) and its hidden states entering layer 2 (DeepStack added) through the final norm, given to
    DART's rule (pivots by key norm, the image tokens least similar to them), are what the stage at layer 2 keeps."""
    from lmms_simignore.methods.dart import dart_choice, dart_stage

    model, _, processor = qwen
    inputs = batch(processor)
    prompt, reduced = unreduced(model, inputs)
    keep = prompt.tokens_per_image // 3
    run = engine.LanguageModelRun(model, reduced, stages=dart_stage(2, keep, 8))
    run.prefill()
    with torch.inference_mode():
        outputs = model(**inputs, use_cache=True, output_hidden_states=True)
    norms = outputs.past_key_values.layers[1].keys.float().abs().sum(dim=(1, 3))  # (B, L)
    hidden = model.model.language_model.norm(outputs.hidden_states[2])  # (B, L, D) entering layer 2
    for row in range(2):
        columns = prompt.image_positions[prompt.image_rows == row][0]  # (N,)
        after = torch.arange(inputs["input_ids"].shape[1]) > columns[-1]
        chosen = dart_choice(hidden[row : row + 1, columns], norms[row : row + 1, columns], torch.ones(1, len(columns), dtype=torch.bool),
                             hidden[row : row + 1, after], norms[row : row + 1, after], torch.ones(1, int(after.sum()), dtype=torch.bool),
                             keep=keep, pivots=8)[0]
        assert kept_image_columns(run, prompt, row) == sorted(columns[chosen].tolist())


def test_each_pyramiddrop_stage_keeps_what_transformers_eager_attention_ranks_highest(qwen):
    """Two stages (layers 1 and 2) at the tokens' own positions. Independently of the engine, per row without padding:
    transformers' eager decoder layers on the whole sequence (DeepStack added after layers 0 and 1), each stage ranking
    the image tokens still visible by the head-averaged eager weight from the last token in the layer before it, and
    hiding the others from every later layer by the attention mask (hiding = dropping at original positions)."""
    from lmms_simignore.methods.pdrop import pdrop_stages

    model, eager, processor = qwen
    inputs = batch(processor)
    prompt, reduced = unreduced(model, inputs)
    keeps = {1: prompt.tokens_per_image // 2, 2: prompt.tokens_per_image // 5}
    run = engine.LanguageModelRun(model, reduced, stages=pdrop_stages(tuple(keeps.items())))
    run.prefill()
    text_model = eager.model.language_model
    with eager_attention_weights(text_model.layers) as weights, torch.inference_mode():
        for row in range(2):
            embeds, positions, is_image, levels = transformers_parts(eager, inputs, row)
            length, image_columns = embeds.shape[1], is_image.nonzero().flatten()
            hidden_tokens = torch.zeros(length, dtype=torch.bool)
            hidden, rotary = embeds, text_model.rotary_emb(embeds, positions)
            for index, layer in enumerate(text_model.layers):
                allowed = torch.ones(length, length, dtype=torch.bool).tril() & ~hidden_tokens[None, :]
                additive = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
                hidden = layer(hidden, attention_mask=additive[None, None], position_embeddings=rotary)
                if index < len(levels):
                    hidden = hidden.clone()
                    hidden[0, is_image] += levels[index]
                if index + 1 in keeps:
                    received = weights[index][0, :, -1].mean(dim=0)  # (L,) from the last token, mean over heads
                    candidates = image_columns[~hidden_tokens[image_columns]]
                    kept = candidates[received[candidates].topk(keeps[index + 1]).indices]
                    hidden_tokens[candidates] = True
                    hidden_tokens[kept] = False
            padding = int((inputs["attention_mask"][row] == 0).sum())
            assert kept_image_columns(run, prompt, row) == sorted((image_columns[~hidden_tokens[image_columns]] + padding).tolist())


def test_sparsevlm_keeps_what_its_raters_eager_attention_ranks_highest_and_merges_at_the_centre_s_place(qwen):
    """One stage after layer 1, each token at its own M-RoPE position. Independently of the engine, per row without
    padding: raters by hand on the layer-0 inputs of the text after the image; the image tokens' scores from layer 1's
    eager weights (mean over heads, then raters); the top 10 of N stay, the best int(0.3 x (N - 10)) + 1 of the rest
    (at most 10) form one cluster (DPC-kNN by hand on layer 1's output, DeepStack added) whose centre's place holds their mean."""
    from test_sparsevlm import dpc_by_hand, raters_by_hand

    model, eager, processor = qwen
    inputs = batch(processor, size=(168, 112))  # N = 24 image tokens each (20 on Qwen3-VL's 16-pixel patches)
    prompt, reduced = unreduced(model, inputs)
    count = prompt.tokens_per_image
    recycled_count = int(0.3 * (count - 10)) + 1
    assert count in (20, 24) and recycled_count < 10
    settings = ReductionSettings(reduction="sparsevlm", sparsevlm_layers="1", sparsevlm_schedule="10", stage_positions="original")
    run = engine.LanguageModelRun(model, reduced, stages=engine.image_plans(model.config, settings, prompt)[0].layers)
    seen = {}
    run.observe = lambda index, layer, hidden, *rest: seen.__setitem__(index, hidden.clone())
    run.prefill()
    text_model = eager.model.language_model
    with eager_attention_weights(text_model.layers) as weights, torch.inference_mode():
        for row in range(2):
            embeds, positions, is_image, levels = transformers_parts(eager, inputs, row)
            image_columns = is_image.nonzero().flatten()
            text = list(range(int(image_columns[-1]) + 1, embeds.shape[1]))
            rates = raters_by_hand(embeds[0, image_columns].tolist(), embeds[0, text].tolist())
            rater_rows = [column for column, rated in zip(text, rates) if rated]
            hidden, rotary = embeds, text_model.rotary_emb(embeds, positions)
            causal = torch.zeros(embeds.shape[1], embeds.shape[1]).masked_fill(
                ~torch.ones(embeds.shape[1], embeds.shape[1], dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
            for index in range(2):
                hidden = text_model.layers[index](hidden, attention_mask=causal[None, None], position_embeddings=rotary)
                if index < len(levels):
                    hidden = hidden.clone()
                    hidden[0, is_image] += levels[index]
            scores = weights[1][0].mean(dim=0)[rater_rows][:, image_columns].mean(dim=0)  # (N,)
            order = sorted(range(count), key=lambda i: (-float(scores[i]), i))
            kept, recycled = order[:10], order[10 : 10 + recycled_count]
            centre = recycled[dpc_by_hand(hidden[0, image_columns[recycled]].tolist(), 1)[0][0]]
            padding = int((inputs["attention_mask"][row] == 0).sum())
            assert kept_image_columns(run, prompt, row) == sorted((image_columns[kept + [centre]] + padding).tolist())
            merged = hidden[0, image_columns[recycled]].sum(dim=0) / (recycled_count + 1e-6)
            at = run.kept_columns[row].tolist().index(int(image_columns[centre]) + padding)
            torch.testing.assert_close(seen[2][row, at], merged, atol=1e-4, rtol=1e-4)


def test_divprune_keeps_the_most_diverse_merged_patches_at_their_own_m_rope_positions(qwen):
    """Independently of the engine: DivPrune's rule by hand on each image's merged patches as the model gives them; the
    language model of transformers fed only the kept image tokens (and the text) at their own M-RoPE positions (with
    their DeepStack rows on Qwen3-VL) gives our logits, as LightCompress keeps the original ids."""
    from test_divprune import greedy_by_hand

    model, _, processor = qwen
    images = [Image.effect_noise((168, 112), sigma).convert("RGB") for sigma in (40, 90)]  # no ties of plain colour
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in QUESTIONS]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    settings = ReductionSettings(reduction="divprune", keep=0.3, divprune_positions="original")
    prompt = qwen_vl.embed_prompt(model, inputs)
    reduced, stages = engine.reduce_each_image(model, processor.tokenizer, settings, prompt, ["x"] * 2, [0, 1])
    ours = engine.LanguageModelRun(model, reduced, stages=stages).prefill()
    with torch.inference_mode():
        for row in range(2):
            embeds, positions, is_image, levels = transformers_parts(model, inputs, row)
            image_columns = is_image.nonzero().flatten()
            kept = greedy_by_hand(embeds[0, image_columns].tolist(), math.floor(0.3 * len(image_columns) + 0.5))
            keep = ~is_image
            keep[image_columns[kept]] = True
            extra = {"visual_pos_masks": is_image[keep][None], "deepstack_visual_embeds": [level[kept] for level in levels]} \
                if levels else {}
            hidden = model.model.language_model(inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep],
                                                **extra).last_hidden_state
            assert torch.allclose(ours[row], model.lm_head(hidden[0, -1]), atol=1e-5)
