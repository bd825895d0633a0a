"""Pure selection functions: Simignore scores and top-k choice."""

import pytest
import torch
import torch.nn.functional as F

from lmms_simignore.reduction import select_top_k, similarity_scores


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
