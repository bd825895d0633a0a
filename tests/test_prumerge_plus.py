"""PruMerge+: the patches whose CLS attention is an outlier plus a spread sample, each merged with its 32 most
key-similar patches, then one token for the rest; checked against its code's steps written out in plain Python and
numpy on transformers' eager tower (its hooks on the last layer's q_proj/k_proj), and against transformers' forward on
the prompt written with the shorter image."""

import dataclasses

import numpy as np
import pytest
import torch
from method_checks import assert_batch_answers_as_each_row_alone_and_cached_as_recomputed, assert_the_class_batches_as_alone_and_counts_each_layer
from test_engine import last_logits
from test_model_reductions import docs  # noqa: F401  (a fixture)
from test_visionzip import written_with_a_shorter_image

from lmms_simignore import engine
from lmms_simignore.engine.prompt import with_longer_image_blocks
from lmms_simignore.engine.views import TowerView
from lmms_simignore.methods.base import VisionStage
from lmms_simignore.methods.prumerge_plus import adaptive_indices, fixed_indices, merge_into_kept, outlier_share
from lmms_simignore.settings import ReductionSettings

KEEP_8 = ReductionSettings(reduction="prumerge_plus", keep=8)
AUTO = ReductionSettings(reduction="prumerge_plus", keep="auto")


def share_by_numpy(attention: list[float]) -> float:
    """Its `outlier_dectection`: the fraction above Q3 + 1.5 IQR, numpy's percentiles on float32."""
    values = np.asarray(attention, dtype=np.float32)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


def adaptive_by_hand(attention: list[float]) -> list[int]:
    """Its choice: the int(N·share) highest (ties: lower index), then range(0, N - 1, int(int(1/share)/3)) not among them."""
    share = share_by_numpy(attention)
    top = sorted(range(len(attention)), key=lambda i: (-attention[i], i))[: int(len(attention) * share)]
    return top + [i for i in range(0, len(attention) - 1, int(int(1 / share) / 3)) if i not in top]


def merged_by_hand(states: list[list[float]], keys: list[list[float]], attention: list[float], kept: list[int]):
    """Its merge, loop by loop: for each kept patch, the 32 most cosine-similar keys among every other patch, their states
    weighted by their attention, added to its own; then the attention-weighted sum of the patches not kept."""
    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    out = []
    for i in kept:
        others = sorted((j for j in range(len(states)) if j != i), key=lambda j: -cosine(keys[i], keys[j]))[:32]
        out.append([x + sum(attention[j] * states[j][d] for j in others) for d, x in enumerate(states[i])])
    rest = [j for j in range(len(states)) if j not in kept]
    out.append([sum(attention[j] * states[j][d] for j in rest) for d in range(len(states[0]))])
    return out


def test_two_outliers_of_24_give_a_share_of_1_12_and_every_fourth_patch_besides():
    """Patches 5 and 17 stand out: share 2/24, int(1/share) = 12, stride 4: 5, 17, then 0, 4, 8, 12, 16, 20."""
    attention = torch.full((24,), 0.01) + torch.arange(24) * 1e-5
    attention[5], attention[17] = 0.3, 0.2
    assert outlier_share(attention[None]).tolist() == [pytest.approx(2 / 24)]
    assert adaptive_indices(attention).tolist() == [5, 17, 0, 4, 8, 12, 16, 20]
    # a fixed budget of 6 chosen: the 2 outliers, then every 24 // 6 = 4th patch not among them, the first 4
    assert fixed_indices(attention, 6).tolist() == [5, 17, 0, 4, 8, 12]
    assert fixed_indices(attention, 1).tolist() == [5]  # fewer than the outliers: by attention alone


def test_an_image_without_outliers_is_refused_as_its_code_fails_on_it():
    with pytest.raises(ValueError, match="no patch's CLS attention is an outlier .* divides by that share"):
        adaptive_indices(torch.full((24,), 0.04))


def test_a_quarter_of_outliers_spreads_over_every_other_patch():
    """6 of 24 outliers, the most the fence lets through (those above Q3): int(1/0.25) = 4, stride 1: every patch below
    N − 1 = 23 not among them (its code's `arange(0, 575, ...)` on 576 patches)."""
    attention = torch.full((24,), 0.01) + torch.arange(24) * 1e-5
    attention[18:] = torch.linspace(0.5, 0.9, 6)
    assert outlier_share(attention[None]).item() == 0.25
    assert adaptive_indices(attention).tolist() == [23, 22, 21, 20, 19, 18, *range(18)]


def test_random_attention_keeps_what_its_code_written_by_hand_keeps():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        attention = torch.rand(60, generator=generator) ** 6
        if 0 < share_by_numpy(attention.tolist()) <= 1 / 3:
            assert outlier_share(attention[None]).item() == pytest.approx(share_by_numpy(attention.tolist()))
            assert adaptive_indices(attention).tolist() == adaptive_by_hand(attention.tolist())


