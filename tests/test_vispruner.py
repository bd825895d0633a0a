"""VisPruner: important image tokens by the tower's attention, the rest thinned for diversity by its rounds of
even/odd matching, kept in order at contiguous positions; checked against the rule written out in plain Python on
transformers' eager attention weights (the CLS row on CLIP, the attention received on SigLIP), and against
transformers' forward on the prompt written with only the kept tokens."""

import pytest
import torch
from method_checks import (assert_batch_answers_as_each_row_alone_and_cached_as_recomputed,
                           assert_keeping_every_token_is_no_reduction, assert_the_class_batches_as_alone_and_counts_each_layer)
from test_engine import last_logits
from test_mipha import mipha  # noqa: F401  (a fixture)
from test_model_reductions import docs  # noqa: F401  (a fixture)
from test_visionzip import two_rows, written_with_a_shorter_image  # noqa: F401  (two_rows: a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.vispruner import vispruner_indices
from lmms_simignore.settings import ReductionSettings

KEEP_8 = ReductionSettings(reduction="vispruner", keep=8)


def vispruner_by_hand(states: list[list[float]], attention: list[float], keep: int, ratio: float) -> list[int]:
    """VisPruner's rule in plain Python: int(keep x ratio) tokens by attention (ties: the lower index); the rest, in
    descending attention, thinned in rounds: even places scored by their highest cosine to an odd place, the min(8,
    surplus) highest-scoring go, the kept even places (by descending score) then the odd places; returned ascending."""
    def unit(vector):
        norm = sum(x * x for x in vector) ** 0.5
        return [x / norm for x in vector]

    units = [unit(vector) for vector in states]
    order = sorted(range(len(states)), key=lambda i: (-attention[i], i))
    important, residual, diverse = order[: int(keep * ratio)], order[int(keep * ratio):], keep - int(keep * ratio)
    while diverse and len(residual) > diverse:
        dropped = min(8, len(residual) - diverse)
        even, odd = residual[0::2], residual[1::2]
        score = [max(sum(a * b for a, b in zip(units[e], units[o])) for o in odd) for e in even]
        ranked = sorted(range(len(even)), key=lambda j: (-score[j], j))
        residual = [even[j] for j in ranked[dropped:]] + odd
    return sorted(important + (residual if diverse else []))


def test_even_place_duplicates_of_odd_place_tokens_go_first():
    """24 tokens ranked by attention in index order; 10 of 20 are important (0-9). The residual 10-23 lose 4 in one
    round: the even places 12, 16, 20 and 22 duplicate their odd neighbours 13, 17, 21 and 23; the other even places
    (10, 14, 18) are unique and stay."""
    states = torch.eye(24)
    for even, odd in ((12, 13), (16, 17), (20, 21), (22, 23)):
        states[even] = states[odd]
    attention = 1 - torch.arange(24.0) / 100
    kept = vispruner_indices(states[None], attention[None], keep=20, important_ratio=0.5)
    assert kept[0].tolist() == [*range(12), 13, 14, 15, 17, 18, 19, 21, 23]


def test_random_tokens_keep_what_the_rule_written_by_hand_keeps():
    generator = torch.Generator().manual_seed(0)
    states, attention = torch.randn(3, 60, 10, generator=generator), torch.rand(3, 60, generator=generator)
    for keep, ratio in ((16, 0.5), (30, 0.75), (7, 0.5), (5, 0.0), (12, 1.0), (60, 0.5), (1, 0.5)):
        ours = vispruner_indices(states, attention, keep, ratio)
        assert [row.tolist() for row in ours] == [vispruner_by_hand(s.tolist(), a.tolist(), keep, ratio)
                                                  for s, a in zip(states, attention)], (keep, ratio)


