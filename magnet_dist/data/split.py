"""MMRec-style per-user random split (8:1:1), vectorised.

Each user's interactions are shuffled (seeded) and cut: ``max(1, floor(n * valid_ratio))`` go to
valid and ``max(1, floor(n * test_ratio))`` to test, the rest to train. So a user with fewer than
10 interactions gives exactly one to valid and one to test. Users with fewer than 3 interactions
cannot give one to each split and keep all of them in train.
"""

from __future__ import annotations

import numpy as np

from magnet_dist.data.schema import TEST, TRAIN, VALID

MIN_INTERACTIONS_TO_SPLIT = 3


def per_user_split(
    users: np.ndarray,
    rng: np.random.Generator,
    valid_ratio: float = 0.1,
    test_ratio: float = 0.1,
) -> np.ndarray:
    """Split codes (int8, aligned with ``users``) for a per-user random split.

    ``users`` holds non-negative int ids (any order). No Python loop over users or rows.
    """
    users = np.asarray(users, dtype=np.int64)
    n_rows = users.shape[0]
    split = np.full(n_rows, TRAIN, dtype=np.int8)
    if n_rows == 0:
        return split
    counts = np.bincount(users)
    # group rows by user, random order inside each user
    order = np.lexsort((rng.random(n_rows), users))
    sorted_users = users[order]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n_rows, dtype=np.int64) - starts[sorted_users]
    n = counts[sorted_users]
    can_split = n >= MIN_INTERACTIONS_TO_SPLIT
    n_test = np.where(can_split, np.maximum(1, np.floor(n * test_ratio).astype(np.int64)), 0)
    n_valid = np.where(can_split, np.maximum(1, np.floor(n * valid_ratio).astype(np.int64)), 0)
    codes = np.where(rank < n_test, TEST, np.where(rank < n_test + n_valid, VALID, TRAIN))
    split[order] = codes.astype(np.int8)
    return split