def test_merging_adds_the_32_nearest_by_key_weighted_by_attention_and_one_token_for_the_rest():
    generator = torch.Generator().manual_seed(1)
    states, keys, attention = torch.randn(50, 6, generator=generator), torch.randn(50, 4, generator=generator), torch.rand(50, generator=generator)
    kept = torch.tensor([7, 3, 40, 0, 21])
    ours = merge_into_kept(states.double(), keys.double(), attention.double(), kept)
    expected = merged_by_hand(states.tolist(), keys.tolist(), attention.tolist(), kept.tolist())
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def expected_images(folder, pixel_values, choose):
    """Its `token_prune_merge_advanced_plus` on transformers' eager tower: hooks on the last layer's q_proj/k_proj,
    (q·kᵀ)·C^-0.5 softmax, the CLS row on the patches; the patches of `hidden_states[-2]`; `choose(attention list)`
    -> kept indices; merged by hand, projected: one (K_i + 1, D) per image."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    tower, captured = eager.model.vision_tower, {}
    last = tower.encoder.layers[-1].self_attn
    hooks = [last.k_proj.register_forward_hook(lambda module, args, output: captured.setdefault("k", output)),
             last.q_proj.register_forward_hook(lambda module, args, output: captured.setdefault("q", output))]
    try:
        with torch.inference_mode():
            out = tower(pixel_values, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    states = out.hidden_states[eager.config.vision_feature_layer][:, 1:]  # (I, N, C)
    attention = ((captured["q"] @ captured["k"].transpose(-2, -1)) * states.shape[-1] ** -0.5).softmax(dim=-1)[:, 0, 1:]
    images = []
    for s, k, a in zip(states, captured["k"][:, 1:], attention):
        merged = merged_by_hand(s.tolist(), k.tolist(), a.tolist(), choose(a.tolist()))
        with torch.inference_mode():
            images.append(eager.model.multi_modal_projector(torch.tensor(merged)))
    return images


@pytest.fixture(scope="module")
def pictures(tiny_model):
    """Random pixels whose CLS attention has outliers on the tiny model, a share its adaptive rule takes."""
    size = tiny_model.config.vision_config.image_size
    pixel_values = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(7))
    states = engine.vision_tower_states(tiny_model, pixel_values)
    with torch.inference_mode():
        view = TowerView.of(tiny_model.config, states, tiny_model.model.vision_tower.encoder.layers)
        attention, _ = view.last_layer_single_head_cls_attention()
    takes = [0 < share_by_numpy(row.tolist()) for row in attention[:, 1:]]
    chosen = pixel_values[torch.tensor(takes)][:2]
    assert [len(adaptive_by_hand(row.tolist())) for row in attention[torch.tensor(takes)][:2, 1:]] == [14, 4]
    return chosen


def test_the_fixed_budget_equals_its_steps_on_transformers_eager_tower(testbed, tiny_model, pictures):
    def effivlm_fill(attention):  # 7 chosen: the outliers (at least one) by attention, then every 25 // 7 = 3rd patch
        by_attention = max(int(len(attention) * share_by_numpy(attention)), 1)
        top = sorted(range(len(attention)), key=lambda i: (-attention[i], i))[:by_attention]
        return (top + [i for i in range(0, len(attention), len(attention) // 7) if i not in top])[:7]

    expected = expected_images(testbed["model"], pictures, effivlm_fill)
    ours = engine.vision_stage_features(tiny_model, engine.plan_for(tiny_model.config, KEEP_8).vision,
                                        engine.vision_tower_states(tiny_model, pictures))
    assert ours.shape[1] == 8 and torch.allclose(ours, torch.stack(expected), atol=1e-5)


def test_the_adaptive_count_equals_its_steps_on_transformers_eager_tower(testbed, tiny_model, pictures):
    expected = expected_images(testbed["model"], pictures, adaptive_by_hand)
    features, lengths = engine.vision_stage_images(tiny_model, engine.plan_for(tiny_model.config, AUTO).vision,
                                                   engine.vision_tower_states(tiny_model, pictures))
    assert lengths.tolist() == [len(image) for image in expected]
    for image, length, want in zip(features, lengths, expected):
        assert torch.allclose(image[:length], want, atol=1e-5)


@pytest.fixture(scope="module")
def two_prompts(processor, pictures):
    """Two left-padded prompts of one image each, the images `pictures`."""
    from test_engine import chat, encode, images

    prompts = [chat(processor, "What colour?\nA. red\nB. blue"),
               chat(processor, "Context: a longer context line for the second row.\nWhich one?\nA. green\nB. blue")]
    inputs = encode(processor, prompts, images((200, 20, 20), (20, 120, 200)))
    assert inputs["pixel_values"].shape == pictures.shape
    return {**inputs, "pixel_values": pictures}


@pytest.mark.parametrize("settings", [KEEP_8, AUTO], ids=["keep=8", "keep=auto"])
def test_the_prompt_is_transformers_prompt_written_with_the_shorter_image(tiny_model, processor, two_prompts, settings):
    plan = engine.plan_for(tiny_model.config, settings)
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, two_prompts, ["", ""], [])
    features, lengths = engine.vision_stage_images(tiny_model, plan.vision,
                                                   engine.vision_tower_states(tiny_model, two_prompts["pixel_values"]))
    lengths = lengths if lengths is not None else torch.full((2,), features.shape[1])
    logits = last_logits(tiny_model, reduced)
    for row in range(2):
        expected, length = written_with_a_shorter_image(tiny_model, two_prompts, row, features[row, : lengths[row]])
        assert reduced.position_ids[row, -length:].tolist() == list(range(length))
        assert torch.allclose(logits[row], expected, atol=1e-4)


def test_an_image_one_token_longer_than_the_model_s_is_placed_in_one_more_slot(tiny_model, processor, two_prompts):
    """Where the spread sample takes every patch the outliers left, its code passes N + 1 tokens: the prompt grows by
    one image token, as transformers' forward on a prompt written with 26 image tokens computes it."""
    image_id = tiny_model.config.image_token_id
    longer = torch.randn(2, 26, tiny_model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    stage = VisionStage("longer", 25, lambda view: (longer, torch.tensor([26, 20])), adaptive=True)
    plan = dataclasses.replace(engine.plan_for(tiny_model.config, AUTO), vision=stage)
    projector = tiny_model.model.multi_modal_projector
    tiny_model.model.multi_modal_projector = torch.nn.Identity()  # the stage's tokens as they are
    try:
        reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, two_prompts, ["", ""], [])
    finally:
        tiny_model.model.multi_modal_projector = projector
    logits = last_logits(tiny_model, reduced)
    for row, length in ((0, 26), (1, 20)):
        ids = two_prompts["input_ids"][row][two_prompts["attention_mask"][row].bool()]
        span = (ids == image_id).nonzero().flatten()
        written = torch.cat([ids[: span[0]], torch.full((length,), image_id), ids[span[-1] + 1:]])
        embeds = tiny_model.get_input_embeddings()(written)[None].clone()
        embeds[0, span[0]: span[0] + length] = longer[row, :length]
        with torch.inference_mode():
            expected = tiny_model(inputs_embeds=embeds).logits[0, -1]
        assert torch.allclose(logits[row], expected, atol=1e-4)
    assert reduced.visible_image_tokens.tolist() == [26, 20] and reduced.image_tokens.tolist() == [25, 25]
    # the ids behind it: one more image token at the end of each image's block, rows left-padded again
    ids, mask = with_longer_image_blocks(two_prompts["input_ids"], two_prompts["attention_mask"], image_id, 1)
    assert (ids == image_id).sum(dim=1).tolist() == [26, 26] and mask.sum(dim=1).tolist() == (two_prompts["attention_mask"].sum(dim=1) + 1).tolist()
    for row in range(2):
        real = ids[row][mask[row].bool()]
        original = two_prompts["input_ids"][row][two_prompts["attention_mask"][row].bool()]
        span = (original == image_id).nonzero().flatten()
        assert real.tolist() == original[: span[-1] + 1].tolist() + [image_id] + original[span[-1] + 1:].tolist()


