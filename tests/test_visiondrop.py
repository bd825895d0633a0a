"""VisionDrop: VisionZip's stage in the tower, then LLM stages that keep the image tokens the image attends to most
in the next layer and merge the rest into contextual tokens (tiny random LLaVA, 3 decoder layers, 25 image tokens)."""

import pytest
import torch
from test_engine import run
from test_fastv import padded_batch, row_alone, unreduced  # noqa: F401  (padded_batch is a fixture)
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.visiondrop import DEFAULT_SCHEDULE, received_attention, scaled_schedule
from lmms_simignore.methods.visionzip import contextual_plan, merge_into_targets
from lmms_simignore.settings import ReductionSettings


def test_a_token_scores_the_attention_it_receives_from_the_visible_image_queries():
    # 3 image tokens, one head; rows are queries, columns keys (already a softmax over the whole sequence)
    weights = torch.tensor([[[[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [0.1, 0.6, 0.3]]]])
    assert torch.allclose(received_attention(weights, torch.ones(1, 3, dtype=torch.bool)),
                          torch.tensor([[0.8 / 3, 0.9 / 3, 0.3 / 3]]))
    hidden_first = torch.tensor([[False, True, True]])  # token 0 neither scores nor asks
    scores = received_attention(weights, hidden_first)
    assert scores[0, 0] == float("-inf") and torch.allclose(scores[0, 1:], torch.tensor([0.9 / 2, 0.3 / 2]))


def test_the_published_schedule_scales_to_another_average():
    assert scaled_schedule(32) == DEFAULT_SCHEDULE == ((42, 6), (30, 5), (22, 4), (16, 3))
    assert scaled_schedule(64) == ((84, 12), (60, 10), (44, 8), (32, 6))
    assert scaled_schedule(16) == ((21, 3), (15, 3), (11, 2), (8, 2))


STAGE = dict(prune_stages=((1, 8),), prune_rule="visiondrop", merge_counts=(2,))  # 6 dominant + 2 contextual from layer 1


def test_the_stage_follows_the_eager_attention_and_cached_keys_of_the_next_layer(testbed, padded_batch):
    """Independently of the engine: layer 1's eager attention weights (image queries on image keys, mean over heads
    and queries) give the dominant tokens; layer 1's cached keys (after the rotary embedding, mean over heads) give
    the merge; layer 0's output gives the contextual tokens. Layer 1 must be given exactly those."""
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    reduced = unreduced(eager, inputs)
    layers = eager.model.language_model.layers
    seen = {}

    def keep_output(module, args, output):
        seen.setdefault("output", output)

    def keep_attention(module, args, output):
        seen.setdefault("weights", output[1])

    def keep_input(module, args, kwargs):
        seen.setdefault("input", args[0] if args else kwargs["hidden_states"])
        seen.setdefault("positions", kwargs["position_ids"])

    reference = engine.LanguageModelRun(eager, reduced)  # unpruned: layer 1's weights and keys on the full sequence
    handles = [layers[0].register_forward_hook(keep_output), layers[1].self_attn.register_forward_hook(keep_attention)]
    try:
        reference.prefill()
    finally:
        for handle in handles:
            handle.remove()
    full_output, weights, keys = seen.pop("output"), seen.pop("weights"), reference.cache.layers[1].keys
    handle = layers[1].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        engine.LanguageModelRun(eager, reduced, **STAGE).prefill()
    finally:
        handle.remove()
    image_id = eager.config.image_token_id
    for row in range(2):
        columns = (inputs["input_ids"][row] == image_id).nonzero().flatten()  # (25,)
        on_images = weights[row][:, columns][:, :, columns]  # (H, 25, 25)
        dominant = set(on_images.mean(dim=0).mean(dim=0).topk(6).indices.tolist())
        rest = [index for index in range(25) if index not in dominant]
        metric = keys[row].float().mean(dim=0)[columns[rest]]  # (19, d)
        targets, assignment = contextual_plan(metric[None], 2)
        kept = sorted(dominant | {rest[int(t)] for t in targets})
        positions = reduced.position_ids[row]
        image_positions = set(positions[columns].tolist())
        given = [p for p in seen["positions"][row].tolist() if p in image_positions]
        assert given == positions[columns[kept]].tolist()
        contextual = merge_into_targets(full_output[row, columns[rest]][None], targets, assignment)[0]  # (2, D)
        given_columns = {p: c for c, p in enumerate(seen["positions"][row].tolist())}
        for target, expected in zip(targets.tolist(), contextual):
            received = seen["input"][row, given_columns[int(positions[columns[rest[target]]])]]
            assert torch.allclose(received, expected, atol=1e-5)
            assert not torch.allclose(received, full_output[row, columns[rest[target]]], atol=1e-3)  # really merged


def test_cached_decoding_equals_recomputation_and_a_batch_answers_like_its_rows(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    args = dict(prune_stages=((1, 12), (2, 6)), prune_rule="visiondrop", merge_counts=(3, 2))
    cached = run(tiny_model, processor, reduced, **args)
    assert cached.tolist() == run(tiny_model, processor, reduced, use_cache=False, **args).tolist()
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), **args)
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_merging_nothing_keeps_the_most_attended_tokens(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    keep_all = run(tiny_model, processor, reduced, prune_stages=((1, 25),), prune_rule="visiondrop", merge_counts=(0,))
    assert keep_all.tolist() == run(tiny_model, processor, reduced).tolist()  # keep-all = no reduction
    merged = engine.LanguageModelRun(tiny_model, reduced, **STAGE).prefill()
    plain = engine.LanguageModelRun(tiny_model, reduced, prune_stages=((1, 8),), prune_rule="visiondrop", merge_counts=(0,)).prefill()
    assert not torch.allclose(merged, plain, atol=1e-4)  # the merge changes what layers >= 1 compute


def test_visiondrop_through_the_model_class(testbed, docs):
    args = dict(reduction="visiondrop", visiondrop_schedule="12+2/8+2/5+1", visiondrop_layers="1/2")
    model = make_model(testbed, docs, **args, batch_size=3)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, **args, batch_size=1).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[14, 10, 6]] * 5 + [[0, 0, 0]]  # the last doc has no image


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="visiondrop", keep=16, visiondrop_schedule="12+2/8+2"), "keep=N .* or visiondrop_schedule=, not both"),
    (dict(reduction="visiondrop", visiondrop_schedule="12+2/14+2"), "each stage keeping at most what the one before kept"),
    (dict(reduction="visiondrop", visiondrop_schedule="12+2"), "dominant\\+contextual per stage"),
    (dict(reduction="visiondrop", ignore=8), "budgeted by keep=N or visiondrop_schedule=, not ignore"),
    (dict(reduction="visiondrop", apply="mask"), "apply=mask cannot express visiondrop"),
    (dict(reduction="fastv", visiondrop_layers="1/2"), "only apply to reduction=visiondrop"),
])
def test_bad_visiondrop_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_a_schedule_and_layers_that_do_not_match_are_refused():
    settings = ReductionSettings(reduction="visiondrop", visiondrop_schedule="12+2/8+2/5+1", visiondrop_layers="1")
    with pytest.raises(ValueError, match="2 LLM stages in its schedule .* but 1 stage layers"):
        settings.in_llm_stages(25, 3)
    with pytest.raises(ValueError, match="more than the model's 25 image tokens"):
        ReductionSettings(reduction="visiondrop").vision_budget(25)  # the published 42 + 6
