"""VisionDrop: VisionZip's stage in the tower, then LLM stages that keep the image tokens the image attends to most
in the next layer and merge the rest into contextual tokens (tiny random LLaVA, 3 decoder layers, 25 image tokens)."""

import pytest
import torch
from test_engine import run
from test_fastv import padded_batch, row_alone, unreduced  # noqa: F401  (padded_batch is a fixture)
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.base import LayerChoice, LayerStage
from lmms_simignore.methods.visiondrop import DEFAULT_SCHEDULE, received_attention, scaled_schedule, visiondrop_stages
from lmms_simignore.methods.visionzip import contextual_plan, merge_into_targets
from lmms_simignore.settings import ReductionSettings


def test_a_token_scores_the_attention_it_receives_from_the_visible_image_queries():
    # 3 image tokens, one head; rows are queries, columns keys (already a softmax over the whole sequence)
    # one head, 3 image tokens at columns 1-3 after a text token; rows are the image queries (a softmax over the row)
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.2, 0.3, 0.0], [0.0, 0.1, 0.6, 0.3]])
    columns = torch.tensor([[1, 2, 3]])
    everyone = torch.ones(1, 3, dtype=torch.bool)
    assert torch.allclose(received_attention(weights.sum(dim=0)[None], columns, everyone),
                          torch.tensor([[0.8 / 3, 0.9 / 3, 0.3 / 3]]))
    hidden_first = torch.tensor([[False, True, True]])  # token 0 neither scores nor asks
    scores = received_attention(weights[1:].sum(dim=0)[None], columns, hidden_first)
    assert scores[0, 0] == float("-inf") and torch.allclose(scores[0, 1:], torch.tensor([0.9 / 2, 0.3 / 2]))


def test_the_published_schedule_scales_to_another_average():
    assert scaled_schedule(32) == DEFAULT_SCHEDULE == ((42, 6), (30, 5), (22, 4), (16, 3))
    assert scaled_schedule(64) == ((84, 12), (60, 10), (44, 8), (32, 6))
    assert scaled_schedule(16) == ((21, 3), (15, 3), (11, 2), (8, 2))


# 6 dominant + 2 contextual from layer 1, each contextual token in its target's place, original positions
TARGET_ORDER = visiondrop_stages(((1, 8),), (2,), order="target", positions="original")
CODE_ORDER = visiondrop_stages(((1, 8),), (2,))  # its code's: [dominant, contextual], positions re-packed


def eager_reference(eager, reduced):
    """Layer 0's output, layer 1's eager attention weights and its cached keys on the full sequence (no stage)."""
    layers, seen = eager.model.language_model.layers, {}

    def keep_output(module, args, output):
        seen.setdefault("output", output)

    def keep_attention(module, args, output):
        seen.setdefault("weights", output[1])

    reference = engine.LanguageModelRun(eager, reduced)
    handles = [layers[0].register_forward_hook(keep_output), layers[1].self_attn.register_forward_hook(keep_attention)]
    try:
        reference.prefill()
    finally:
        for handle in handles:
            handle.remove()
    return seen["output"], seen["weights"], reference.cache.layers[1].keys


def layer_one_input(eager, reduced, stages):
    """(B, S', D) hidden states and (B, S') positions that layer 1 is given in the prompt pass with `stages`."""
    seen = {}

    def keep_input(module, args, kwargs):
        seen.setdefault("input", args[0] if args else kwargs["hidden_states"])
        seen.setdefault("positions", kwargs["position_ids"])

    handle = eager.model.language_model.layers[1].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        engine.LanguageModelRun(eager, reduced, stages=stages).prefill()
    finally:
        handle.remove()
    return seen["input"], seen["positions"]


def expected_stage(row_columns, weights, keys, full_output):
    """Independently of the engine, one row: the 6 dominant image tokens by layer 1's eager weights (image queries on
    image keys, mean over heads, then queries), the 2 merge targets and contextual tokens (VisionZip's rule on layer 1's
    cached keys after the rotary embedding, mean over heads; layer 0's outputs). Indices are into the row's 25."""
    on_images = weights[:, row_columns][:, :, row_columns]  # (H, 25, 25)
    dominant = sorted(on_images.mean(dim=0).mean(dim=0).topk(6).indices.tolist())
    rest = [index for index in range(25) if index not in dominant]
    targets, assignment = contextual_plan(keys.float().mean(dim=0)[row_columns[rest]][None], 2)
    contextual = merge_into_targets(full_output[row_columns[rest]][None], targets, assignment)[0]  # (2, D)
    return dominant, [rest[int(t)] for t in targets], contextual


