"""Scores of a trained model for ranking: the full MAGNET score (dot product + MoE read-out) of
every (user, item) pair, computed in bounded chunks from precomputed representations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from magnet_dist.eval.metrics import RankingSums
from magnet_dist.eval.ranking import csr_from_pairs, rank_users
from magnet_dist.model.magnet import MagnetModel

Reps = dict[str, torch.Tensor]

# MoE tokens scored per chunk: beyond a few 10k tokens the head's gathered [tokens * K, M*d]
# buffer outgrows the caches and scoring gets slower per token (ML-100K validation on one CPU
# thread: 2.9 s at 16384, 5.5 s at 65536)
SCORE_CHUNK_TOKENS = 16384


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Scores come from the model in eval mode (no expert dropout, no router noise, and no
    token dropped at capacity, so a pair's score does not depend on its scoring chunk); the
    model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pair_score_fn(model: MagnetModel, max_tokens: int = SCORE_CHUNK_TOKENS) -> Callable:
    """``fn(hu, hi) -> [n_u, n_i]`` scores of all pairs (eval mode); MoE tokens materialised in
    pieces."""

    @torch.no_grad()
    def score(hu: Reps, hi: Reps) -> torch.Tensor:
        with eval_mode(model):
            return _score(hu, hi)

    def _score(hu: Reps, hi: Reps) -> torch.Tensor:
        n_u = next(iter(hu.values())).shape[0]
        n_i = next(iter(hi.values())).shape[0]
        dot = model.dot_matrix(hu, hi)
        if model.moe is None:
            return dot
        rows = max(1, max_tokens // max(n_i, 1))
        for start in range(0, n_u, rows):
            sl = slice(start, min(start + rows, n_u))
            n = sl.stop - sl.start
            tok_u = {m: hu[m][sl].repeat_interleave(n_i, 0) for m in model.modalities}
            tok_i = {m: hi[m].repeat(n, 1) for m in model.modalities}
            mixture, _ = model.moe(model.token(tok_u, tok_i))
            dot[sl] += model.readout(mixture).view(n, n_i)
        return dot

    return score


def ranking_score_fn(model: MagnetModel, user_reps: Reps, item_reps: Reps) -> Callable:
    """Adapter to ``rank_users``: ``fn(user_ids, item_start, item_end)``."""
    score = pair_score_fn(model)

    def fn(user_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        hu = {m: v[user_ids] for m, v in user_reps.items()}
        hi = {m: v[start:end] for m, v in item_reps.items()}
        return score(hu, hi)

    return fn


def popularity_score_fn(dataset) -> Callable:
    """The popularity baseline for ``rank_users``: every user gets the items ranked by their
    number of training interactions (a floor any trained model must clear)."""
    _, ti = dataset.pairs(0)
    counts = torch.from_numpy(np.bincount(ti, minlength=dataset.num_items).astype(np.float32))

    def fn(user_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return counts[start:end].repeat(len(user_ids), 1)  # a copy: ranking masks it in place

    return fn


def pairs_among(users: np.ndarray, items: np.ndarray, listed: np.ndarray, num_items: int):
    """The (user, item) pairs whose item is in ``listed``, the item given as its position in the
    list: the pairs of the list seen as a catalogue of its own (``--items``)."""
    position = np.full(num_items, -1, dtype=np.int64)
    position[listed] = np.arange(len(listed))
    keep = position[items] >= 0
    return users[keep], position[items[keep]]


def listed_reps(reps: Reps, listed: np.ndarray) -> Reps:
    """Item representations of ``listed`` only, in list order (its own catalogue)."""
    rows = torch.from_numpy(np.asarray(listed, dtype=np.int64))
    return {m: v[rows] for m, v in reps.items()}


class SplitEvaluator:
    """Full ranking of one split (valid or test) with only training items masked (MMRec).

    With ``items`` (internal ids), the ranking is among those items only and the ground truth
    keeps only their pairs, so users with none of them in the split are left out: the cold-item
    protocol (rank the new items for the users who interacted with them). The list is then a
    catalogue of its own: ``score_fn`` scores list positions (``listed_reps``)."""

    def __init__(
        self,
        dataset,
        split: int,
        ks: list[int],
        user_chunk: int,
        item_chunk: int,
        items: np.ndarray | None = None,
    ):
        tu, ti = dataset.pairs(0)
        su, si = dataset.pairs(split)
        self.num_items = dataset.num_items
        if items is not None:  # item ids become list positions; score_fn scores the list
            tu, ti = pairs_among(tu, ti, items, dataset.num_items)
            su, si = pairs_among(su, si, items, dataset.num_items)
            self.num_items = len(items)
        self.train_mask = csr_from_pairs(tu, ti, dataset.num_users)
        self.ground_truth = csr_from_pairs(su, si, dataset.num_users)
        self.users = np.unique(su)
        self.ks = ks
        self.user_chunk = user_chunk
        self.item_chunk = item_chunk

    def sums(
        self, score_fn: Callable, users: np.ndarray | None = None, progress: bool = False
    ) -> RankingSums:
        users = self.users if users is None else users
        return rank_users(
            score_fn,
            users,
            self.ground_truth,
            self.train_mask,
            self.num_items,
            self.ks,
            self.user_chunk,
            self.item_chunk,
            progress=progress,
        )
