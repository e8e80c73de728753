"""Full ranking (MMRec's protocol), top-K export and the two-stage retrieve-then-rerank mode.

Full ranking: every user is scored against every item, the user's *training* items are masked
(for validation and test alike; validation items are not masked at test time), and the top
max(K) items are compared with the user's ground truth in the evaluated split. Users whose
ground truth is empty are skipped. Memory stays bounded: users go in chunks, and within a user
chunk items go in chunks whose top-K is merged into a running top-K, so a U x I score matrix is
never materialised. Ties in score are broken arbitrarily (torch.topk), as in MMRec.

Two-stage mode (catalogues too large for exact full ranking): an HNSW index over item vectors
retrieves N candidates per user by inner product, a scorer re-ranks them. Its numbers are not
the exact metric: ``retrieval_recall`` measures how much of the exact top-N the retrieval
finds, on a sample of users, and must be reported alongside.
"""

from __future__ import annotations

from collections.abc import Callable

import hnswlib
import numpy as np
import torch
from tqdm import tqdm

from magnet_dist.errors import MagnetError
from magnet_dist.eval.metrics import RankingSums, normalise_ks, sums_from_hits
from magnet_dist.graph.hnsw import CHUNK, build_index, query_index

CSR = tuple[np.ndarray, np.ndarray]  # (indptr [num_users + 1], indices): items of each user
ScoreFn = Callable[[torch.Tensor, int, int], torch.Tensor]
ScorePairsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# CSR helpers


def csr_from_pairs(users: np.ndarray, items: np.ndarray, num_users: int) -> CSR:
    """Per-user item lists from (user, item) pairs: sorted, duplicates removed."""
    users = np.asarray(users, dtype=np.int64).ravel()
    items = np.asarray(items, dtype=np.int64).ravel()
    if users.shape != items.shape:
        raise ValueError(f"{len(users)} users but {len(items)} items: pairs must align")
    if len(users) and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(
            f"user ids must lie in [0, {num_users}), got [{users.min()}, {users.max()}]"
        )
    if len(items) and items.min() < 0:
        raise ValueError("item ids must be >= 0")
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    keep = np.ones(len(users), dtype=bool)
    keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    users, items = users[keep], items[keep]
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
    return indptr, items


def _gather_rows(csr: CSR, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) for every item of ``users`` (row = position in ``users``), row-major."""
    indptr, indices = csr
    starts = indptr[users]
    lens = indptr[users + 1] - starts
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lens)
    offsets = np.arange(lens.sum(), dtype=np.int64) + np.repeat(
        starts - (np.cumsum(lens) - lens), lens
    )
    return rows, indices[offsets]


def _row_lengths(csr: CSR, users: np.ndarray) -> np.ndarray:
    indptr = csr[0]
    if len(users) and (users.min() < 0 or users.max() >= len(indptr) - 1):
        raise ValueError(f"user ids must lie in [0, {len(indptr) - 1}) of the CSR")
    return indptr[users + 1] - indptr[users]


def _hits(
    top_scores: torch.Tensor, top_ids: torch.Tensor, users: np.ndarray, ground_truth: CSR
) -> np.ndarray:
    """hits[r, j]: the j-th ranked item of users[r] is in its ground truth (masked = miss)."""
    ids = top_ids.cpu().numpy().astype(np.int64, copy=False)
    valid = (top_scores > float("-inf")).cpu().numpy()
    rows, items = _gather_rows(ground_truth, users)
    base = np.int64(max(int(ids.max(initial=0)), int(items.max(initial=0))) + 1)
    gt_keys = rows * base + items  # sorted: rows ascending, items sorted within a row
    if len(gt_keys) == 0:
        return np.zeros(ids.shape, dtype=bool)
    keys = np.arange(len(users), dtype=np.int64)[:, None] * base + np.maximum(ids, 0)
    pos = np.minimum(np.searchsorted(gt_keys, keys), len(gt_keys) - 1)
    return (gt_keys[pos] == keys) & valid & (ids >= 0)


# ----------------------------------------------------------------------------------------------
# exact full ranking


def _running_topk(
    score_block: Callable[[int, int], torch.Tensor],
    users: np.ndarray,
    num_items: int,
    k: int,
    exclude: CSR | None,
    item_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, item ids) of each user over all items, item chunk by item chunk.

    ``score_block(start, end)`` gives the [len(users), end - start] scores; the excluded items
    of each user get -inf (written into the returned tensor).
    """
    if exclude is not None:
        ex_rows, ex_items = _gather_rows(exclude, users)
        order = np.argsort(ex_items, kind="stable")
        ex_rows, ex_items = ex_rows[order], ex_items[order]
    best_scores = best_ids = None
    for start in range(0, num_items, item_chunk):
        end = min(start + item_chunk, num_items)
        scores = score_block(start, end)
        if scores.shape != (len(users), end - start):
            raise MagnetError(
                f"score function returned shape {tuple(scores.shape)} for {len(users)} users and "
                f"items [{start}, {end}); expected {(len(users), end - start)}"
            )
        if not torch.is_floating_point(scores):
            scores = scores.float()
        if torch.isnan(scores).any():
            raise MagnetError(f"score function returned NaN scores for items [{start}, {end})")
        if exclude is not None:
            lo, hi = np.searchsorted(ex_items, [start, end])
            if hi > lo:
                r = torch.from_numpy(ex_rows[lo:hi]).to(scores.device)
                c = torch.from_numpy(ex_items[lo:hi] - start).to(scores.device)
                scores[r, c] = float("-inf")
        vals, idx = torch.topk(scores, min(k, end - start), dim=1)
        idx = idx + start
        if best_scores is None:
            best_scores, best_ids = vals, idx
        else:
            merged = torch.cat([best_scores, vals], dim=1)
            merged_ids = torch.cat([best_ids, idx], dim=1)
            best_scores, pos = torch.topk(merged, min(k, merged.shape[1]), dim=1)
            best_ids = torch.gather(merged_ids, 1, pos)
    if best_scores is None:  # no items at all
        empty = torch.empty((len(users), 0))
        return empty, empty.long()
    return best_scores, best_ids