@pytest.fixture(scope="module")
def eager(testbed):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()


@pytest.mark.parametrize("query_chunks", ["one chunk", "a chunk per query"])
def test_the_stage_follows_the_eager_attention_and_cached_keys_of_the_next_layer(eager, padded_batch, query_chunks, monkeypatch):
    """With each contextual token in its target's place and original positions: layer 1 is given the dominant tokens
    and the targets at their own positions, and the contextual tokens at the targets'. The same when the image queries'
    attention is computed one query at a time (each chunk cut at the last column its queries see)."""
    if query_chunks == "a chunk per query":
        monkeypatch.setattr(engine.attention, "CHUNK_ELEMENTS", 1)
    inputs, _ = padded_batch
    reduced = unreduced(eager, inputs)
    full_output, weights, keys = eager_reference(eager, reduced)
    given_input, given_positions = layer_one_input(eager, reduced, TARGET_ORDER)
    for row in range(2):
        columns = (inputs["input_ids"][row] == eager.config.image_token_id).nonzero().flatten()  # (25,)
        dominant, targets, contextual = expected_stage(columns, weights[row], keys[row], full_output[row])
        positions = reduced.position_ids[row]
        image_positions = set(positions[columns].tolist())
        given = [p for p in given_positions[row].tolist() if p in image_positions]
        assert given == positions[columns[sorted(dominant + targets)]].tolist()
        given_columns = {p: c for c, p in enumerate(given_positions[row].tolist())}
        for target, expected in zip(targets, contextual):
            received = given_input[row, given_columns[int(positions[columns[target]])]]
            assert torch.allclose(received, expected, atol=1e-5)
            assert not torch.allclose(received, full_output[row, columns[target]], atol=1e-3)  # really merged


def test_by_default_the_image_is_rebuilt_as_its_code_does_dominant_then_contextual_at_consecutive_positions(eager, padded_batch):
    """VisionDrop's `visiondrop_rank_drop`: torch.cat([dominant tokens in their order, contextual tokens]), then every
    position re-numbered 0..n-1. Layer 1 must be given exactly that sequence."""
    inputs, _ = padded_batch
    reduced = unreduced(eager, inputs)
    full_output, weights, keys = eager_reference(eager, reduced)
    given_input, given_positions = layer_one_input(eager, reduced, CODE_ORDER)
    orders_differ = False
    for row in range(2):
        columns = (inputs["input_ids"][row] == eager.config.image_token_id).nonzero().flatten()  # (25,)
        dominant, targets, contextual = expected_stage(columns, weights[row], keys[row], full_output[row])
        real = int(inputs["attention_mask"][row].sum())
        left_pad = given_input.shape[1] - (real - 17)  # 17 of the 25 image tokens leave
        before = int(columns[0]) - (inputs["attention_mask"].shape[1] - real)  # real tokens before the image
        assert given_positions[row, left_pad:].tolist() == list(range(real - 17))
        slots = given_input[row, left_pad + before : left_pad + before + 8]  # (8, D) the image, in sequence order
        expected = torch.cat([full_output[row, columns[dominant]], contextual])
        torch.testing.assert_close(slots, expected, atol=1e-5, rtol=1e-5)
        kept = sorted(dominant + targets)  # where the other order would put each token
        in_place = full_output[row, columns[kept]].clone()
        for target, token in zip(targets, contextual):
            in_place[kept.index(target)] = token
        orders_differ |= not torch.allclose(in_place, expected, atol=1e-3)
    assert orders_differ  # control: on this batch the two orders are different sequences


