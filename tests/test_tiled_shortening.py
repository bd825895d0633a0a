"""Stages that replace a tiled image by a shorter one, on tiny random LLaVA-NeXT, LLaVA-OneVision and InternVL models:
pooling on each of an image's grids with the model's separators placed anew, VisionZip on LLaVA-NeXT's views packed as
its authors' code packs them, and budgets per tile. Each is checked against transformers' own forward on a prompt
written by hand with the expected image block."""

import pytest
import torch
from method_checks import eager_attention_weights
from test_internvl import batch as internvl_batch
from test_internvl import internvl_models  # noqa: F401  (a fixture)
from test_llava_next import (BUILDERS, batch, batch_of_four_answers_as_each_prompt_alone, next_docs,  # noqa: F401
                             tiled_folder)

from lmms_simignore import engine
from lmms_simignore.families import internvl, llava_next
from lmms_simignore.settings import ReductionSettings

pytest.importorskip("torchvision")  # transformers' OneVision and InternVL processors need it


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiled(request, tmp_path_factory):
    """(model, eager model, processor) of one tiled LLaVA family."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = BUILDERS[request.param](tmp_path_factory.mktemp(f"{request.param}_shortening"))
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    load = lambda attention: AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attention).eval()  # noqa: E731
    return load("sdpa"), load("eager"), processor


def window_means(grid: torch.Tensor, stride: int) -> torch.Tensor:
    """(rows, cols, D) -> the mean of each stride x stride window (cut by the edge), row-major: (K, D)."""
    rows, cols = grid.shape[:2]
    return torch.stack([grid[top: top + stride, left: left + stride].reshape(-1, grid.shape[-1]).mean(dim=0)
                        for top in range(0, rows, stride) for left in range(0, cols, stride)])


def written_with_blocks(model, inputs, row: int, blocks: list[torch.Tensor], runs: list[int]) -> torch.Tensor:
    """Transformers' forward on row `row`'s prompt (no padding) with its images' placeholder runs (`runs`: each image's
    placeholders, newlines included, in order) replaced by `blocks` (each (M, D)): its last logits (V,)."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    embeds = model.get_input_embeddings()(ids)
    placeholders = (ids == model.config.image_token_id).nonzero().flatten().tolist()
    pieces, start, taken = [], 0, 0
    for block, run in zip(blocks, runs):
        first = placeholders[taken]
        pieces += [embeds[start:first], block]
        start, taken = placeholders[taken + run - 1] + 1, taken + run
    pieces.append(embeds[start:])
    with torch.inference_mode():
        return model(inputs_embeds=torch.cat(pieces)[None]).logits[0, -1]


def our_logits(model, processor, inputs, settings, seeds=(0, 1, 2)) -> torch.Tensor:
    """What the model classes run on a tiled LLaVA family: (B, V) last logits."""
    prompt = llava_next.embed_prompt(model, inputs, keep_tower=bool(settings.methods_at("vision")))
    reduced, stages = engine.reduce_each_image(model, processor.tokenizer, settings, prompt, ["x"] * 2, list(seeds))
    return engine.LanguageModelRun(model, reduced, stages=stages).prefill()


def packed_images(model, inputs) -> list[torch.Tensor]:
    """Each image's placeholders' embeddings as transformers packs them (base view, rows each ending in a newline)."""
    with torch.inference_mode():
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output)


