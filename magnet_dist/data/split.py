"""MMRec's per-user random split (8:1:1), vectorised.

Each user's interactions are shuffled (seeded) and cut as MMRec's ``preprocessing/
1splitting.ipynb`` does: a user with ``n >= 10`` interactions holds out ``h = floor(0.2 n)``,
``floor(h / 2)`` to valid and the rest (the larger half) to test; a user with fewer than 10
gives exactly one to valid and one to test. Users with fewer than 3 interactions cannot give
one to each split and keep all of them in train. ``SPLIT_RULE`` names this rule in the
manifest, so a folder split by an older rule is recognised as stale.
"""

from __future__ import annotations

import numpy as np

from magnet_dist.data.schema import TEST, TRAIN, VALID

MIN_INTERACTIONS_TO_SPLIT = 3
SMALL_USER = 10  # below this: one valid, one test
HOLDOUT_RATIO = 0.2  # valid + test share of a user with >= SMALL_USER interactions
# "mmrec-8:1:1" (no version) split every user valid = test = max(1, floor(0.1 n))
SPLIT_RULE = "mmrec-8:1:1/v2"


def split_sizes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n_valid, n_test)`` per user for interaction counts ``n`` (int arrays)."""
    n = np.asarray(n, dtype=np.int64)
    holdout = np.floor(n * HOLDOUT_RATIO).astype(np.int64)  # int(0.2 * n), as MMRec
    n_valid = np.where(n < SMALL_USER, 1, holdout // 2)
    n_test = np.where(n < SMALL_USER, 1, holdout - holdout // 2)
    too_few = n < MIN_INTERACTIONS_TO_SPLIT
    return np.where(too_few, 0, n_valid), np.where(too_few, 0, n_test)


def per_user_split(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    n_valid, n_test = split_sizes(counts)
    n_test, n_valid = n_test[sorted_users], n_valid[sorted_users]
    codes = np.where(rank < n_test, TEST, np.where(rank < n_test + n_valid, VALID, TRAIN))
    split[order] = codes.astype(np.int8)
    return split


def generated_split_rule(source: str, details: dict) -> str:
    """What ``manifest.details.split_rule`` records: ``SPLIT_RULE`` where prepare made the
    split, ``"given"`` where the input carried it (MMRec's x_label, a parquet split column)."""
    if source == "mmrec" or (source == "parquet" and details.get("split_given")):
        return "given"
    return SPLIT_RULE


def stale_split(manifest: dict) -> str | None:
    """Why a prepared dataset's split is not this version's rule, or None if it is (or the
    input gave the split). Folders prepared before the rule was recorded count as stale."""
    rule = manifest.get("details", {}).get("split_rule")
    source = manifest.get("source", "?")
    if rule in (SPLIT_RULE, "given"):
        return None
    if rule is None and source == "mmrec":
        return None
    if rule is None and source == "parquet" and manifest.get("details", {}).get("split_given"):
        return None
    return (
        f"its {source} split was made by an older rule ({rule or 'valid = test = floor(0.1 n)'}), "
        f"not MMRec's ({SPLIT_RULE}: int(0.2 n) held out per user, the larger half to test)"
    )
