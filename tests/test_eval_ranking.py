"""Full ranking (MMRec protocol), top-K export and the two-stage retrieve-then-rerank mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magnet_dist.eval.ranking import (
    csr_from_pairs,
    rank_candidates,
    rank_users,
    retrieval_recall,
    retrieve_candidates,
    topk_items,
)


def reference_metrics(scores, train, truth, ks):
    """Brute force, one user at a time: mask training items, sort, count hits."""
    out = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in ks}
    users = 0
    for u in range(scores.shape[0]):
        if not truth.get(u):
            continue
        users += 1
        s = scores[u].astype(np.float64).copy()
        s[list(train.get(u, ()))] = -np.inf
        ranked = [i for i in np.argsort(-s, kind="stable") if s[i] > -np.inf]
        for k in ks:
            hit = [1 if i in truth[u] else 0 for i in ranked[:k]]
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hit))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(truth[u]), k)))
            out[f"recall@{k}"] += sum(hit) / len(truth[u])
            out[f"ndcg@{k}"] += dcg / idcg
    return {key: v / max(users, 1) for key, v in out.items()}, users


def as_csr(sets, num_users):
    pairs = [(u, i) for u, items in sets.items() for i in items]
    u, i = (np.array(x, dtype=np.int64) for x in zip(*pairs, strict=True)) if pairs else ([], [])
    return csr_from_pairs(np.asarray(u), np.asarray(i), num_users)


def dense_score_fn(scores):
    t = torch.from_numpy(scores)
    return lambda ids, start, end: t[ids, start:end].clone()


def random_case(seed, num_users=30, num_items=60):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((num_users, num_items)).astype(np.float32)
    train, truth = {}, {}
    for u in range(num_users):
        items = rng.permutation(num_items)
        train[u] = set(items[: rng.integers(0, 15)].tolist())
        if rng.random() < 0.8:  # some users have no ground truth in this split
            truth[u] = set(items[20 : 20 + rng.integers(1, 12)].tolist())
    return scores, train, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("item_chunk,user_chunk", [(1, 7), (7, 1), (13, 30), (60, 4), (1000, 1000)])
def test_rank_users_matches_brute_force_reference(seed, item_chunk, user_chunk):
    scores, train, truth = random_case(seed)
    expected, users = reference_metrics(scores, train, truth, ks=[5, 10, 20])
    sums = rank_users(
        dense_score_fn(scores),
        np.arange(30),
        as_csr(truth, 30),
        as_csr(train, 30),
        num_items=60,
        ks=[5, 10, 20],
        user_chunk=user_chunk,
        item_chunk=item_chunk,
        progress=False,
    )
    assert sums.users == users
    got = {key.split(".", 1)[1]: v for key, v in sums.metrics("test").items()}
    assert got == pytest.approx(expected, abs=1e-12)


def test_item_chunk_size_does_not_change_results():
    scores, train, truth = random_case(5, num_users=50, num_items=200)
    results = [
        rank_users(
            dense_score_fn(scores),
            np.arange(50),
            as_csr(truth, 50),
            as_csr(train, 50),
            200,
            ks=[10, 20],
            item_chunk=c,
            progress=False,
        ).to_tensor()
        for c in (3, 17, 64, 200, 5000)
    ]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-12)


def test_only_training_items_are_masked_not_validation_items():
    # item 1 is the user's validation item and scores highest: at test time it is NOT masked
    scores = np.array([[5.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    train, test = {0: {0}}, {0: {2}}
    sums = rank_users(
        dense_score_fn(scores),
        np.array([0]),
        as_csr(test, 1),
        as_csr(train, 1),
        4,
        ks=[1, 2],
        progress=False,
    )
    m = sums.metrics("test")
    assert m["test.recall@1"] == 0.0  # rank 1 is the validation item 1 (train item 0 is masked)
    assert m["test.recall@2"] == 1.0


def test_users_without_ground_truth_are_skipped():
    scores = np.ones((3, 5), dtype=np.float32)
    truth = {0: {1}, 2: {3}}
    sums = rank_users(
        dense_score_fn(scores),
        np.arange(3),
        as_csr(truth, 3),
        as_csr({}, 3),
        5,
        ks=[5],
        progress=False,
    )
    assert sums.users == 2
    assert sums.metrics("v")["v.recall@5"] == 1.0


def test_score_fn_is_called_on_bounded_blocks():
    calls = []
    scores = np.random.default_rng(0).standard_normal((25, 40)).astype(np.float32)
    base = dense_score_fn(scores)

    def score_fn(ids, start, end):
        calls.append((len(ids), end - start))
        return base(ids, start, end)

    truth = {u: {u % 40} for u in range(25)}
    rank_users(
        score_fn,
        np.arange(25),
        as_csr(truth, 25),
        as_csr({}, 25),
        40,
        ks=[10],
        user_chunk=8,
        item_chunk=16,
        progress=False,
    )
    assert max(n for n, _ in calls) <= 8 and max(w for _, w in calls) <= 16
    assert sum(n * w for n, w in calls) == 25 * 40  # every score computed exactly once


def test_fewer_items_than_k_and_all_masked_users():
    scores = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    truth = {0: {0}, 1: {1}}
    train = {1: {0, 1, 2}}  # user 1 has every item in training: nothing can be a hit
    sums = rank_users(
        dense_score_fn(scores),
        np.arange(2),
        as_csr(truth, 2),
        as_csr(train, 2),
        3,
        ks=[10, 20],
        progress=False,
    )
    assert sums.users == 2
    assert sums.metrics("t")["t.recall@10"] == pytest.approx(0.5)


def test_nan_scores_are_an_error():
    scores = np.full((1, 3), np.nan, dtype=np.float32)
    with pytest.raises(Exception, match="NaN"):
        rank_users(
            dense_score_fn(scores),
            np.array([0]),
            as_csr({0: {1}}, 1),
            as_csr({}, 1),
            3,
            progress=False,
        )


def test_csr_from_pairs_sorts_and_removes_duplicates():
    indptr, indices = csr_from_pairs(np.array([2, 0, 2, 2, 0]), np.array([5, 3, 1, 5, 0]), 4)
    assert indptr.tolist() == [0, 2, 2, 4, 4]
    assert indices.tolist() == [0, 3, 1, 5]


def test_csr_from_pairs_rejects_out_of_range_users():
    with pytest.raises(ValueError, match="user ids"):
        csr_from_pairs(np.array([3]), np.array([0]), 3)


def test_topk_items_excludes_training_items_and_pads():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    train = as_csr({0: {1}, 1: {0, 1, 2}}, 2)
    ids, top = topk_items(
        dense_score_fn(scores), np.arange(2), 4, k=3, exclude=train, item_chunk=3, progress=False
    )
    assert ids.tolist() == [[3, 2, 0], [3, -1, -1]]
    assert top[0].tolist() == pytest.approx([0.7, 0.5, 0.1])
    assert np.isneginf(top[1, 1:]).all()
    ids, _ = topk_items(dense_score_fn(scores), np.arange(2), 4, k=2, progress=False)
    assert ids.tolist() == [[1, 3], [0, 1]]


# ---- two-stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(3)
    users = rng.standard_normal((40, 16)).astype(np.float32)
    items = rng.standard_normal((150, 16)).astype(np.float32)
    train, truth = {}, {}
    for u in range(40):
        perm = rng.permutation(150)
        train[u] = set(perm[: rng.integers(0, 20)].tolist())
        if u % 5:
            truth[u] = set(perm[30 : 30 + rng.integers(1, 10)].tolist())
    return users, items, as_csr(train, 40), as_csr(truth, 40)


def dot_pairs_fn(users, items):
    u, i = torch.from_numpy(users), torch.from_numpy(items)
    return lambda ids, cand: (u[ids][:, None, :] * i[cand]).sum(-1)


def test_two_stage_with_all_items_equals_exact_ranking(vectors):
    uv, iv, train, truth = vectors
    users = np.arange(40)
    exact = rank_users(
        lambda ids, s, e: torch.from_numpy(uv)[ids] @ torch.from_numpy(iv[s:e]).T,
        users,
        truth,
        train,
        150,
        ks=[10, 20],
        progress=False,
    )
    cand = retrieve_candidates(
        uv, iv, 150, users=users, exclude=train, num_threads=1, progress=False
    )
    two_stage = rank_candidates(
        dot_pairs_fn(uv, iv), users, cand, truth, train, ks=[10, 20], progress=False
    )
    assert two_stage.users == exact.users
    assert two_stage.metrics("t") == pytest.approx(exact.metrics("t"), abs=1e-9)


def test_retrieve_candidates_skips_excluded_items_and_keeps_n(vectors):
    uv, iv, train, _ = vectors
    cand = retrieve_candidates(uv, iv, 25, exclude=train, num_threads=1, progress=False)
    assert cand.shape == (40, 25)
    indptr, indices = train
    for u in range(40):
        assert not set(cand[u].tolist()) & set(indices[indptr[u] : indptr[u + 1]].tolist())
        assert len(set(cand[u].tolist())) == 25 and cand[u].min() >= 0


def test_retrieval_recall_is_high_and_exact_when_n_covers_all(vectors):
    uv, iv, train, _ = vectors
    assert retrieval_recall(uv, iv, 150, sample_users=40, exclude=train, num_threads=1) == 1.0
    assert retrieval_recall(uv, iv, 20, sample_users=40, exclude=train, num_threads=1) >= 0.9


def test_retrieval_recall_sees_bad_candidates(vectors):
    uv, iv, _, _ = vectors
    worst = np.argsort(uv @ iv.T, axis=1)[:, :10]  # the 10 lowest-scoring items
    assert retrieval_recall(uv, iv, 10, sample_users=40, candidates=worst) == 0.0


def test_rank_candidates_masks_training_items_and_padding():
    scores = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    cand = np.array([[3, 2, 1, -1]])
    truth, train = as_csr({0: {1}}, 1), as_csr({0: {3}}, 1)
    t = torch.from_numpy(scores)
    sums = rank_candidates(
        lambda ids, c: t[ids[:, None], c],
        np.array([0]),
        cand,
        truth,
        train,
        ks=[1, 2],
        progress=False,
    )
    m = sums.metrics("t")
    assert m["t.recall@1"] == 0.0 and m["t.recall@2"] == 1.0  # ranking: 2, 1 (3 masked)