def expected_shorter_images(folder, pixel_values, keep, attention_of):
    """Transformers' eager tower on `pixel_values`: the rule by hand on `attention_of(tower output)` (I, N) and the
    projected feature-layer states of the image tokens it keeps, (I, keep, D); independent of the engine."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    config = eager.config
    with torch.inference_mode():
        out = eager.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        first = int(config.vision_feature_select_strategy == "default")
        image_states = out.hidden_states[config.vision_feature_layer][:, first:]  # (I, N, D)
        attention = attention_of(out, config)
        kept = [vispruner_by_hand(s.tolist(), a.tolist(), keep, 0.5) for s, a in zip(image_states, attention)]
        return eager.model.multi_modal_projector(torch.stack([s[k] for s, k in zip(image_states, kept)]))


def test_clip_ranks_by_the_cls_row_of_the_feature_layer_as_transformers_eager_weights_give_it(testbed, tiny_model, two_rows):
    """Its CLIP code: `attentions[select_layer][:, :, 0, 1:]`, averaged over heads; the patches of `hidden_states[-2]`."""
    def cls_row(out, config):
        return out.attentions[config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)

    expected = expected_shorter_images(testbed["model"], two_rows["pixel_values"], 8, cls_row)
    assert tiny_model.config.vision_config._attn_implementation == "sdpa"
    states = engine.vision_tower_states(tiny_model, two_rows["pixel_values"])
    ours = engine.vision_stage_features(tiny_model, engine.plan_for(tiny_model.config, KEEP_8).vision, states)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_siglip_ranks_by_the_attention_received_in_the_last_layer(mipha):  # noqa: F811
    """Its SigLIP code (no CLS token): `attentions[-1].mean(dim=-2)`, averaged over heads, on Mipha's converted tower;
    the image tokens are the feature layer's (-2) under the "full" strategy."""
    from transformers import LlavaForConditionalGeneration

    def received(out, config):
        return out.attentions[-1].mean(dim=-2).mean(dim=1)

    model = LlavaForConditionalGeneration.from_pretrained(mipha["out"], dtype=torch.float32).eval()
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = engine.image_tokens_per_image(model.config)
    expected = expected_shorter_images(mipha["out"], pixel_values, tokens // 3, received)
    plan = engine.plan_for(model.config, ReductionSettings(reduction="vispruner", keep=tokens // 3))
    ours = engine.vision_stage_features(model, plan.vision, engine.vision_tower_states(model, pixel_values))
    assert model.config.vision_feature_layer != -1 and model.config.vision_feature_select_strategy == "full"
    assert torch.allclose(ours, expected, atol=1e-5)


def test_the_prompt_is_transformers_prompt_written_with_the_kept_tokens_alone(tiny_model, processor, two_rows):
    plan = engine.plan_for(tiny_model.config, KEEP_8)
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, two_rows, ["", ""], [])
    features = engine.vision_stage_features(tiny_model, plan.vision,
                                            engine.vision_tower_states(tiny_model, two_rows["pixel_values"]))
    logits = last_logits(tiny_model, reduced)
    for row in range(2):
        expected, length = written_with_a_shorter_image(tiny_model, two_rows, row, features[row])
        assert reduced.position_ids[row, -length:].tolist() == list(range(length))
        assert torch.allclose(logits[row], expected, atol=1e-4)


def test_keeping_every_token_is_no_reduction(tiny_model, processor, two_rows):
    assert_keeping_every_token_is_no_reduction(tiny_model, processor, two_rows, ReductionSettings(reduction="vispruner", keep=1.0))


def test_a_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_rows):
    assert_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_rows, KEEP_8)


def test_vispruner_through_the_model_class_counts_what_each_layer_saw(testbed, docs):  # noqa: F811
    assert_the_class_batches_as_alone_and_counts_each_layer(testbed, docs, 8, reduction="vispruner")


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="vispruner"), "vispruner needs exactly one of keep=N"),
    (dict(reduction="vispruner", keep=0), "vispruner keeps 0 image tokens per image; between 1 and the model's 25"),
    (dict(reduction="vispruner", keep=26), "keep=26 exceeds"),
    (dict(reduction="vispruner", keep=8, important_ratio=1.5), "important_ratio must be a fraction in \\[0, 1\\]"),
    (dict(reduction="vispruner", keep=8, apply="mask"), "apply=mask applies to a stage before the LLM"),
])
def test_bad_settings_are_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.plan_for(tiny_model.config, ReductionSettings(**kwargs))


def test_a_clip_tower_whose_cls_token_is_an_image_token_is_refused(tiny_model):
    config = tiny_model.config.__class__.from_dict({**tiny_model.config.to_dict(), "vision_feature_select_strategy": "full"})
    with pytest.raises(ValueError, match="vispruner ranks the patches by the CLS token's attention; under "
                                         "vision_feature_select_strategy='full' the CLS token is itself an image token"):
        engine.plan_for(config, KEEP_8)