@torch.no_grad()
def rank_users(
    score_fn: ScoreFn,
    users: np.ndarray,
    ground_truth: CSR,
    train_mask: CSR,
    num_items: int,
    ks: tuple[int, ...] | list[int] = (10, 20),
    user_chunk: int = 1024,
    item_chunk: int = 65536,
    progress: bool = True,
) -> RankingSums:
    """Recall/NDCG sums of ``users`` by exact full ranking over all ``num_items`` items.

    ``score_fn(user_ids LongTensor [n], start, end) -> [n, end - start]`` scores items
    start..end-1 (any device; the returned tensor is overwritten with -inf at training items,
    so return a fresh one). ``ground_truth``/``train_mask``: CSR item lists per user id. Users
    without ground truth are skipped; pass each user once (workers: disjoint shards, then
    all-reduce ``to_tensor()`` of the result).
    """
    ks = normalise_ks(ks)
    users = np.asarray(users, dtype=np.int64).ravel()
    num_relevant = _row_lengths(ground_truth, users)
    users, num_relevant = users[num_relevant > 0], num_relevant[num_relevant > 0]
    total = RankingSums.empty(ks)
    starts = range(0, len(users), user_chunk)
    for lo in tqdm(starts, desc="ranking", unit="chunk", disable=not progress, leave=False):
        chunk = users[lo : lo + user_chunk]
        ids = torch.from_numpy(chunk)
        scores, items = _running_topk(
            lambda s, e, ids=ids: score_fn(ids, s, e),
            chunk,
            num_items,
            ks[-1],
            train_mask,
            item_chunk,
        )
        hits = _hits(scores, items, chunk, ground_truth)
        total = total.merge(sums_from_hits(hits, num_relevant[lo : lo + user_chunk], ks))
    return total


