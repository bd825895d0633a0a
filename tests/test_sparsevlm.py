"""SparseVLM (v1.5): text raters chosen on the layer-0 embeddings score the image tokens by their attention at the
pruning layers; the top k stay, the best 30% (+1) of the rest are merged by DPC-kNN after the kept ones, positions
counted anew. Checked against its code's steps written out in plain Python, on transformers' eager attention weights
and layer outputs (tiny random LLaVA, 3 decoder layers, 25 image tokens)."""

import math

import pytest
import torch
from method_checks import assert_batch_answers_as_each_row_alone_and_cached_as_recomputed
from test_fastv import padded_batch, unreduced  # noqa: F401  (padded_batch is a fixture)
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)
from test_visiondrop import layer_one_input

from lmms_simignore import engine
from lmms_simignore.methods.sparsevlm import density_peak_clusters, merged_tokens, raters, scaled_schedule
from lmms_simignore.settings import ReductionSettings

ONE_STAGE = dict(reduction="sparsevlm", sparsevlm_layers="0", sparsevlm_schedule="10")  # layer 0 prunes: 10 + 1 merged


def test_its_budgets_give_the_counts_its_code_gives_on_llava_1_5():
    """Layers 0-2 see 576; 3-6 the first stage's (kept + merged), 7-15 the second's, 16-31 the third's: 300 kept of 576
    leave 276, int(0.3 x 276) + 1 = 83 recycled into int(83 / 10) + 1 = 9, so 309; and so on."""
    expected = {192: (309, 204, 113), 128: (312, 117, 39), 64: (82, 32, 18)}
    for keep, (first, second, third) in expected.items():
        visible = ReductionSettings(reduction="sparsevlm", keep=keep).plan(576, 32, (24, 24)).visible_per_layer()
        assert visible == [576] * 3 + [first] * 4 + [second] * 9 + [third] * 16, keep


def test_a_fraction_is_its_schedule_for_that_share_of_each_image_s_tokens():
    """keep=1/3 of 576 is 192: its own schedule; of 147 tokens 49, the 64 one scaled by 49/64."""
    fraction = ReductionSettings(reduction="sparsevlm", keep=1 / 3)
    assert [stage.keep for stage in fraction.plan(576, 32, (24, 24)).layers] == [309, 204, 113]
    assert [stage.keep for stage in fraction.plan(147, 32, (7, 21)).layers] == [
        stay + merged for stay, merged in [(51, 3), (23, 2), (13, 1)]]


def test_other_budgets_scale_the_nearest_of_its_schedules():
    assert scaled_schedule(192) == (300, 200, 110) and scaled_schedule(64) == (66, 30, 17)
    assert scaled_schedule(32) == (33, 15, 9)  # 64's halved, rounded half up
    assert scaled_schedule(150) == (355, 129, 42)  # 128's x 150/128
    # on the 4-layer testbed its layers 2/6/15 of 32 are 0/1/2 of 4: the stages act from layers 1, 2 and 3
    plan = ReductionSettings(reduction="sparsevlm", keep=16).plan(64, 4, (8, 8))
    assert [stage.layer for stage in plan.layers] == [1, 2, 3]


def raters_by_hand(image: list[list[float]], text: list[list[float]]) -> list[bool]:
    """Its rule: for each image token a softmax over the text of the raw dot products; the mean over image tokens; the
    text tokens above the mean of that."""
    shares = [0.0] * len(text)
    for v in image:
        dots = [sum(a * b for a, b in zip(v, t)) for t in text]
        top = max(dots)
        exps = [math.exp(d - top) for d in dots]
        for j, e in enumerate(exps):
            shares[j] += e / sum(exps) / len(image)
    mean = sum(shares) / len(shares)
    return [share > mean for share in shares]


