"""Redundancy measures: the textbook definitions on matrices whose values are known, and the command."""

import json
import subprocess
import sys

import pytest
import torch

from lmms_simignore.testbed.redundancy import gini, participation_ratio, stable_rank, token_measures


def test_stable_rank_counts_orthogonal_tokens_of_equal_norm():
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(3.0 * torch.eye(4)[:, :] @ torch.linalg.qr(torch.randn(4, 4))[0]) == pytest.approx(4.0)


def test_stable_rank_of_a_rank_one_matrix_is_one_and_ignores_scale():
    rank_one = torch.randn(7, 1) @ torch.randn(1, 12)
    assert stable_rank(rank_one) == pytest.approx(1.0)
    tokens = torch.randn(9, 16)
    assert stable_rank(10 * tokens) == pytest.approx(stable_rank(tokens))


def test_stable_rank_from_singular_values():
    # X = diag(3, 2, 1): sum s^2 / s_max^2 = (9 + 4 + 1) / 9
    assert stable_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0]))) == pytest.approx(14 / 9)


def test_participation_ratio_of_tokens_varying_along_one_direction_is_one():
    direction = torch.randn(1, 8)
    tokens = torch.randn(10, 1) @ direction + torch.randn(1, 8)  # shared offset does not count (covariance)
    assert participation_ratio(tokens) == pytest.approx(1.0)


def test_participation_ratio_counts_equally_varying_directions():
    # +-e_i for i < 3: covariance eigenvalues (1, 1, 1, 0...) -> (3)^2 / 3 = 3
    tokens = torch.cat([torch.eye(6)[:3], -torch.eye(6)[:3]])
    assert participation_ratio(tokens) == pytest.approx(3.0)
    assert participation_ratio(torch.ones(4, 3)) == 0.0  # identical tokens vary along nothing


def test_gini_of_equal_values_is_zero_and_of_one_holder_is_n_minus_one_over_n():
    assert gini(torch.full((5,), 2.0)) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 4.0])) == pytest.approx(0.75)
    assert gini(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 9)  # sum|a_i-a_j| = 8 over 2 N^2 mean = 2 * 9 * 2
    values = torch.rand(11)
    assert gini(values[torch.randperm(11)]) == pytest.approx(gini(values))
    with pytest.raises(ValueError, match="non-negative"):
        gini(torch.tensor([1.0, -1.0]))


def test_token_measures_reads_norms_per_token():
    tokens = torch.tensor([[3.0, 4.0], [0.0, 5.0], [5.0, 0.0]])  # all norms 5
    measures = token_measures(tokens)
    assert measures["gini_of_norms"] == pytest.approx(0.0)
    assert set(measures) == {"stable_rank", "participation_ratio", "gini_of_norms"}


def test_redundancy_command_writes_json_and_plot_per_layer_and_object_count(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "redundancy", "--out", str(tmp_path), "--num-questions", "60"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "redundancy.json").read_text())
    assert report["layers"] == ["embeddings", "after layer 0", "after layer 1", "after layer 2", "after layer 3"]
    assert report["image_tokens"] == 64 and report["images"] == 60
    assert list(report["per_object_count"]) == ["1", "2", "3", "4", "5", "6"]
    assert sum(bucket["images"] for bucket in report["per_object_count"].values()) == 60
    for bucket in report["per_object_count"].values():
        for metric in ("stable_rank", "participation_ratio", "gini_of_norms"):
            assert len(bucket[metric]["mean"]) == 5
        assert all(1.0 <= value <= 64.0 for value in bucket["stable_rank"]["mean"])
    # more objects, more varied tokens: the embeddings' participation ratio grows from 1 to 6 objects
    by_count = report["per_object_count"]
    assert by_count["6"]["participation_ratio"]["mean"][0] > by_count["1"]["participation_ratio"]["mean"][0]
    assert (tmp_path / "redundancy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| layer |" in completed.stdout
