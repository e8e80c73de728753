"""Recall@K / NDCG@K as MMRec defines them, and their additive sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magnet_dist.eval.metrics import RankingSums, sums_from_hits


def test_hand_case_recall_and_ndcg():
    # ranked hits [1, 0, 0, 1] for a user with two relevant items
    sums = sums_from_hits(np.array([[1, 0, 0, 1]]), np.array([2]), ks=[1, 2, 4])
    m = sums.metrics("test")
    ideal2 = 1 + 1 / math.log2(3)
    assert m["test.recall@1"] == pytest.approx(0.5)
    assert m["test.recall@2"] == pytest.approx(0.5)
    assert m["test.recall@4"] == pytest.approx(1.0)
    assert m["test.ndcg@1"] == pytest.approx(1.0)
    assert m["test.ndcg@2"] == pytest.approx(1 / ideal2)
    assert m["test.ndcg@4"] == pytest.approx((1 + 1 / math.log2(5)) / ideal2)


def test_recall_divides_by_ground_truth_size_not_by_k():
    sums = sums_from_hits(np.array([[1, 1]]), np.array([5]), ks=[2])
    assert sums.metrics("v")["v.recall@2"] == pytest.approx(2 / 5)


def test_ndcg_ideal_covers_min_of_ground_truth_and_k():
    # 5 relevant items, both top-2 are hits: a perfect ranking at K=2
    sums = sums_from_hits(np.array([[1, 1]]), np.array([5]), ks=[2])
    assert sums.metrics("v")["v.ndcg@2"] == pytest.approx(1.0)
    # 1 relevant item at rank 2: ideal DCG has one item only
    sums = sums_from_hits(np.array([[0, 1]]), np.array([1]), ks=[2])
    assert sums.metrics("v")["v.ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_short_ranked_lists_count_missing_ranks_as_misses():
    sums = sums_from_hits(np.array([[1]]), np.array([2]), ks=[1, 3])
    assert sums.metrics("t")["t.recall@3"] == pytest.approx(0.5)


def test_metrics_are_means_over_users():
    hits = np.array([[1, 0], [0, 0]])
    m = sums_from_hits(hits, np.array([1, 1]), ks=[2]).metrics("test")
    assert m == pytest.approx({"test.recall@2": 0.5, "test.ndcg@2": 0.5})


def test_users_without_ground_truth_cannot_be_scored():
    with pytest.raises(ValueError, match="skipped"):
        sums_from_hits(np.array([[0, 0]]), np.array([0]), ks=[2])


def test_metric_keys_and_order():
    m = RankingSums.empty([20, 10]).metrics("test")
    assert list(m) == ["test.recall@10", "test.recall@20", "test.ndcg@10", "test.ndcg@20"]
    assert all(v == 0.0 for v in m.values())


def test_merge_of_two_halves_equals_whole():
    rng = np.random.default_rng(0)
    hits = rng.random((40, 20)) < 0.2
    rel = rng.integers(1, 30, 40)
    whole = sums_from_hits(hits, rel, ks=[10, 20])
    halves = sums_from_hits(hits[:17], rel[:17], ks=[10, 20]).merge(
        sums_from_hits(hits[17:], rel[17:], ks=[10, 20])
    )
    assert halves.users == whole.users == 40
    np.testing.assert_allclose(halves.recall, whole.recall)
    np.testing.assert_allclose(halves.ndcg, whole.ndcg)


def test_merge_rejects_different_ks():
    with pytest.raises(ValueError, match="cannot merge"):
        RankingSums.empty([10]).merge(RankingSums.empty([20]))


def test_tensor_round_trip_and_sum_of_tensors_is_merge():
    rng = np.random.default_rng(1)
    a = sums_from_hits(rng.random((5, 20)) < 0.3, rng.integers(1, 9, 5), ks=[10, 20])
    b = sums_from_hits(rng.random((7, 20)) < 0.3, rng.integers(1, 9, 7), ks=[10, 20])
    t = a.to_tensor()
    assert t.dtype == torch.float64 and t.shape == (5,)
    back = RankingSums.from_tensor(t, [10, 20])
    assert back.users == a.users
    np.testing.assert_array_equal(back.recall, a.recall)
    np.testing.assert_array_equal(back.ndcg, a.ndcg)
    summed = RankingSums.from_tensor(a.to_tensor() + b.to_tensor(), [10, 20])  # an all-reduce
    assert summed.metrics("x") == pytest.approx(a.merge(b).metrics("x"))
