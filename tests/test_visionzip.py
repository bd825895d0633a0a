"""VisionZip's vision-side stage: dominant tokens by the CLS attention of the tower's feature layer, the rest merged
into contextual tokens, the shorter image placed in the prompt at contiguous positions (tiny random LLaVA)."""


import pytest
import torch
from test_engine import chat, encode, images, run
from test_fastv import row_alone
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.random_tokens import random_scores
from lmms_simignore.methods.selection import select_top_k
from lmms_simignore.methods.visionzip import dominant_indices, merge_contextual, split_budget, visionzip_tokens
from lmms_simignore.settings import ReductionSettings

ZIP_8 = ReductionSettings(reduction="visionzip", dominant=6, contextual=2)


def test_merging_adds_the_mean_of_the_joined_tokens_to_each_target():
    # 6 remaining tokens, 2 contextual: targets are tokens 0 and 3 (step 6 // 2 = 3)
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.1, 1.0], [0.0, 1.0], [0.9, 0.2], [0.0, 2.0]]])
    hidden = torch.tensor([[[float(i), 10.0 * i] for i in range(6)]])
    merged = merge_contextual(hidden, keys, contextual=2)
    # token 1 and 4 point like target 0, tokens 2 and 5 like target 3
    assert torch.allclose(merged, torch.tensor([[[0 + 2.5, 0 + 25.0], [3 + 3.5, 30 + 35.0]]]))


def test_a_target_nobody_joins_stays_as_it_was():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.1]]])  # 2 contextual: targets 0 and 2
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    merged = merge_contextual(hidden, keys, contextual=2)
    assert merged.flatten().tolist() == [1.0 + 5.0, 4.0]  # tokens 1 and 3 both join target 0


def test_dominant_tokens_are_the_cls_and_the_patches_it_attends_to_most():
    attention = torch.tensor([[0.01, 0.30, 0.10, 0.30, 0.05], [0.50, 0.05, 0.20, 0.10, 0.15]])
    assert dominant_indices(attention, 3).tolist() == [[0, 1, 3], [0, 2, 4]]
    assert dominant_indices(attention, 2).tolist() == [[0, 1], [0, 2]]  # a tie goes to the lower index
    with pytest.raises(ValueError, match="dominant must be in \\[1, 5\\]"):
        dominant_indices(attention, 0)


def test_the_image_is_dominant_tokens_in_order_then_contextual_ones():
    hidden = torch.arange(12.0).reshape(1, 6, 2)
    attention = torch.tensor([[0.0, 0.1, 0.5, 0.1, 0.4, 0.2]])
    keys = torch.eye(6)[None, :, :2] + 0.01
    tokens = visionzip_tokens(hidden, attention, keys, dominant=3, contextual=1)
    assert tokens.shape == (1, 4, 2)
    assert tokens[0, :3].tolist() == hidden[0, [0, 2, 4]].tolist()  # CLS, then patches 2 and 4 in their order
    # the rest (1, 3, 5) merge into target 1: itself + the mean of 3 and 5
    assert tokens[0, 3].tolist() == (hidden[0, 1] + hidden[0, [3, 5]].mean(dim=0)).tolist()


def test_budgets_split_as_visionzips_64_tokens():
    assert split_budget(64) == (54, 10)  # VisionZip's README for LLaVA-1.5
    assert split_budget(128) == (108, 20) and split_budget(192) == (162, 30)  # the same share, as later papers use
    assert split_budget(1) == (1, 0)  # the CLS token alone


@pytest.fixture(scope="module")
def two_rows(processor):
    prompts = [chat(processor, "What colour?\nA. red\nB. blue"),
               chat(processor, "Context: a longer context line for the second row.\nWhich one?\nA. green\nB. blue")]
    inputs = encode(processor, prompts, images((200, 20, 20), (20, 120, 200)))
    assert (inputs["attention_mask"][0] == 0).any()  # left padding on the first row
    return inputs


