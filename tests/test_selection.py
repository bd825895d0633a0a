"""Pure selection functions: Simignore scores, the published walk, ablation orders, random draws, top-k."""

import pytest
import torch
import torch.nn.functional as F

from lmms_simignore.methods import random_scores, sample_seed, select_by_order, select_top_k, similarity_scores, walk_scores


def test_top_k_returns_the_best_tokens_in_sequence_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    assert select_top_k(scores, 2).tolist() == [[1, 3], [0, 1]]


def test_top_k_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0]])
    assert select_top_k(scores, 3).tolist() == [[0, 1, 4]]


@pytest.mark.parametrize("keep", [-1, 5])
def test_top_k_rejects_budgets_outside_the_row(keep):
    with pytest.raises(ValueError, match=r"keep must be in \[0, 4\]"):
        select_top_k(torch.zeros(1, 4), keep)


def test_keep_zero_and_keep_all():
    scores = torch.randn(3, 6)
    assert select_top_k(scores, 0).shape == (3, 0)
    assert select_top_k(scores, 6).tolist() == [list(range(6))] * 3


def test_cosine_score_is_the_best_match_over_text_tokens():
    torch.manual_seed(0)
    image, text = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    expected = torch.stack(
        [F.cosine_similarity(image[b][:, None], text[b][None], dim=-1).max(dim=1).values for b in range(2)]
    )
    torch.testing.assert_close(similarity_scores(image, text, mask, "cosine"), expected)


@pytest.mark.parametrize("similarity, p", [("euclidean", 2), ("manhattan", 1)])
def test_distances_keep_the_closest_image_tokens(similarity, p):
    text = torch.zeros(1, 1, 2)
    image = torch.tensor([[[3.0, 0.0], [0.1, 0.0], [1.0, 1.0], [0.0, -2.0]]])  # distances 3, 0.1, ~1.4/2, 2
    scores = similarity_scores(image, text, torch.ones(1, 1, dtype=torch.bool), similarity)
    torch.testing.assert_close(scores, -torch.linalg.vector_norm(image, ord=p, dim=-1))
    assert select_top_k(scores, 2).tolist() == [[1, 2]]


def test_padded_text_tokens_are_ignored():
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # second text token is padding
    scores = similarity_scores(image, text, torch.tensor([[True, False]]), "cosine")
    assert scores.tolist() == [[1.0, 0.0]]


def test_rows_without_text_are_an_error():
    with pytest.raises(ValueError, match=r"rows \[1\] have no text token"):
        similarity_scores(torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.tensor([[True, True], [False, False]]))


def test_unknown_similarity_is_an_error():
    with pytest.raises(ValueError, match="similarity must be one of"):
        similarity_scores(torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), "dot")


# -- ablation orders -----------------------------------------------------------------------------------

RANKED = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 0.8]])  # best first: 0, 5, 3, 2, 4, 1


@pytest.mark.parametrize(
    "order, kept",
    [
        ("unimportant", [0, 3, 5]),  # ignores the least similar (1, 4, 2)
        ("important", [1, 2, 4]),  # ignores the most similar (0, 5, 3)
        ("middle", [0, 1, 5]),  # keeps the top 2 and the bottom 1, ignores the middle band (3, 2, 4)
    ],
)
def test_orders_name_the_part_of_the_ranking_that_is_ignored(order, kept):
    assert select_by_order(RANKED, 3, order).tolist() == [kept]


def test_middle_with_an_even_budget_keeps_as_many_from_the_top_as_from_the_bottom():
    assert select_by_order(RANKED, 4, "middle").tolist() == [[0, 1, 4, 5]]


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order must be one of unimportant, middle, important, random"):
        select_by_order(RANKED, 2, "reverse")


def test_random_scores_depend_only_on_each_image_seed():
    seeds = [sample_seed(0, "task", 7, 0), sample_seed(0, "task", 8, 0)]
    both = random_scores(seeds, 10)
    assert torch.equal(random_scores(seeds[1:], 10)[0], both[1])  # same draw alone or in a batch
    assert not torch.equal(both[0], both[1])
    assert sample_seed(1, "task", 7, 0) != seeds[0] and sample_seed(0, "task", 7, 1) != seeds[0]


# -- the published walk over sorted (image, text) pairs ----------------------------------------------------


def published_walk(pairwise, keep, start, step):
    """The published loop, written out: visit sorted entries start, start+step, ...; collect new image rows."""
    rows, texts = pairwise.shape
    order = sorted(range(rows * texts), key=lambda flat: -float(pairwise.flatten()[flat]))
    collected, index = [], start
    while len(collected) < keep and index < len(order):
        if order[index] // texts not in collected:
            collected.append(order[index] // texts)
        index += step
    return sorted(collected)


@pytest.mark.parametrize("start, step", [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_walk_keeps_what_the_published_loop_keeps(start, step):
    generator = torch.Generator().manual_seed(start * 10 + step)
    pairwise = torch.rand(1, 30, 4, generator=generator)
    for keep in (5, 12, 20):
        assert select_top_k(walk_scores(pairwise, start, step), keep)[0].tolist() == published_walk(pairwise[0], keep, start, step)


def test_walk_from_the_start_equals_ranking_by_best_similarity():
    pairwise = torch.rand(2, 40, 5, generator=torch.Generator().manual_seed(3))
    assert select_top_k(walk_scores(pairwise, 0, 1), 17).tolist() == select_top_k(pairwise.amax(-1), 17).tolist()


def test_skipping_the_best_pair_demotes_a_token_that_has_only_one_good_match():
    pairwise = torch.tensor([[[0.99, -0.9], [0.5, 0.4], [0.45, 0.3]]])  # token 0: one excellent, one awful pair
    assert select_top_k(walk_scores(pairwise, 0, 1), 2).tolist() == [[0, 1]]
    assert select_top_k(walk_scores(pairwise, 1, 1), 2).tolist() == [[1, 2]]


def test_text_padding_is_never_visited_by_the_walk():
    pairwise = torch.tensor([[[0.2, float("-inf")], [0.1, float("-inf")]]])
    assert walk_scores(pairwise, 0, 2).argsort(descending=True).tolist() == [[0, 1]]
