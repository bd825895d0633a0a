"""Several pruning stages inside the language model (PyramidDrop-style), on a tiny random LLaVA (3 layers):
a stage at layer K keeps, per image, the image tokens still present that layer K-1's last prompt token attends to most."""

import pytest
from test_engine import run
from test_fastv import padded_batch, row_alone, unreduced  # noqa: F401  (padded_batch is a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.fastv import fastv_stage
from lmms_simignore.methods.pdrop import pdrop_stages

TWO_STAGES = ((1, 12), (2, 5))  # 25 image tokens -> 12 from layer 1 -> 5 from layer 2


def eager_stage_choices(eager_model, inputs, reduced, stages):
    """Run the engine on an eager model with hooks, and apply each stage's rule to the attention weights that
    transformers' own eager attention computed in the layer before it: per row, the `keep` image tokens of that
    layer's sequence with the highest head-averaged weight from the last query. Returns, per stage, the chosen
    original positions per row and the image positions the stage's layer was actually given."""
    is_image = inputs["input_ids"] == eager_model.config.image_token_id
    positions = engine.default_position_ids(inputs["attention_mask"])
    image_positions = [set(positions[row, is_image[row]].tolist()) for row in range(is_image.shape[0])]
    given, weights = {}, {}
    layers = eager_model.model.language_model.layers

    def keep_positions(index):
        def hook(module, args, kwargs):
            given.setdefault(index, kwargs["position_ids"])
        return hook

    def keep_weights(index):
        def hook(module, args, output):
            weights.setdefault(index, output[1])  # (B, H, S, S) eager softmax weights
        return hook

    handles = [layer.register_forward_pre_hook(keep_positions(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.self_attn.register_forward_hook(keep_weights(i)) for i, layer in enumerate(layers)]
    try:
        engine.LanguageModelRun(eager_model, reduced, stages=pdrop_stages(stages)).prefill()
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for layer, keep in stages:
        chosen, seen = [], []
        for row, wanted in enumerate(image_positions):
            before = given[layer - 1][row].tolist()
            last_row = weights[layer - 1][row, :, -1, :].mean(dim=0)  # (S,)
            candidates = [column for column, position in enumerate(before) if position in wanted and last_row[column] > 0]
            top = sorted(candidates, key=lambda column: -float(last_row[column]))[:keep]
            chosen.append(sorted(before[column] for column in top))
            seen.append(sorted(position for position in given[layer][row].tolist() if position in wanted))
        results.append((chosen, seen))
    return results


def test_each_stage_keeps_what_the_eager_attention_of_the_layer_before_ranks_highest(testbed, padded_batch):
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    reduced = unreduced(eager, inputs)
    (first_chosen, first_seen), (second_chosen, second_seen) = eager_stage_choices(eager, inputs, reduced, TWO_STAGES)
    assert first_seen == first_chosen and [len(row) for row in first_seen] == [12, 12]
    assert second_seen == second_chosen and [len(row) for row in second_seen] == [5, 5]
    assert all(set(second) <= set(first) for first, second in zip(first_seen, second_seen))


def test_the_second_stage_ranks_with_the_pruned_sequence_not_the_full_one(testbed, padded_batch):
    """Control: choosing the final 5 by layer 1's attention over all 25 tokens (FastV at layer 2) gives another set."""
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    reduced = unreduced(eager, inputs)
    (_, _), (_, two_stage) = eager_stage_choices(eager, inputs, reduced, TWO_STAGES)
    ((_, one_stage),) = eager_stage_choices(eager, inputs, reduced, ((2, 5),))
    assert two_stage != one_stage


def test_each_segment_caches_one_entry_per_token_it_sees(tiny_model, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    staged = engine.LanguageModelRun(tiny_model, reduced, stages=pdrop_stages(TWO_STAGES))
    logits = staged.prefill()
    length = reduced.inputs_embeds.shape[1]
    for step in range(1, 4):
        logits = staged.feed(logits.argmax(-1)[:, None])[:, -1]
        lengths = [staged.cache.layers[i].keys.shape[-2] for i in range(3)]
        assert lengths == [length + step, length - (25 - 12) + step, length - (25 - 5) + step]
    assert staged.image_tokens_seen.visible.tolist() == [[25, 12, 5]] * 2
    assert staged.image_tokens_seen.computed.tolist() == [[25, 12, 5]] * 2


def test_cached_decoding_equals_recomputation_and_a_batch_answers_like_its_rows(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    cached = run(tiny_model, processor, reduced, use_cache=True, stages=pdrop_stages(TWO_STAGES))
    recomputed = run(tiny_model, processor, reduced, use_cache=False, stages=pdrop_stages(TWO_STAGES))
    assert cached.shape[1] > 1 and cached.tolist() == recomputed.tolist()
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), stages=pdrop_stages(TWO_STAGES))
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_one_stage_is_fastv(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    staged = run(tiny_model, processor, reduced, stages=pdrop_stages(((1, 6),)))
    assert staged.tolist() == run(tiny_model, processor, reduced, stages=fastv_stage(1, 6)).tolist()
    assert staged.tolist() != run(tiny_model, processor, reduced).tolist()  # control: pruning changed the answer


@pytest.mark.parametrize(
    "stages, message",
    [
        (((2, 12), (1, 5)), "pdrop's stage at layer 1 must come after layer 2"),
        (((1, 12), (3, 5)), "pdrop's stage at layer 3 must come after layer 1 and before the last of 3 decoder layers"),
        (((0, 12),), "pdrop's stage at layer 0 must come after layer 0"),
        (((1, 5), (2, 12)), "pdrop's stage at layer 2 keeps 12 image tokens per image, but only 5 are visible before it"),
        (((1, 30),), "pdrop's stage at layer 1 keeps 30 image tokens per image, but only 25 are visible before it"),
    ],
)
def test_bad_stages_are_refused_before_any_compute(tiny_model, padded_batch, stages, message):
    inputs, _ = padded_batch
    with pytest.raises(ValueError, match=message):
        engine.LanguageModelRun(tiny_model, unreduced(tiny_model, inputs), stages=pdrop_stages(stages))