def dpc_by_hand(points: list[list[float]], clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN as its `cluster_and_merge`: distances L2 / sqrt(D); density exp(-mean of the squared distances to the
    `clusters` nearest, itself included); delta the distance to the nearest denser point (else the largest distance);
    the `clusters` highest delta x density are the centres; each point to its nearest centre, a centre to itself."""
    count, width = len(points), len(points[0])
    distance = [[math.dist(p, q) / math.sqrt(width) for q in points] for p in points]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in distance]
    largest = max(max(row) for row in distance)
    delta = [min([distance[i][j] for j in range(count) if density[j] > density[i]] or [largest]) for i in range(count)]
    centres = sorted(range(count), key=lambda i: (-delta[i] * density[i], i))[:clusters]
    assignment = [min(range(clusters), key=lambda c: (distance[centres[c]][i], c)) for i in range(count)]
    for c, centre in enumerate(centres):
        assignment[centre] = c
    return centres, assignment


def test_raters_are_the_text_tokens_the_image_shares_most_with():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        image, text = torch.randn(9, 6, generator=generator), torch.randn(7, 6, generator=generator)
        assert raters(image, text).tolist() == raters_by_hand(image.tolist(), text.tolist())


def test_density_peaks_cluster_as_its_code_written_by_hand():
    generator = torch.Generator().manual_seed(1)
    for count, clusters in ((12, 2), (31, 4), (40, 5)):
        points = torch.randn(count, 5, generator=generator, dtype=torch.float64)
        centres, assignment = density_peak_clusters(points, clusters)
        assert (centres.tolist(), assignment.tolist()) == dpc_by_hand(points.tolist(), clusters)


def test_a_merged_token_is_its_members_sum_over_their_count_plus_a_millionth():
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]], dtype=torch.float64)
    merged = merged_tokens(tokens, torch.tensor([0, 0, 1]), 2)
    expected = torch.tensor([[4.0, 6.0], [10.0, 10.0]], dtype=torch.float64) / torch.tensor([[2 + 1e-6], [1 + 1e-6]],
                                                                                            dtype=torch.float64)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-12) and not torch.allclose(merged[1], tokens[2], rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def eager(testbed):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()


def layer_zero(eager, reduced):
    """Layer 0's output and eager attention weights on the full sequence (no stage)."""
    layers, seen = eager.model.language_model.layers, {}

    def keep_output(module, args, output):
        seen.setdefault("output", output)

    def keep_weights(module, args, output):
        seen.setdefault("weights", output[1])

    handles = [layers[0].register_forward_hook(keep_output), layers[0].self_attn.register_forward_hook(keep_weights)]
    try:
        engine.LanguageModelRun(eager, reduced).prefill()
    finally:
        for handle in handles:
            handle.remove()
    return seen["output"], seen["weights"]


def expected_row(inputs, image_token_id, reduced, row, output, weights):
    """Independently of the engine, one row: raters by hand on the prompt's embeddings (the text after the image), the
    image tokens' scores from layer 0's eager weights (mean over heads, then raters), the 10 kept, the 15 pruned's best
    int(0.3 x 15) + 1 = 5 by score merged into int(5 / 10) + 1 = 1 token (layer 0's outputs). Indices into the 25."""
    columns = (inputs["input_ids"][row] == image_token_id).nonzero().flatten()
    end = inputs["attention_mask"].shape[1]
    text = list(range(int(columns[-1]) + 1, end))
    rates = raters_by_hand(reduced.inputs_embeds[row, columns].tolist(), reduced.inputs_embeds[row, text].tolist())
    rows = [column for column, rated in zip(text, rates) if rated]
    scores = weights[row].mean(dim=0)[rows][:, columns].mean(dim=0)  # (25,)
    kept = sorted(sorted(range(25), key=lambda i: (-float(scores[i]), i))[:10])
    pruned = [i for i in range(25) if i not in kept]
    recycled = sorted(pruned, key=lambda i: (-float(scores[i]), i))[:5]
    merged = output[row, columns[recycled]].sum(dim=0) / (5 + 1e-6)
    return columns, kept, recycled, merged


def test_the_stage_follows_the_raters_eager_attention_and_merges_after_the_kept_tokens(eager, padded_batch):
    """Layer 1 is given the prompt with the image as [its 10 kept tokens in order, the merged token] at positions
    counted anew (0, 1, 2, ...), as its code rebuilds it."""
    inputs, _ = padded_batch
    reduced = unreduced(eager, inputs)
    output, weights = layer_zero(eager, reduced)
    plan = engine.plan_for(eager.config, ReductionSettings(**ONE_STAGE))
    given, positions = layer_one_input(eager, reduced, plan.layers)
    for row in range(2):
        columns, kept, _, merged = expected_row(inputs, eager.config.image_token_id, reduced, row, output, weights)
        real = int(inputs["attention_mask"][row].sum())
        left_pad = given.shape[1] - (real - 14)  # 14 of the 25 image tokens leave
        before = int(columns[0]) - (inputs["attention_mask"].shape[1] - real)
        assert positions[row, left_pad:].tolist() == list(range(real - 14))
        image = given[row, left_pad + before: left_pad + before + 11]
        torch.testing.assert_close(image, torch.cat([output[row, columns[kept]], merged[None]]), atol=1e-5, rtol=1e-5)


def test_with_original_positions_the_merged_token_takes_its_centre_s_place(eager, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(eager, inputs)
    output, weights = layer_zero(eager, reduced)
    plan = engine.plan_for(eager.config, ReductionSettings(**ONE_STAGE, stage_positions="original"))
    given, positions = layer_one_input(eager, reduced, plan.layers)
    for row in range(2):
        columns, kept, recycled, merged = expected_row(inputs, eager.config.image_token_id, reduced, row, output, weights)
        centre = recycled[dpc_by_hand(output[row, columns[recycled]].tolist(), 1)[0][0]]  # the one cluster's centre
        slots = sorted(kept + [centre])
        image_positions = set(reduced.position_ids[row, columns].tolist())
        assert [p for p in positions[row].tolist() if p in image_positions] == reduced.position_ids[row, columns[slots]].tolist()
        at = {p: c for c, p in enumerate(positions[row].tolist())}
        for slot in slots:
            expected = merged if slot == centre else output[row, columns[slot]]
            torch.testing.assert_close(given[row, at[int(reduced.position_ids[row, columns[slot]])]], expected,
                                       atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_recomputation_and_a_batch_its_rows(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    for positions in ("repacked", "original"):
        settings = ReductionSettings(**ONE_STAGE, stage_positions=positions)
        assert_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, inputs, settings)


def test_sparsevlm_through_the_model_class_counts_what_each_layer_saw(testbed, docs):  # noqa: F811
    args = dict(reduction="sparsevlm", sparsevlm_layers="0/1", sparsevlm_schedule="10/4")
    model = make_model(testbed, docs, batch_size=3, **args)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, batch_size=1, **args).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    # 25, then 10 + 1 merged, then 4 kept of 11 + int(int(0.3 x 7) + 1) / 10) + 1 = 1 merged
    assert [r["computed_per_layer"] for r in records] == [[25, 11, 5]] * 5 + [[0, 0, 0]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="sparsevlm"), "sparsevlm needs one of keep=N and sparsevlm_schedule="),
    (dict(reduction="sparsevlm", ignore=100), "sparsevlm is budgeted by keep=N"),
    (dict(reduction="sparsevlm", sparsevlm_schedule="10/20"), "sparsevlm_schedule must be .* non-increasing"),
    (dict(reduction="sparsevlm", sparsevlm_layers="2/1", keep=64), "sparsevlm_layers must be increasing"),
    (dict(reduction="sparsevlm", keep=64, sparsevlm_schedule="10"), "no stage of reduction=sparsevlm takes them"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="sparsevlm", keep=8), "sparsevlm prunes after layers 0/1/1 of this 3-layer language model"),
    (dict(reduction="sparsevlm", sparsevlm_layers="0/2", sparsevlm_schedule="10/5"), "each needs its own layer and a "
                                                                                     "layer after it"),
    (dict(reduction="sparsevlm", sparsevlm_layers="0", sparsevlm_schedule="10/5"), "2 stages in its schedule .* but 1 "
                                                                                   "pruning layers"),
])
def test_layers_the_model_cannot_take_are_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.plan_for(tiny_model.config, ReductionSettings(**kwargs))