@pytest.mark.parametrize("query_chunks", ["one chunk", "a chunk per query"])
def test_a_stage_s_own_flops_are_what_a_flop_counter_counts_of_its_computation(tiny_model, padded_batch, query_chunks,
                                                                               monkeypatch):
    """What the views report to `LanguageModelRun.stage_flops` (the bench adds it to the layers' FLOPs) equals torch's
    FLOP counter on the same computation: VisionDrop's next-layer attention (in one chunk of queries or one query at a
    time, each chunk scoring the columns up to its last query's) and FastV's one row."""
    from torch.utils.flop_counter import FlopCounterMode

    if query_chunks == "a chunk per query":
        monkeypatch.setattr(engine.attention, "CHUNK_ELEMENTS", 1)
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    counted = []

    def counting(ask):
        def choose(view):
            with FlopCounterMode(display=False) as counter:
                getattr(view, ask)()
            counted.append(counter.get_total_flops())
            return LayerChoice(torch.arange(view.keep).expand(view.image_columns.shape[0], -1))
        return choose

    for ask in ("next_layer_attention_from_images", "last_token_attention", "key_norms"):
        run = engine.LanguageModelRun(tiny_model, reduced, stages=(LayerStage("probe", 1, 8, counting(ask)),))
        run.prefill()
        assert run.stage_flops == counted[-1] > 0, ask
    assert engine.LanguageModelRun(tiny_model, reduced).stage_flops == 0


def test_cached_decoding_equals_recomputation_and_a_batch_answers_like_its_rows(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    args = dict(stages=visiondrop_stages(((1, 12), (2, 6)), (3, 2)))
    cached = run(tiny_model, processor, reduced, **args)
    assert cached.tolist() == run(tiny_model, processor, reduced, use_cache=False, **args).tolist()
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), **args)
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_merging_nothing_keeps_the_most_attended_tokens(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    keep_all = run(tiny_model, processor, reduced, stages=visiondrop_stages(((1, 25),), (0,)))
    assert keep_all.tolist() == run(tiny_model, processor, reduced).tolist()  # keep-all = no reduction
    merged = engine.LanguageModelRun(tiny_model, reduced, stages=CODE_ORDER).prefill()
    plain = engine.LanguageModelRun(tiny_model, reduced, stages=visiondrop_stages(((1, 8),), (0,))).prefill()
    assert not torch.allclose(merged, plain, atol=1e-4)  # the merge changes what layers >= 1 compute


def test_visiondrop_through_the_model_class(testbed, docs):
    args = dict(reduction="visiondrop", visiondrop_schedule="12+2/8+2/5+1", visiondrop_layers="1/2")
    model = make_model(testbed, docs, **args, batch_size=3)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, **args, batch_size=1).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[14, 10, 6]] * 5 + [[0, 0, 0]]  # the last doc has no image


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="visiondrop", keep=16, visiondrop_schedule="12+2/8+2"), "no stage of reduction=visiondrop takes them .visiondrop by visiondrop_schedule"),
    (dict(reduction="visiondrop", visiondrop_schedule="12+2/14+2"), "each stage keeping at most what the one before kept"),
    (dict(reduction="visiondrop", visiondrop_schedule="12+2"), "dominant\\+contextual per stage"),
    (dict(reduction="visiondrop", ignore=8), "budgeted by keep=N .* or visiondrop_schedule=, not keep=None, ignore=8"),
    (dict(reduction="visiondrop", keep=0.25), "budgeted by keep=N .an average number of image tokens per layer"),
    (dict(reduction="visiondrop", apply="mask"), "apply=mask applies to a stage before the LLM"),
    (dict(reduction="visiondrop", visiondrop_merge_order="front"), "visiondrop_merge_order must be one of end, target"),
    (dict(reduction="fastv", visiondrop_layers="1/2"), "visiondrop_layers belongs to visiondrop, which is not in reduction=fastv"),
])
def test_bad_visiondrop_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_a_schedule_and_layers_that_do_not_match_are_refused():
    settings = ReductionSettings(reduction="visiondrop", visiondrop_schedule="12+2/8+2/5+1", visiondrop_layers="1")
    with pytest.raises(ValueError, match="2 LLM stages in its schedule .* but 1 stage layers"):
        settings.plan(25, 3)
    with pytest.raises(ValueError, match="more than the model's 25 image tokens"):
        ReductionSettings(reduction="visiondrop").plan(25, 3)  # the published 42 + 6
