"""Pooling, the downsampling baseline, added through the registry alone: each image's grid of projector outputs
average-pooled (kernel = stride), a shorter image at contiguous positions (tiny random LLaVA with a 6 x 6 grid)."""

import pytest
import torch
from test_engine import chat, encode, images, run
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)
from test_visionzip import written_with_a_shorter_image

from lmms_simignore import engine
from lmms_simignore.methods.pool import pooled_grid, valid_budgets
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny import TinyLlavaShape, build_tiny_llava

GRID_6 = TinyLlavaShape(image_size=24, patch_size=4)  # 36 image tokens on a 6 x 6 grid


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = build_tiny_llava(tmp_path_factory.mktemp("grid6"), shape=GRID_6)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return folder, LlavaForConditionalGeneration.from_pretrained(folder).eval(), processor


@pytest.fixture(scope="module")
def two_rows(grid_model):
    _, _, processor = grid_model
    prompts = [chat(processor, "What colour?\nA. red\nB. blue"),
               chat(processor, "Context: a longer context line for the second row.\nWhich one?\nA. green\nB. blue")]
    inputs = encode(processor, prompts, images((200, 20, 20), (20, 120, 200)))
    assert (inputs["attention_mask"][0] == 0).any()  # left padding on the first row
    return inputs


def test_each_window_becomes_its_mean_read_row_major():
    features = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 grid holding 0..15 row-major
    assert pooled_grid(features, (4, 4), 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # (0+1+4+5)/4, ...
    assert pooled_grid(features, (4, 4), 1).flatten().tolist() == list(range(16))
    assert valid_budgets(((24, 24),)) == {576: 1, 144: 2, 64: 3, 36: 4, 16: 6, 9: 8, 4: 12, 1: 24}


def test_the_pooled_image_answers_like_transformers_on_a_prompt_written_with_it(grid_model, two_rows):
    """Independently of the engine: the projector outputs, averaged over 2 x 2 windows by reshaping, placed as a
    9-token image in a prompt written that way; transformers' forward on it gives our logits and positions 0, 1, 2..."""
    _, model, processor = grid_model
    plan = engine.plan_for(model.config, ReductionSettings(reduction="pool", keep=9))
    reduced = engine.prepare_reduced_prompt(model, processor.tokenizer, plan, two_rows, ["", ""], [])
    ours = engine.LanguageModelRun(model, reduced).prefill()  # (B, V)
    with torch.inference_mode():
        projected = model.model.get_image_features(pixel_values=two_rows["pixel_values"], return_dict=True).pooler_output
        projected = torch.stack(list(projected))  # (2, 36, D)
        pooled = projected.reshape(2, 3, 2, 3, 2, -1).mean(dim=(2, 4)).reshape(2, 9, -1)  # 2 x 2 windows, row-major
    for row in range(2):
        expected, length = written_with_a_shorter_image(model, two_rows, row, pooled[row])
        assert reduced.position_ids[row, -length:].tolist() == list(range(length))
        torch.testing.assert_close(ours[row], expected, atol=1e-4, rtol=1e-4)
    assert reduced.visible_image_tokens.tolist() == [9, 9] and reduced.image_tokens.tolist() == [GRID_6.image_tokens] * 2


def test_pooling_with_stride_one_is_the_unreduced_model(grid_model, two_rows):
    _, model, processor = grid_model
    answers = [run(model, processor, engine.prepare_reduced_prompt(
        model, processor.tokenizer, engine.plan_for(model.config, settings), two_rows, ["", ""], [])).tolist()
        for settings in (ReductionSettings(reduction="pool", keep=GRID_6.image_tokens), ReductionSettings())]
    assert answers[0] == answers[1]


def test_a_batch_of_four_answers_as_each_prompt_alone_and_counts_what_each_layer_saw(grid_model, docs):
    folder, _, _ = grid_model
    testbed = {"model": folder}
    batched = make_model(testbed, docs, reduction="pool", keep=4, batch_size=4)
    answers = batched.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, reduction="pool", keep=4, batch_size=1).generate_until(simple_requests(docs))
    records = sorted(batched.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[4, 4, 4]] * 5 + [[0, 0, 0]]  # the last doc has no image
    assert [r["image_tokens"] for r in records] == [GRID_6.image_tokens] * 5 + [0]


@pytest.mark.parametrize("settings, message", [
    (dict(reduction="pool", keep=10), r"for a whole stride s of the 6 x 6 grid: keep=36, 9, 4, 1; got keep=10, nearest valid: 9 or 4"),
    (dict(reduction="pool", keep=0.5), "got keep=18, nearest valid: 9"),
    (dict(reduction="pool", ignore=32), None),  # keep 4: valid
])
def test_a_budget_without_a_whole_stride_is_refused_naming_the_nearest(grid_model, settings, message):
    _, model, _ = grid_model
    if message is None:
        assert engine.plan_for(model.config, ReductionSettings(**settings)).pre_llm.keep == 4
        return
    with pytest.raises(ValueError, match=message):
        engine.plan_for(model.config, ReductionSettings(**settings))


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="pool"), "pool needs exactly one of keep=N"),
    (dict(reduction="pool", keep=9, apply="mask"), "pool makes new tokens .* only apply=drop"),
    (dict(reduction="pool", keep="auto"), "which only simignore and prumerge_plus take, not pool"),
])
def test_bad_pool_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_tokens_that_form_no_grid_are_refused_by_name(testbed):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(testbed["model"])
    config.vision_feature_select_strategy = "full"  # the CLS token stays: 26 tokens, no grid
    with pytest.raises(ValueError, match="pool averages each image's grid of tokens; this model's 26 image tokens per image form no grid"):
        engine.plan_for(config, ReductionSettings(reduction="pool", keep=1))