def test_dominant_and_merged_tokens_follow_the_eager_attention_and_keys_of_the_feature_layer(testbed, tiny_model, two_rows):
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    tower = eager.model.vision_tower
    layer_index = eager.config.vision_feature_layer % (len(tower.encoder.layers) + 1) - 1
    captured = {}
    handle = tower.encoder.layers[layer_index].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: captured.setdefault("keys", output))
    try:
        with torch.inference_mode():
            out = tower(two_rows["pixel_values"], output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    heads = tower.config.num_attention_heads
    cls_row = out.attentions[layer_index][:, :, 0, :].sum(dim=1)  # (I, T) eager softmax weights, heads summed
    keys = captured["keys"].unflatten(-1, (heads, -1)).mean(dim=2)  # (I, T, d) averaged over heads
    with torch.inference_mode():
        expected = eager.model.multi_modal_projector(
            visionzip_tokens(out.hidden_states[layer_index + 1], cls_row, keys, dominant=6, contextual=2))
        cls = eager.model.multi_modal_projector(out.hidden_states[layer_index + 1][:, 0])
    assert tiny_model.config.vision_config._attn_implementation == "sdpa"
    states = engine.vision_tower_states(tiny_model, two_rows["pixel_values"])
    ours = engine.vision_stage_features(tiny_model, engine.plan_for(tiny_model.config, ZIP_8).vision, states)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(ours[:, 0], cls, atol=1e-5)  # the CLS token reaches the LLM, first


def written_with_a_shorter_image(model, inputs, row, image):
    """Transformers' own forward on row `row`'s prompt written with `image` (K, D) in place of its image tokens, no
    padding: its last logits (V,) and the prompt's length."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    span = (ids == model.config.image_token_id).nonzero().flatten()
    shortened = torch.cat([ids[: span[0] + image.shape[0]], ids[span[-1] + 1:]])  # K image placeholders instead of N
    embeds = model.get_input_embeddings()(shortened)[None].clone()
    embeds[0, span[0]: span[0] + image.shape[0]] = image
    with torch.inference_mode():
        return model(inputs_embeds=embeds).logits[0, -1], shortened.shape[0]


def test_the_shorter_image_answers_like_transformers_on_the_shortened_prompt(tiny_model, processor, two_rows):
    """The LLM sees text, the 8 image tokens, text, at positions 0, 1, 2, ... like a prompt written that way."""
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, ZIP_8), two_rows, ["", ""], [])
    states = engine.vision_tower_states(tiny_model, two_rows["pixel_values"])
    features = engine.vision_stage_features(tiny_model, engine.plan_for(tiny_model.config, ZIP_8).vision, states)  # (I, 8, D)
    batch_logits = engine.LanguageModelRun(tiny_model, reduced).prefill()  # (B, V) after each row's last token
    for row in range(2):
        expected, length = written_with_a_shorter_image(tiny_model, two_rows, row, features[row])
        assert reduced.position_ids[row, -length:].tolist() == list(range(length))
        ours = batch_logits[row]
        assert torch.allclose(ours, expected, atol=1e-4)


def test_cached_decoding_equals_recomputation_and_a_batch_its_rows(tiny_model, processor, two_rows):
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, ZIP_8), two_rows, ["", ""], [])
    cached = run(tiny_model, processor, reduced)
    assert torch.equal(cached, run(tiny_model, processor, reduced, use_cache=False))
    for row in range(2):
        alone = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, ZIP_8), row_alone(two_rows, row), [""], [])
        assert run(tiny_model, processor, alone)[0].tolist() == cached[row].tolist()


def test_visionzip_through_the_model_class_counts_what_each_layer_saw(testbed, docs):
    model = make_model(testbed, docs, reduction="visionzip", keep=8, batch_size=3)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, reduction="visionzip", keep=8, batch_size=1).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[8, 8, 8]] * 5 + [[0, 0, 0]]  # the last doc has no image
    assert [r["image_tokens"] for r in records] == [25] * 5 + [0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="visionzip"), "visionzip needs either keep=N or both dominant= and contextual="),
    (dict(reduction="visionzip", keep=8, apply="mask"), "apply=mask applies to a stage before the LLM"),
    (dict(reduction="visionzip", ignore=8), "visionzip is budgeted by keep=N .or dominant= and contextual=., not keep=None, ignore=8"),
    (dict(reduction="visionzip", dominant=6), "either keep=N or both dominant= and contextual="),
    (dict(reduction="visionzip", keep=8, dominant=6, contextual=2), "no stage of reduction=visionzip takes them"),
    (dict(reduction="visionzip", dominant=0, contextual=2), "dominant must be an integer >= 1"),
    (dict(reduction="fastv", dominant=6), "dominant belongs to visionzip, which is not in reduction=fastv"),
])
def test_bad_visionzip_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_a_budget_beyond_the_image_is_refused():
    with pytest.raises(ValueError, match="more than the model's 25 image tokens"):
        ReductionSettings(reduction="visionzip", dominant=20, contextual=6).plan(25, 3)


def test_towers_without_a_cls_token_are_refused_by_name():
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    config = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
                         text_config=LlamaConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2))
    for settings in (ZIP_8, ReductionSettings(reduction="visiondrop", keep=4)):
        with pytest.raises(ValueError, match=f"{settings.reduction} ranks patches by the CLS token's attention; the vision tower "
                                             f"'siglip_vision_model' has no CLS token"):
            engine.plan_for(config, settings)


def test_a_stage_before_the_llm_chooses_among_the_tokens_visionzip_left(tiny_model, processor, two_rows):
    """visionzip+random: random keeps 5 of VisionZip's 8 tokens per image, each at the position it had in VisionZip's
    shorter image (as random keeps original positions); keeping all 8 is VisionZip alone."""
    def reduced(settings, seeds):
        return engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, settings),
                                             two_rows, ["", ""], seeds)

    zipped = reduced(ZIP_8, [])
    everything = reduced(ReductionSettings(reduction="visionzip+random", dominant=6, contextual=2, keep=8), [3, 4])
    assert torch.equal(run(tiny_model, processor, everything), run(tiny_model, processor, zipped))
    five = reduced(ReductionSettings(reduction="visionzip+random", dominant=6, contextual=2, keep=5), [3, 4])
    chosen = select_top_k(random_scores([3, 4], 8), 5)  # (2, 5) of each image's 8, as random draws them
    for row in range(2):
        columns = zipped.image_columns[row, chosen[row]]
        torch.testing.assert_close(five.inputs_embeds[row, five.image_columns[row]], zipped.inputs_embeds[row, columns])
        assert five.position_ids[row, five.image_columns[row]].tolist() == zipped.position_ids[row, columns].tolist()
    assert five.visible_image_tokens.tolist() == [5, 5] and five.image_tokens.tolist() == [25, 25]
