"""Recall@K and NDCG@K exactly as MMRec computes them, kept as additive sums.

Per user with a non-empty ground truth G (the user's items in the evaluated split):
- Recall@K = hits@K / |G| (MMRec's ``recall_``: divided by |G|, not by min(|G|, K));
- NDCG@K = DCG@K / IDCG@K with binary relevance, DCG@K = sum over hit ranks r <= K of
  1 / log2(r + 1), and IDCG@K over min(|G|, K) relevant items.
The reported value is the mean over those users. Sums (not means) are kept so shards of users
evaluated on different workers combine by addition, e.g. one all-reduce of ``to_tensor()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


def normalise_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Sorted, distinct cut-offs; each must be a positive integer."""
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"cut-offs K must be positive integers, got {list(ks)}")
    return out


@dataclass
class RankingSums:
    """Per-K sums of per-user Recall and NDCG, and the number of users they cover."""

    ks: tuple[int, ...]
    recall: np.ndarray  # float64 [len(ks)]: sum over users of Recall@K
    ndcg: np.ndarray  # float64 [len(ks)]: sum over users of NDCG@K
    users: int

    def __post_init__(self) -> None:
        self.ks = normalise_ks(self.ks)
        self.recall = np.asarray(self.recall, dtype=np.float64)
        self.ndcg = np.asarray(self.ndcg, dtype=np.float64)
        if self.recall.shape != (len(self.ks),) or self.ndcg.shape != (len(self.ks),):
            raise ValueError(f"recall/ndcg sums must have one value per K in {self.ks}")

    @classmethod
    def empty(cls, ks: Iterable[int]) -> RankingSums:
        """Sums over no users (the identity of ``merge``)."""
        n = len(normalise_ks(ks))
        return cls(tuple(ks), np.zeros(n), np.zeros(n), 0)

    def merge(self, other: RankingSums) -> RankingSums:
        """The sums over both sets of users (which must be disjoint)."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge sums for K={other.ks} into sums for K={self.ks}")
        return RankingSums(
            self.ks, self.recall + other.recall, self.ndcg + other.ndcg, self.users + other.users
        )

    def to_tensor(self) -> torch.Tensor:
        """Flat float64 tensor [users, recall sums..., ndcg sums...] for an all-reduce (SUM)."""
        return torch.from_numpy(np.concatenate([[float(self.users)], self.recall, self.ndcg]))

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, ks: Iterable[int]) -> RankingSums:
        ks = normalise_ks(ks)
        flat = tensor.detach().to("cpu", torch.float64).numpy().ravel()
        if flat.size != 1 + 2 * len(ks):
            raise ValueError(f"tensor of {flat.size} values does not hold sums for K={ks}")
        n = len(ks)
        return cls(ks, flat[1 : 1 + n].copy(), flat[1 + n :].copy(), int(round(flat[0])))

    def metrics(self, prefix: str) -> dict[str, float]:
        """Means over users: ``{f"{prefix}.recall@{k}", f"{prefix}.ndcg@{k}"}`` (0.0 if no user)."""
        denom = max(self.users, 1)
        out = {}
        for name, sums in (("recall", self.recall), ("ndcg", self.ndcg)):
            for k, total in zip(self.ks, sums.tolist(), strict=True):
                out[f"{prefix}.{name}@{k}"] = total / denom
        return out


def sums_from_hits(hits: np.ndarray, num_relevant: np.ndarray, ks: Iterable[int]) -> RankingSums:
    """RankingSums of users given their ranked hit flags and ground-truth sizes.

    ``hits[u, r]`` says whether the item ranked r+1 for user u is relevant (columns beyond the
    ranked list count as misses); ``num_relevant[u] = |G_u| >= 1``.
    """
    ks = normalise_ks(ks)
    hits = np.asarray(hits, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    n_users, width = hits.shape
    if width < ks[-1]:
        hits = np.concatenate([hits, np.zeros((n_users, ks[-1] - width), dtype=bool)], axis=1)
    hits = hits[:, : ks[-1]]
    if n_users == 0:
        return RankingSums.empty(ks)
    if num_relevant.min() < 1:
        raise ValueError("users without ground-truth items must be skipped, not scored")
    discount = 1.0 / np.log2(np.arange(2, ks[-1] + 2, dtype=np.float64))
    hit_count = np.cumsum(hits, axis=1)
    dcg = np.cumsum(hits * discount, axis=1)
    ideal = np.cumsum(discount)
    recall = np.array([(hit_count[:, k - 1] / num_relevant).sum() for k in ks])
    ndcg = np.array([(dcg[:, k - 1] / ideal[np.minimum(num_relevant, k) - 1]).sum() for k in ks])
    return RankingSums(ks, recall, ndcg, n_users)