@torch.no_grad()
def topk_items(
    score_fn: ScoreFn,
    users: np.ndarray,
    num_items: int,
    k: int,
    exclude: CSR | None = None,
    user_chunk: int = 1024,
    item_chunk: int = 65536,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids (int64) and scores (float32) per user, best first, for recommendations.

    Pass the training CSR as ``exclude`` to leave already-seen items out (the usual case).
    Where fewer than k items remain, ids are -1 and scores -inf.
    """
    users = np.asarray(users, dtype=np.int64).ravel()
    if exclude is not None:
        _row_lengths(exclude, users)  # validates the ids
    out_ids = np.full((len(users), k), -1, dtype=np.int64)
    out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    starts = range(0, len(users), user_chunk)
    for lo in tqdm(starts, desc="top-k", unit="chunk", disable=not progress, leave=False):
        chunk = users[lo : lo + user_chunk]
        ids = torch.from_numpy(chunk)
        scores, items = _running_topk(
            lambda s, e, ids=ids: score_fn(ids, s, e), chunk, num_items, k, exclude, item_chunk
        )
        scores = scores.float().cpu().numpy()
        items = items.cpu().numpy()
        items[scores == -np.inf] = -1
        width = scores.shape[1]
        out_ids[lo : lo + len(chunk), :width] = items
        out_scores[lo : lo + len(chunk), :width] = scores
    return out_ids, out_scores


# ----------------------------------------------------------------------------------------------
# two-stage: HNSW retrieval by inner product, then re-ranking of the candidates


def build_item_index(
    item_vecs: np.ndarray,
    m: int = 16,
    ef_construction: int = 200,
    seed: int = 0,
    num_threads: int = 1,
    progress: bool = True,
) -> hnswlib.Index:
    """HNSW index over item vectors for maximum inner product search (one inserting thread by
    default, so the candidates are reproducible: see :func:`magnet_dist.graph.hnsw.build_index`)."""
    return build_index(
        item_vecs,
        space="ip",
        m=m,
        ef_construction=ef_construction,
        seed=seed,
        num_threads=num_threads,
        progress=progress,
        desc="HNSW build [items]",
    )


def retrieve_candidates(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    n: int,
    *,
    users: np.ndarray | None = None,
    exclude: CSR | None = None,
    index: hnswlib.Index | None = None,
    m: int = 16,
    ef_construction: int = 200,
    ef: int | None = None,
    seed: int = 0,
    num_threads: int = -1,
    progress: bool = True,
) -> np.ndarray:
    """N candidate items per user row (int64 [rows, min(n, num_items)], best first, -1 = none).

    Items are ranked by <user_vec, item_vec> through HNSW (``index`` reused if given, else built
    with m / ef_construction). With ``exclude`` (a CSR indexed by ``users[row]``, default
    row number) each user's excluded items are skipped, so N candidates remain for re-ranking.
    ``ef`` (search breadth, default 2N) is raised to the number of results asked for.
    ``num_threads`` query the index (building it takes one thread: reproducible candidates).
    """
    user_vecs = np.ascontiguousarray(user_vecs, dtype=np.float32)
    num_items = len(item_vecs)
    width = min(n, num_items)
    if index is None:
        index = build_item_index(item_vecs, m, ef_construction, seed, progress=progress)
    ef = 2 * width if ef is None else ef
    out = np.full((len(user_vecs), width), -1, dtype=np.int64)
    if width == 0:
        return out
    if exclude is None:
        labels, _ = query_index(
            index,
            user_vecs,
            width,
            ef=ef,
            num_threads=num_threads,
            progress=progress,
            desc="HNSW retrieve",
        )
        return labels
    users = np.arange(len(user_vecs)) if users is None else np.asarray(users, dtype=np.int64)
    excluded = _row_lengths(exclude, users)
    by_excluded = np.argsort(excluded, kind="stable")  # similar query sizes go together
    with tqdm(total=len(users), desc="HNSW retrieve", disable=not progress, leave=False) as bar:
        for lo in range(0, len(users), CHUNK):
            rows = by_excluded[lo : lo + CHUNK]
            k_query = int(min(num_items, width + excluded[rows].max()))
            labels, _ = query_index(
                index, user_vecs[rows], k_query, ef=ef, num_threads=num_threads, progress=False
            )
            ex_rows, ex_items = _gather_rows(exclude, users[rows])
            base = np.int64(num_items)
            dropped = np.isin(
                np.arange(len(rows), dtype=np.int64)[:, None] * base + labels,
                ex_rows * base + ex_items,
            )
            order = np.argsort(dropped, axis=1, kind="stable")[:, :width]
            picked = np.take_along_axis(labels, order, axis=1)
            picked[np.take_along_axis(dropped, order, axis=1)] = -1
            out[rows, : picked.shape[1]] = picked
            bar.update(len(rows))
    return out


@torch.no_grad()
def retrieval_recall(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    n: int,
    sample_users: int | np.ndarray = 1000,
    *,
    users: np.ndarray | None = None,
    exclude: CSR | None = None,
    candidates: np.ndarray | None = None,
    index: hnswlib.Index | None = None,
    seed: int = 0,
    item_chunk: int = 65536,
    **retrieve_kwargs,
) -> float:
    """Share of the exact top-N (by inner product, same exclusions) that retrieval finds.

    Measured on ``sample_users`` user rows (a count drawn with ``seed``, or explicit rows).
    ``candidates`` (rows aligned with ``user_vecs``) are checked if given, else retrieval runs
    for the sample with ``index`` / ``retrieve_kwargs``. Items tied with the N-th exact score
    count as found.
    """
    user_vecs = np.ascontiguousarray(user_vecs, dtype=np.float32)
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    num_items = len(item_vecs)
    users = np.arange(len(user_vecs)) if users is None else np.asarray(users, dtype=np.int64)
    if np.ndim(sample_users) == 0:
        size = min(int(sample_users), len(user_vecs))
        rows = np.sort(np.random.default_rng(seed).choice(len(user_vecs), size, replace=False))
    else:
        rows = np.asarray(sample_users, dtype=np.int64)
    if len(rows) == 0 or num_items == 0:
        return 1.0
    if candidates is None:
        retrieve_kwargs.setdefault("progress", False)
        cand = retrieve_candidates(
            user_vecs[rows],
            item_vecs,
            n,
            users=users[rows],
            exclude=exclude,
            index=index,
            seed=seed,
            **retrieve_kwargs,
        )
    else:
        cand = np.asarray(candidates, dtype=np.int64)[rows]
    width = min(n, num_items)
    uv, iv = torch.from_numpy(user_vecs[rows]), torch.from_numpy(item_vecs)
    exact_scores, _ = _running_topk(
        lambda s, e: uv @ iv[s:e].T, users[rows], num_items, width, exclude, item_chunk
    )
    n_exact = (exact_scores > float("-inf")).sum(dim=1).numpy()
    kth = exact_scores.gather(1, torch.from_numpy(np.maximum(n_exact - 1, 0))[:, None]).numpy()
    valid = cand >= 0
    cand_scores = np.einsum("rd,rnd->rn", user_vecs[rows], item_vecs[np.maximum(cand, 0)])
    tol = 1e-4 * np.maximum(np.abs(kth), 1.0)
    found = ((cand_scores >= kth - tol) & valid).sum(axis=1)
    return float(np.minimum(found, n_exact).sum() / max(n_exact.sum(), 1))


@torch.no_grad()
def rank_candidates(
    score_pairs_fn: ScorePairsFn,
    users: np.ndarray,
    candidates: np.ndarray,
    ground_truth: CSR,
    train_mask: CSR,
    ks: tuple[int, ...] | list[int] = (10, 20),
    user_chunk: int = 1024,
    progress: bool = True,
) -> RankingSums:
    """Recall/NDCG sums from re-ranking each user's candidate items (rows aligned with users).

    ``score_pairs_fn(user_ids LongTensor [n], item_ids LongTensor [n, c]) -> [n, c]``.
    Candidates < 0 (padding) and training items are masked; users without ground truth skipped.
    """
    ks = normalise_ks(ks)
    users = np.asarray(users, dtype=np.int64).ravel()
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or len(candidates) != len(users):
        raise ValueError(f"candidates must be [len(users)={len(users)}, N], got {candidates.shape}")
    num_relevant = _row_lengths(ground_truth, users)
    keep = num_relevant > 0
    users, candidates, num_relevant = users[keep], candidates[keep], num_relevant[keep]
    total = RankingSums.empty(ks)
    starts = range(0, len(users), user_chunk)
    for lo in tqdm(starts, desc="re-ranking", unit="chunk", disable=not progress, leave=False):
        chunk = users[lo : lo + user_chunk]
        cand = candidates[lo : lo + user_chunk]
        safe = np.maximum(cand, 0)
        ex_rows, ex_items = _gather_rows(train_mask, chunk)
        base = np.int64(max(int(safe.max(initial=0)), int(ex_items.max(initial=0))) + 1)
        masked = (cand < 0) | np.isin(
            np.arange(len(chunk), dtype=np.int64)[:, None] * base + safe, ex_rows * base + ex_items
        )
        scores = score_pairs_fn(torch.from_numpy(chunk), torch.from_numpy(safe))
        if scores.shape != cand.shape:
            raise MagnetError(
                f"pair score function returned shape {tuple(scores.shape)}, expected {cand.shape}"
            )
        scores = scores.float() if not torch.is_floating_point(scores) else scores
        scores = scores.masked_fill(torch.from_numpy(masked).to(scores.device), float("-inf"))
        top_scores, pos = torch.topk(scores, min(ks[-1], scores.shape[1]), dim=1)
        top_ids = torch.gather(torch.from_numpy(safe).to(pos.device), 1, pos)
        hits = _hits(top_scores, top_ids, chunk, ground_truth)
        total = total.merge(sums_from_hits(hits, num_relevant[lo : lo + user_chunk], ks))
    return total
