"""Training minibatches: shuffled positive pairs + uniformly sampled negatives (BPR).

Both trainers use ``NegativeSampler`` and ``batch_rng``, but not the same batches: the reference
trainer shuffles all training pairs with ``epoch_batches`` and seeds negatives by (epoch, batch);
each distributed worker shuffles its own partition's edges (``step.plan_batches``) and seeds
negatives by (epoch, batch * world + rank). Same distribution, different draws. Negatives are
uniform over items, resampled (a few rounds) where they hit one of the user's training items, as
MMRec does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class NegativeSampler:
    def __init__(self, train_users: np.ndarray, train_items: np.ndarray, num_items: int) -> None:
        self.num_items = num_items
        self.positive_keys = np.unique(train_users.astype(np.int64) * num_items + train_items)

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.num_items + items
        pos = np.searchsorted(self.positive_keys, keys)
        pos = np.minimum(pos, len(self.positive_keys) - 1)
        return self.positive_keys[pos] == keys

    def sample(self, users: np.ndarray, n_neg: int, rng: np.random.Generator) -> np.ndarray:
        """``[len(users), n_neg]`` item ids, avoiding training positives where possible."""
        users = np.repeat(users, n_neg)
        neg = rng.integers(0, self.num_items, size=users.shape[0])
        for _ in range(10):
            hit = self.is_positive(users, neg)
            if not hit.any():
                break
            neg[hit] = rng.integers(0, self.num_items, size=int(hit.sum()))
        return neg.reshape(-1, n_neg)


def epoch_batches(
    num_pairs: int, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(batch_index, pair indices)`` in a per-epoch shuffled order; the last batch may be short."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_pairs)
    for b, start in enumerate(range(0, num_pairs, batch_size)):
        yield b, order[start : start + batch_size]


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """Negatives of one batch depend only on (seed, epoch, batch): resumable and reproducible."""
    return np.random.default_rng([seed, epoch, batch, 7])