def test_pooling_averages_the_base_view_and_the_unpadded_grid_each_and_puts_a_newline_after_each_pooled_row(tiled):
    """Stride 2 (keep=0.25) on a 4 x 4 base view and the unpadded grid (6 x 8, 12 x 4, 8 x 8 on NeXT): windows cut by an
    edge average what they cover; the block is the pooled base, then each pooled row and a newline."""
    model, _, processor = tiled
    inputs = batch(processor)
    ours = our_logits(model, processor, inputs, ReductionSettings(reduction="pool", keep=0.25))
    newline = model.model.image_newline
    side = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    images = packed_images(model, inputs)
    expected_blocks = []
    for packed in images:
        is_newline = (packed == newline).all(dim=-1)
        rows = int(is_newline.sum())
        grid = packed[side * side:].reshape(rows, -1, packed.shape[-1])[:, :-1]  # the unpadded grid, newlines cut off
        pooled = window_means(grid, 2).reshape((rows + 1) // 2, -1, packed.shape[-1])
        with_newlines = torch.cat([pooled, newline.expand(pooled.shape[0], 1, -1)], dim=1).flatten(0, 1)
        expected_blocks.append(torch.cat([window_means(packed[: side * side].reshape(side, side, -1), 2), with_newlines]))
    for row, image_indices in ((0, [0]), (1, [1, 2])):
        expected = written_with_blocks(model, inputs, row, [expected_blocks[i] for i in image_indices],
                                       [len(images[i]) for i in image_indices])
        assert torch.allclose(ours[row], expected, atol=1e-4)


def test_pooling_with_stride_1_answers_as_no_reduction_newlines_and_all(tiled):
    model, _, processor = tiled
    inputs = batch(processor)
    none = our_logits(model, processor, inputs, ReductionSettings())
    assert torch.allclose(our_logits(model, processor, inputs, ReductionSettings(reduction="pool", keep=1.0)), none, atol=1e-5)


def test_pooling_each_internvl_tile_on_its_own(internvl_models):  # noqa: F811
    """InternVL: each tile's 4 x 4 grid pooled 2 x 2 (16 -> 4 tokens per tile), the tiles in order, no separators."""
    _, model, _, processor = internvl_models
    inputs = internvl_batch(processor)
    settings = ReductionSettings(reduction="pool", keep=0.25)
    prompt = internvl.embed_prompt(model, inputs)
    plans = engine.image_plans(model.config, settings, prompt)
    reduced = engine.apply_image_plans_before_llm(model, processor.tokenizer, plans, prompt, ["x"] * 2, [])
    ours = engine.LanguageModelRun(model, reduced).prefill()
    assert reduced.visible_image_tokens.tolist() == [4 * 7, 4 * (11 + 1)]
    with torch.inference_mode():
        tiles = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    pooled = torch.stack([window_means(tile.reshape(4, 4, -1), 2) for tile in tiles])  # (T, 4, D)
    counts = [7, 11, 1]
    blocks = list(pooled.flatten(0, 1).split([4 * count for count in counts]))
    for row, image_indices in ((0, [0]), (1, [1, 2])):
        expected = written_with_blocks(model, inputs, row, [blocks[i] for i in image_indices],
                                       [16 * counts[i] for i in image_indices])
        assert torch.allclose(ours[row], expected, atol=1e-4)


def visionzip_reference(eager, pixel_views: torch.Tensor, dominant: int, contextual: int, crop_rows: int, crop_cols: int):
    """VisionZip on one LLaVA-NeXT image's views (V, 3, H, W), written from its authors' rule on transformers' eager
    tower: per view, the CLS token and the top dominant - 1 patches by the CLS row of layer -2's attention (summed over
    heads), then the rest merged into `contextual` tokens (targets at a stride of the rest, each joining its most
    key-similar target, keys averaged over heads); packed as its LLaVA-NeXT code does: the base view's tokens, the
    crops' dominant patches in raster order over the stitched grid of crops, the crops' CLS tokens, the crops'
    contextual tokens. Projected: (V * (dominant + contextual), D)."""
    tower = eager.model.vision_tower
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    index = eager.config.vision_feature_layer % (len(layers) + 1) - 1
    captured = {}
    handle = layers[index].self_attn.k_proj.register_forward_hook(lambda module, args, output: captured.setdefault("k", output))
    try:
        with torch.inference_mode():
            out = tower(pixel_views, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    hidden = out.hidden_states[index + 1]  # (V, T, D)
    cls_row = out.attentions[index][:, :, 0, :].sum(dim=1)  # (V, T)
    keys = captured["k"].unflatten(-1, (tower.config.num_attention_heads, -1)).mean(dim=2)  # (V, T, d)
    side = int((hidden.shape[1] - 1) ** 0.5)
    views, patches_of = [], []
    for view in range(hidden.shape[0]):
        patches = sorted((cls_row[view, 1:].topk(dominant - 1).indices + 1).tolist())
        rest = [t for t in range(1, hidden.shape[1]) if t not in patches]
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        normed = torch.nn.functional.normalize(keys[view], dim=-1)
        merged = []
        for target in targets:
            joined = [t for t in rest if t not in targets and
                      targets[int((normed[t] @ normed[targets].T).argmax())] == target]
            mean = hidden[view, joined].mean(dim=0) if joined else torch.zeros_like(hidden[view, 0])
            merged.append(hidden[view, target] + mean)
        views.append(torch.cat([hidden[view, [0] + patches], torch.stack(merged)]))
        patches_of.append([patch - 1 for patch in patches])
    stitched = sorted(((crop // crop_cols * side + patch // side, crop % crop_cols * side + patch % side), crop, rank)
                      for crop in range(crop_rows * crop_cols) for rank, patch in enumerate(patches_of[crop + 1]))
    crops = views[1:]
    packed = torch.cat([views[0], torch.stack([crops[crop][1 + rank] for _, crop, rank in stitched]),
                        torch.stack([crop[0] for crop in crops]), torch.cat([crop[dominant:] for crop in crops])])
    with torch.inference_mode():
        return eager.model.multi_modal_projector(packed)


@pytest.fixture(scope="module")
def next_models(tmp_path_factory):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = BUILDERS["llava_next"](tmp_path_factory.mktemp("llava_next_visionzip"))
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    load = lambda attention: LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attention).eval()  # noqa: E731
    return load("sdpa"), load("eager"), processor


@pytest.mark.parametrize("settings, per_view", [(dict(keep=0.5), [(5, 1), (7, 1), (7, 1)]),
                                                (dict(keep=4, budget_per="tile"), [(3, 1)] * 3),
                                                (dict(dominant=4, contextual=2), [(4, 2)] * 3)])
def test_visionzip_on_llava_next_packs_each_view_s_tokens_as_its_authors_code(next_models, settings, per_view):
    """Each view keeps its share of the image's budget (keep=0.5 of 64 tokens in 5 views: 6 = 5 + 1 per view; of 64 in
    4 views and of 80 in 5: 8 = 7 + 1), or keep=N per tile, or VisionZip's own per-view arguments; no newline, no
    unpadding."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model, eager, processor = next_models
    inputs = batch(processor)
    ours = our_logits(model, processor, inputs, ReductionSettings(reduction="visionzip", **settings))
    blocks = []
    for image, size in enumerate(inputs["image_sizes"].tolist()):
        crop_rows, crop_cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        views = 1 + crop_rows * crop_cols
        dominant, contextual = per_view[image]
        blocks.append(visionzip_reference(eager, inputs["pixel_values"][image, :views], dominant, contextual, crop_rows, crop_cols))
    images = packed_images(model, inputs)
    for row, image_indices in ((0, [0]), (1, [1, 2])):
        expected = written_with_blocks(model, inputs, row, [blocks[i] for i in image_indices], [len(images[i]) for i in image_indices])
        assert torch.allclose(ours[row], expected, atol=1e-4)


def answers_alone_as_in_the_batch(model, processor, settings) -> None:
    together = our_logits(model, processor, batch(processor), settings)
    for row, images in ((0, [0]), (1, [1, 2])):
        assert torch.allclose(together[row], our_logits(model, processor, batch(processor, rows=(row,)), settings, images)[0],
                              atol=1e-5)


@pytest.mark.parametrize("settings", [dict(reduction="pool", keep=0.25), dict(reduction="pool", keep=0.111)])
def test_each_prompt_of_a_batch_answers_as_it_does_alone_when_pooled(tiled, settings):
    model, _, processor = tiled
    answers_alone_as_in_the_batch(model, processor, ReductionSettings(**settings))


@pytest.mark.parametrize("settings", [dict(reduction="visionzip", keep=0.4),
                                      dict(reduction="visionzip+fastv", keep=0.5, fastv_keep=0.25, fastv_layer=1)])
def test_each_prompt_of_a_batch_answers_as_it_does_alone_under_visionzip(next_models, settings):
    model, _, processor = next_models
    answers_alone_as_in_the_batch(model, processor, ReductionSettings(**settings))


def test_a_budget_per_tile_is_the_count_times_the_image_s_tiles():
    """keep=N with budget_per=tile: N per tile (an image of 5 views keeps 5N); a fraction is the same share."""
    per_tile = ReductionSettings(reduction="random", keep=20, budget_per="tile")
    assert per_tile.plan(400, 8, None, None, views=5).pre_llm.keep == 100
    assert ReductionSettings(reduction="random", keep=20).plan(400, 8, None, None, views=5).pre_llm.keep == 20
    assert ReductionSettings(reduction="random", ignore=20, budget_per="tile").plan(400, 8, views=5).pre_llm.keep == 300
    fraction = ReductionSettings(reduction="random", keep=0.25, budget_per="tile").plan(400, 8, views=5).pre_llm.keep
    assert fraction == ReductionSettings(reduction="random", keep=0.25).plan(400, 8, views=5).pre_llm.keep == 100
    with pytest.raises(ValueError, match="keep=120 exceeds"):
        per_tile.plan(100, 8, views=6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="random", budget_per="tile"), "budget_per=tile says what keep/ignore count per; give keep=N"),
    (dict(reduction="random", keep=4, budget_per="crop"), "budget_per must be one of"),
])
def test_bad_budget_units_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_visionzip_gives_each_of_llava_next_s_five_views_108_plus_20_of_640():
    """On LLaVA-1.6-7B's largest image (2880 tokens, 5 views), keep=640 is VisionZip's 108 + 20 per view; keep=128
    per tile the same."""
    for settings in (ReductionSettings(reduction="visionzip", keep=640),
                     ReductionSettings(reduction="visionzip", keep=128, budget_per="tile")):
        stage = settings.plan(2880, 32, None, ((24, 24), (48, 48)), views=5).vision
        assert stage.tokens == 640 and stage.shorten.args == (108, 20)


@pytest.mark.parametrize("settings, message", [
    (dict(reduction="visiondrop", visiondrop_schedule="12+2/8+2/5+1", visiondrop_layers="1/2"),
     "visiondrop on an image in tiles .*: its authors' code gives no version for an image in tiles; refused"),
    (dict(reduction="prumerge_plus", keep=8), "prumerge_plus on an image in tiles .*: its authors' code is LLaVA-1.5's"),
    (dict(reduction="visionzip+simignore", dominant=6, contextual=2, keep=20), "simignore after visionzip"),
])
def test_what_tiles_do_not_define_is_refused_by_name(next_models, settings, message):
    model = next_models[0]
    with pytest.raises(ValueError, match=message):
        llava_next.nominal_plan(model.config, ReductionSettings(**settings))


def test_pooled_through_the_class_a_batch_of_four_answers_as_each_prompt_alone(tiled_folder, next_docs):  # noqa: F811
    batch_of_four_answers_as_each_prompt_alone(tiled_folder, next_docs, dict(reduction="pool", keep=0.25))


@pytest.mark.parametrize("model_args", [dict(reduction="visionzip", keep=0.3), dict(reduction="vispruner", keep=0.3),
                                        dict(reduction="vispruner+fastv", keep=0.5, fastv_keep=0.25, fastv_layer=1)])
def test_tower_stages_through_the_class_a_batch_of_four_answers_as_each_prompt_alone(tmp_path_factory, next_docs, model_args):  # noqa: F811
    folder = BUILDERS["llava_next"](tmp_path_factory.mktemp("llava_next_tower_class"))
    batch_of_four_answers_as_each_prompt_alone(folder, next_docs, model_args)


@pytest.mark.parametrize("family, model_args", [("llava_next", "reduction=visionzip,keep=0.3"),
                                                ("llava_onevision", "reduction=pool,keep=0.25")])
def test_two_processes_answer_every_doc_once_as_one_process_does(family, model_args, testbed, tmp_path):
    """Through the real CLI: torchrun with 2 processes on the tiny tiled LLaVA, each doc answered once, as 1 process."""
    import sys

    from test_lmms_eval_cli import LAUNCHERS, TASK as LOCAL_TASK, evaluate

    checkpoint = {"model": BUILDERS[family](tmp_path / family), "tasks": testbed["tasks"]}
    single, single_samples = evaluate(checkpoint, tmp_path / "one", model_args, batch_size=2)
    double, double_samples = evaluate(checkpoint, tmp_path / "two", model_args, batch_size=2,
                                      launcher=(sys.executable, *LAUNCHERS["torchrun"]))
    assert [s["doc_id"] for s in double_samples] == list(range(12))
    assert [s["filtered_resps"] for s in double_samples] == [s["filtered_resps"] for s in single_samples]
    assert double["results"][LOCAL_TASK]["exact_match,none"] == single["results"][LOCAL_TASK]["exact_match,none"]


def test_each_pyramiddrop_stage_keeps_what_transformers_eager_attention_ranks_among_the_image_tokens(tiled):
    """Two stages (layers 1 and 2), each token at its own position. Independently of the engine, per row without
    padding: transformers' eager decoder layers on the whole sequence (newlines included), each stage ranking the image
    tokens still visible (never a newline) by the head-averaged eager weight from the last token in the layer before it
    and hiding the others from every later layer by the attention mask."""
    from lmms_simignore.methods.pdrop import pdrop_stages

    model, eager, processor = tiled
    inputs = batch(processor)
    prompt = llava_next.embed_prompt(model, inputs)
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")
    keeps = {1: 20, 2: 8}  # per image, of its 64 to 112 tokens
    run = engine.LanguageModelRun(model, reduced, stages=pdrop_stages(tuple(keeps.items())))
    run.prefill()
    text_model = eager.model.language_model
    with torch.inference_mode():
        features = torch.cat(packed_images(eager, inputs))
        embeds = eager.get_input_embeddings()(inputs["input_ids"]).masked_scatter(
            (inputs["input_ids"] == eager.config.image_token_id)[..., None], features)
    newline = eager.model.image_newline
    with eager_attention_weights(text_model.layers) as weights, torch.inference_mode():
        for row, images in ((0, [0]), (1, [1, 2])):
            real = inputs["attention_mask"][row].bool()
            row_embeds, ids = embeds[row][real][None], inputs["input_ids"][row][real]
            length = ids.shape[0]
            is_image = (ids == eager.config.image_token_id) & ~(row_embeds[0] == newline).all(dim=-1)
            image_columns = is_image.nonzero().flatten()
            owner = torch.cat([torch.full((int(prompt.image_lengths[image]),), image) for image in images])  # (n,)
            hidden_tokens = torch.zeros(length, dtype=torch.bool)
            hidden, rotary = row_embeds, text_model.rotary_emb(row_embeds, torch.arange(length)[None])
            for index, layer in enumerate(text_model.layers):
                allowed = torch.ones(length, length, dtype=torch.bool).tril() & ~hidden_tokens[None, :]
                additive = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
                hidden = layer(hidden, attention_mask=additive[None, None], position_embeddings=rotary)
                if index + 1 in keeps:
                    received = weights[index][0, :, -1].mean(dim=0)  # (L,) from the last token, mean over heads
                    for image in images:  # each image keeps its own
                        mine = image_columns[(owner == image) & ~hidden_tokens[image_columns]]
                        kept = mine[received[mine].topk(keeps[index + 1]).indices]
                        hidden_tokens[mine] = True
                        hidden_tokens[kept] = False
            padding = int((~real).sum())
            expected = sorted((image_columns[~hidden_tokens[image_columns]] + padding).tolist())
            ours = set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
            columns = {int(c) for image in images for c in prompt.image_positions[image, : int(prompt.image_lengths[image])]}
            assert sorted(ours & columns) == expected
            assert len(expected) == keeps[2] * len(images)


def test_divprune_keeps_every_newline_and_closes_up_the_positions_of_what_it_keeps(tiled):
    """DivPrune's rule by hand on each image's tokens (its newlines left out): the prompt written with the kept tokens
    and every newline, in order, at positions 0, 1, 2, ... through transformers' forward; batch = alone."""
    from test_divprune import greedy_by_hand

    model, _, processor = tiled
    inputs = batch(processor)
    settings = ReductionSettings(reduction="divprune", keep=0.3)
    ours = our_logits(model, processor, inputs, settings)
    newline = model.model.image_newline
    images = packed_images(model, inputs)
    blocks = []
    for packed in images:
        is_newline = (packed == newline).all(dim=-1)
        tokens = packed[~is_newline]
        kept = set(greedy_by_hand(tokens.tolist(), int(0.3 * len(tokens) + 0.5)))
        image_index = torch.cumsum(~is_newline, 0) - 1
        blocks.append(packed[is_newline | torch.tensor([bool(not n and int(i) in kept) for n, i in zip(is_newline, image_index)])])
    for row, image_indices in ((0, [0]), (1, [1, 2])):
        expected = written_with_blocks(model, inputs, row, [blocks[i] for i in image_indices], [len(images[i]) for i in image_indices])
        assert torch.allclose(ours[row], expected, atol=1e-4)
    answers_alone_as_in_the_batch(model, processor, settings)



def vispruner_next_reference(eager, pixel_values, image_size, keep: int, crop_rows: int, crop_cols: int) -> torch.Tensor:
    """One image's block as VisPruner's LLaVA-NeXT code builds it, independently of the engine: each view's T = `keep`
    patches by its rule written out (the CLS row of the eager attention of the feature layer, mean over heads; the
    feature layer's states), a mask per view; the crops' masks stitched and unpadded as the features are (its permutes,
    transformers' `unpad_image`), a True column for the newlines; the packed features (base, rows + newlines) masked."""
    from test_vispruner import vispruner_by_hand
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    with torch.inference_mode():
        out = eager.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        packed = eager.model.get_image_features(pixel_values[None], torch.tensor([image_size]), return_dict=True).pooler_output[0]
    layer = eager.config.vision_feature_layer
    states, attention = out.hidden_states[layer][:, 1:], out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (V, P, D), (V, P)
    side = int(states.shape[1] ** 0.5)
    masks = torch.zeros(states.shape[:2], dtype=torch.bool)
    for view in range(len(states)):
        masks[view, vispruner_by_hand(states[view].tolist(), attention[view].tolist(), keep, 0.5)] = True
    crops = masks[1:].view(crop_rows, crop_cols, side, side).permute(0, 2, 1, 3).reshape(1, crop_rows * side, crop_cols * side)
    crops = unpad_image(crops, image_size)
    crops = torch.cat([crops, torch.ones(*crops.shape[:-1], 1, dtype=torch.bool)], dim=-1).flatten()
    return packed[torch.cat([masks[0], crops])]


@pytest.mark.parametrize("settings, per_view", [(dict(keep=0.5), [6, 8, 8]), (dict(keep=5, budget_per="tile"), [5] * 3)])
def test_vispruner_on_llava_next_keeps_each_view_s_patches_through_the_unpadding_as_its_authors_code(next_models, settings,
                                                                                                     per_view):
    """Each view keeps T of its 16 patches (keep=0.5 of 64 tokens in 5 views: 6 per view; of 64 in 4 views and of 80 in
    5: 8; or keep=N per tile); the prompt written with the block its code builds (newlines kept) gives our logits, at
    positions 0, 1, 2, ... as its code feeds them; batch = alone."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model, eager, processor = next_models
    inputs = batch(processor)
    settings = ReductionSettings(reduction="vispruner", **settings)
    ours = our_logits(model, processor, inputs, settings)
    blocks = []
    for image, size in enumerate(inputs["image_sizes"].tolist()):
        crop_rows, crop_cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        views = inputs["pixel_values"][image, : 1 + crop_rows * crop_cols]
        blocks.append(vispruner_next_reference(eager, views, size, per_view[image], crop_rows, crop_cols))
    images = packed_images(model, inputs)
    assert [len(block) for block in blocks] != [len(packed) for packed in images]
    for row, image_indices in ((0, [0]), (1, [1, 2])):
        expected = written_with_blocks(model, inputs, row, [blocks[i] for i in image_indices], [len(images[i]) for i in image_indices])
        assert torch.allclose(ours[row], expected, atol=1e-4)
    answers_alone_as_in_the_batch(model, processor, settings)


def test_vispruner_is_refused_on_onevision_whose_grids_its_masks_cannot_follow(tiled):
    model = tiled[0]
    settings = ReductionSettings(reduction="vispruner", keep=0.3)
    if model.config.model_type == "llava_next":
        assert llava_next.nominal_plan(model.config, settings).vision.select_views is not None
    else:
        with pytest.raises(ValueError, match="vispruner on llava_onevision: .* anyres_max_9 .* cannot carry, and their "
                                             "code refuses"):
            llava_next.nominal_plan(model.config, settings)