@pytest.mark.parametrize("settings", [KEEP_8, AUTO], ids=["keep=8", "keep=auto"])
def test_a_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_prompts, settings):
    assert_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_prompts, settings)


def test_prumerge_plus_through_the_model_class_counts_what_each_layer_saw(testbed, docs):  # noqa: F811
    assert_the_class_batches_as_alone_and_counts_each_layer(testbed, docs, 8, reduction="prumerge_plus")


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="prumerge_plus"), "prumerge_plus needs exactly one of keep=N .*, or keep=auto"),
    (dict(reduction="prumerge_plus", keep=1), "prumerge_plus keeps 1 tokens per image; between 2 .* and the model's 25"),
    (dict(reduction="prumerge_plus", keep=26), "keep=26 exceeds"),
    (dict(reduction="prumerge_plus+fastv", keep="auto"), "keep=auto .* needs reduction=prumerge_plus alone"),
    (dict(reduction="prumerge_plus", keep=8, apply="mask"), "apply=mask applies to a stage before the LLM"),
])
def test_bad_settings_are_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.plan_for(tiny_model.config, ReductionSettings(**kwargs))


def test_a_siglip_tower_is_refused_by_name():
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    config = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
                         text_config=LlamaConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2),
                         vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="prumerge_plus ranks patches by the CLS token's attention; the vision tower "
                                         "'siglip_vision_model' has no CLS token"):
        engine.plan_for(config, KEEP_8)
