"""DivPrune: the most diverse image tokens by greedy max-min selection on 1 - cosine, kept in order at contiguous
positions; checked against the rule written out by hand on transformers' own projector outputs, and against
transformers' forward on the prompt written with only the kept tokens."""

import pytest
import torch
from method_checks import (assert_batch_answers_as_each_row_alone_and_cached_as_recomputed,
                           assert_keeping_every_token_is_no_reduction, assert_the_class_batches_as_alone_and_counts_each_layer)
from test_engine import last_logits
from test_model_reductions import docs  # noqa: F401  (a fixture)
from test_visionzip import two_rows, written_with_a_shorter_image  # noqa: F401  (two_rows: a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.divprune import divprune_indices, most_diverse
from lmms_simignore.settings import ReductionSettings

KEEP_6 = ReductionSettings(reduction="divprune", keep=6)


def greedy_by_hand(vectors: list[list[float]], keep: int) -> list[int]:
    """DivPrune's rule in plain Python: distance 1 - cosine; first the token whose nearest other token is farthest; then
    each time the token whose nearest chosen token is farthest (ties: the lowest index); returned ascending."""
    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    count = len(vectors)
    distance = [[1 - cosine(vectors[i], vectors[j]) for j in range(count)] for i in range(count)]
    nearest_other = [min(distance[i][j] for j in range(count) if j != i) for i in range(count)]
    chosen = [max(range(count), key=lambda i: (nearest_other[i], -i))]
    while len(chosen) < keep:
        chosen.append(max((i for i in range(count) if i not in chosen),
                          key=lambda i: (min(distance[i][c] for c in chosen), -i)))
    return sorted(chosen)


def test_the_first_token_is_the_one_farthest_from_its_nearest_neighbour_then_the_farthest_from_the_chosen():
    """Directions in the plane at 0, 5, 10, 90 and 180 degrees. The 180-degree token's nearest other (at 90) is the
    farthest anyone's nearest is, so it comes first; then the token farthest from it (0 degrees); then the one whose
    nearer of the two is farthest (90 degrees: 90 from each), not a neighbour of 0."""
    angles = torch.tensor([0.0, 5.0, 10.0, 90.0, 180.0]) * torch.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # (1, 5, 2)
    from lmms_simignore.methods.divprune import cosine_distances

    assert most_diverse(cosine_distances(points), 3)[0].tolist() == [4, 0, 3]
    assert divprune_indices(points, 3)[0].tolist() == [0, 3, 4]


def test_random_vectors_keep_what_the_rule_written_by_hand_keeps():
    vectors = torch.randn(3, 30, 12, generator=torch.Generator().manual_seed(0))
    for keep in (1, 5, 17, 30):
        ours = divprune_indices(vectors, keep)
        assert [row.tolist() for row in ours] == [greedy_by_hand(image.tolist(), keep) for image in vectors]


def test_exact_duplicates_never_take_a_place_twice():
    """Tokens 0-3 equal, 4 another direction: 4 first (its nearest is farthest), then 0, then the duplicates of 0 tie
    with it at distance 0 and the lowest unchosen one comes (its code's argmax would pick 0 again)."""
    points = torch.tensor([[[1.0, 0.0]] * 4 + [[0.0, 1.0]]])  # (1, 5, 2)
    assert divprune_indices(points, 4)[0].tolist() == [0, 1, 2, 4] == greedy_by_hand(points[0].tolist(), 4)


def test_the_prompt_is_transformers_prompt_written_with_the_most_diverse_tokens_alone(tiny_model, processor, two_rows):
    """Independently of the engine: the rule by hand on transformers' projector outputs; the prompt written with those
    tokens only (at positions 0, 1, 2, ...) through transformers' forward."""
    plan = engine.plan_for(tiny_model.config, KEEP_6)
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, two_rows, ["", ""], [])
    ours = last_logits(tiny_model, reduced)
    with torch.inference_mode():
        features = tiny_model.model.get_image_features(pixel_values=two_rows["pixel_values"], return_dict=True).pooler_output
    for row in range(2):
        kept = greedy_by_hand(features[row].tolist(), 6)
        expected, length = written_with_a_shorter_image(tiny_model, two_rows, row, features[row][kept])
        assert reduced.position_ids[row, -length:].tolist() == list(range(length))
        assert torch.allclose(ours[row], expected, atol=1e-4)
    assert reduced.visible_image_tokens.tolist() == [6, 6]


def test_masking_and_dropping_compute_the_same_logits_at_the_same_closed_up_positions(tiny_model, processor, two_rows):
    plan = engine.plan_for(tiny_model.config, KEEP_6)
    masked_plan = engine.plan_for(tiny_model.config, ReductionSettings(reduction="divprune", keep=6, apply="mask"))
    dropped = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, two_rows, ["", ""], [])
    masked = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, masked_plan, two_rows, ["", ""], [])
    assert masked.inputs_embeds.shape[1] > dropped.inputs_embeds.shape[1]
    assert torch.allclose(engine.LanguageModelRun(tiny_model, masked).prefill(),
                          engine.LanguageModelRun(tiny_model, dropped).prefill(), atol=1e-5)


def test_keeping_every_token_is_no_reduction(tiny_model, processor, two_rows):
    assert_keeping_every_token_is_no_reduction(tiny_model, processor, two_rows, ReductionSettings(reduction="divprune", keep=1.0))


def test_a_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_rows):
    assert_batch_answers_as_each_row_alone_and_cached_as_recomputed(tiny_model, processor, two_rows, KEEP_6)


def test_divprune_through_the_model_class_counts_what_each_layer_saw(testbed, docs):  # noqa: F811
    assert_the_class_batches_as_alone_and_counts_each_layer(testbed, docs, 8, reduction="divprune")


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="divprune"), "divprune needs exactly one of keep=N"),
    (dict(reduction="divprune", keep=0), "divprune keeps 0 image tokens per image; between 1 and the 25"),
    (dict(reduction="divprune", keep=26), "keep=26 exceeds"),
])
def test_bad_budgets_are_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.plan_for(tiny_model.config, ReductionSettings(**kwargs))
