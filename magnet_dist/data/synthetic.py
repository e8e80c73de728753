"""Synthetic multimodal interactions with a planted structure, streamed in user chunks.

The model behind the data (all numpy, vectorised; no Python loop over users or interactions):

- *Blocks*: ``behaviour`` plus one block per content modality (default ``visual`` 128-d,
  ``text`` 384-d). In every block each item belongs to one of C clusters (C ~ sqrt(items),
  2..256), independently across blocks.
- *Users*: a mixture over the blocks (Dirichlet around 40% behaviour, the rest shared by the
  content blocks) and, per block, 3 favourite clusters (drawn by a Zipf-like cluster
  popularity) with Dirichlet weights.
- *Interactions*: each draw picks a block by the user's mixture, one of the user's clusters
  in that block, then an item of that cluster with probability proportional to the item's
  lognormal quality. Item popularity is therefore heavy-tailed (power-law-ish head).
  Duplicate (user, item) draws are redrawn, so every user gets exactly its count.
- *Users' counts*: ``min_per_user`` plus a lognormal share of the rest, capped at
  ``items // 2``; they sum to exactly ``interactions``.
- *Features*: a modality's vector is a noisy random projection of a latent vector centred on
  the item's cluster *in that modality's block*, so ``visual`` reveals the visual clusters,
  ``text`` the text clusters, and the ``behaviour`` clusters are seen only in the
  interactions. A model that uses content can beat ID-only CF; ``noisy_modality`` replaces
  one modality by pure noise (the interactions stay identical).

Deterministic for a seed: every chunk has its own seed derived from it, the chunk size is fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from magnet_dist.data.split import per_user_split
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError

DEFAULT_MODALITIES: dict[str, int] = {"visual": 128, "text": 384}
CHUNK_USERS = 65536  # part of the generator's definition: changing it changes the data
LATENT_DIM = 16
PREFS_PER_BLOCK = 3
BEHAVIOUR_SHARE = 0.4
MIXTURE_CONCENTRATION = 4.0
ITEM_QUALITY_SIGMA = 1.2
CLUSTER_ZIPF = 0.8
ITEM_NOISE = 0.5  # item latent around its cluster centre
FEATURE_NOISE = 1.0  # observation noise of the features
PREFERENCE_ROUNDS = 8  # redraws from the user's preferences, then uniform redraws
MAX_ROUNDS = 64


def num_clusters(items: int) -> int:
    return int(min(items, max(2, min(256, round(math.sqrt(items))))))


def _check(users: int, items: int, interactions: int, min_per_user: int) -> int:
    if users < 1 or items < 1 or interactions < 1:
        raise DataError("synthetic: --users, --items and --interactions must be >= 1")
    cap = items // 2
    if cap < min_per_user:
        raise DataError(
            f"synthetic: --items {items} is too small: every user needs {min_per_user} distinct "
            f"items and at most half the catalogue; use --items >= {2 * min_per_user}"
        )
    if interactions < users * min_per_user:
        raise DataError(
            f"synthetic: --interactions {interactions} < {min_per_user} per user x {users} users; "
            f"use --interactions >= {users * min_per_user} or fewer --users"
        )
    if interactions > users * cap:
        raise DataError(
            f"synthetic: --interactions {interactions} > {users} users x {cap} (half the items); "
            "use fewer interactions or more items"
        )
    return cap


def user_counts(
    users: int, interactions: int, min_per_user: int, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-user counts: >= min, <= cap, lognormal spread, summing to exactly ``interactions``."""
    weight = rng.lognormal(0.0, 1.0, users)
    extra_total = interactions - users * min_per_user
    room = np.full(users, cap - min_per_user, dtype=np.int64)
    extra = np.minimum(np.floor(weight / weight.sum() * extra_total).astype(np.int64), room)
    for _ in range(100):
        rem = extra_total - int(extra.sum())
        if rem == 0:
            break
        free = room - extra
        eligible = np.flatnonzero(free > 0)
        p = weight[eligible] / weight[eligible].sum()
        add = rng.multinomial(rem, p)
        extra[eligible] += np.minimum(add, free[eligible])
    rem = extra_total - int(extra.sum())
    if rem:  # deterministic top-up (only reached in extreme settings)
        free = room - extra
        take = np.minimum(free, np.maximum(0, rem - (np.cumsum(free) - free)))
        extra += take
    return min_per_user + extra


class _Catalogue:
    """Per-block item clusters and the cluster-wise sampling tables."""

    def __init__(self, items: int, blocks: int, rng: np.random.Generator) -> None:
        self.items = items
        self.C = num_clusters(items)
        self.quality = rng.lognormal(0.0, ITEM_QUALITY_SIGMA, items)
        self.cluster = np.stack(
            [rng.permutation(np.arange(items, dtype=np.int64) % self.C) for _ in range(blocks)]
        )
        pop = (1.0 + rng.permutation(self.C)) ** -CLUSTER_ZIPF
        self.cluster_pop_cdf = np.stack(
            [np.cumsum(p) / p.sum() for p in [pop[rng.permutation(self.C)] for _ in range(blocks)]]
        )
        self.order: list[np.ndarray] = []
        self.cdf: list[np.ndarray] = []
        for b in range(blocks):
            order = np.argsort(self.cluster[b], kind="stable")
            cl = self.cluster[b][order]
            w = self.quality[order]
            csum = np.cumsum(w)
            ends = np.cumsum(np.bincount(cl, minlength=self.C))
            starts = ends - np.bincount(cl, minlength=self.C)
            before = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0.0)
            total = csum[ends - 1] - before
            cdf = cl + (csum - before[cl]) / total[cl]
            cdf[ends - 1] = np.arange(self.C) + 1.0
            self.order.append(order)
            self.cdf.append(cdf)

    def pick(self, block: int, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Items of ``cluster`` (in ``block``) drawn by quality, from uniforms ``u``."""
        idx = np.searchsorted(self.cdf[block], cluster + u, side="right")
        return self.order[block][np.minimum(idx, self.items - 1)]


def _chunk(
    cat: _Catalogue, n: np.ndarray, blocks: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(local user, item) pairs of one user chunk, distinct, sorted by (user, item)."""
    nu = n.shape[0]
    items = cat.items
    base = np.array(
        [BEHAVIOUR_SHARE] + [(1 - BEHAVIOUR_SHARE) / (blocks - 1)] * (blocks - 1)
        if blocks > 1
        else [1.0]
    )
    mix_cdf = np.cumsum(rng.dirichlet(MIXTURE_CONCENTRATION * base, size=nu), axis=1)
    prefs = np.stack(
        [
            np.searchsorted(cat.cluster_pop_cdf[b], rng.random((nu, PREFS_PER_BLOCK)), side="right")
            for b in range(blocks)
        ],
        axis=1,
    ).clip(max=cat.C - 1)  # (nu, blocks, J)
    pref_cdf = np.cumsum(rng.dirichlet(np.ones(PREFS_PER_BLOCK), size=(nu, blocks)), axis=2)

    def draw(uid: np.ndarray) -> np.ndarray:
        r = uid.shape[0]
        blk = (rng.random(r)[:, None] > mix_cdf[uid]).sum(1).clip(max=blocks - 1)
        j = (rng.random(r)[:, None] > pref_cdf[uid, blk]).sum(1).clip(max=PREFS_PER_BLOCK - 1)
        cl = prefs[uid, blk, j]
        out = np.empty(r, dtype=np.int64)
        u = rng.random(r)
        for b in range(blocks):
            sel = blk == b
            out[sel] = cat.pick(b, cl[sel], u[sel])
        return out

    uid = np.repeat(np.arange(nu, dtype=np.int64), n)
    keys = np.unique(uid * items + draw(uid))
    for round_ in range(MAX_ROUNDS):
        deficit = n - np.bincount(keys // items, minlength=nu)
        if not deficit.any():
            break
        more = np.repeat(np.arange(nu, dtype=np.int64), deficit)
        new = draw(more) if round_ < PREFERENCE_ROUNDS else rng.integers(0, items, more.shape[0])
        keys = np.unique(np.concatenate([keys, more * items + new]))
    return keys // items, keys % items


def _features(
    cat: _Catalogue,
    block: int,
    dim: int,
    noisy: bool,
    rng: np.random.Generator,
    chunk: int = 16384,
) -> np.ndarray:
    out = np.empty((cat.items, dim), dtype=np.float32)
    if noisy:
        for s in range(0, cat.items, chunk):
            e = min(s + chunk, cat.items)
            out[s:e] = rng.standard_normal((e - s, dim), dtype=np.float32)
        return out
    centres = rng.standard_normal((cat.C, LATENT_DIM))
    proj = rng.standard_normal((LATENT_DIM, dim)) / math.sqrt(LATENT_DIM)
    for s in range(0, cat.items, chunk):
        e = min(s + chunk, cat.items)
        z = centres[cat.cluster[block, s:e]] + ITEM_NOISE * rng.standard_normal((e - s, LATENT_DIM))
        x = z @ proj + FEATURE_NOISE * rng.standard_normal((e - s, dim))
        out[s:e] = x
    return out


def generate_synthetic(
    writer: DatasetWriter,
    *,
    users: int,
    items: int,
    interactions: int,
    seed: int,
    noisy_modality: str | None = None,
    modalities: dict[str, int] | None = None,
    min_per_user: int = 5,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Generate and write; returns counts and the generator's parameters for the manifest."""
    modalities = dict(DEFAULT_MODALITIES if modalities is None else modalities)
    if noisy_modality is not None and noisy_modality not in modalities:
        raise DataError(
            f"synthetic: --noisy-modality {noisy_modality!r} is not a modality; "
            f"use one of {list(modalities)}"
        )
    cap = _check(users, items, interactions, min_per_user)
    blocks = 1 + len(modalities)
    ss_items, ss_counts, ss_feats, ss_chunks = np.random.SeedSequence(seed).spawn(4)
    cat = _Catalogue(items, blocks, np.random.default_rng(ss_items))
    counts = user_counts(users, interactions, min_per_user, cap, np.random.default_rng(ss_counts))

    n_chunks = (users + CHUNK_USERS - 1) // CHUNK_USERS
    chunk_seeds = ss_chunks.spawn(n_chunks)
    sink = writer.open_interactions(with_timestamp=False)
    popularity = np.zeros(items, dtype=np.int64)
    bar = progress(total=users, unit="user", desc="synthetic interactions") if progress else None
    for k in range(n_chunks):
        s, e = k * CHUNK_USERS, min(users, (k + 1) * CHUNK_USERS)
        rng = np.random.default_rng(chunk_seeds[k])
        u, i = _chunk(cat, counts[s:e], blocks, rng)
        split = per_user_split(u, rng)
        sink.write(u + s, i, split)
        popularity += np.bincount(i, minlength=items)
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()

    feat_seeds = ss_feats.spawn(len(modalities))
    for b, ((name, dim), fs) in enumerate(zip(modalities.items(), feat_seeds, strict=True), 1):
        mat = _features(cat, b, dim, name == noisy_modality, np.random.default_rng(fs))
        writer.write_features(name, mat)
        del mat

    ranked = np.sort(popularity)[::-1]
    top = max(1, items // 100)
    return {
        "num_users": users,
        "num_items": items,
        "duplicates_merged": 0,
        "details": {
            "generator": {
                "users": users,
                "items": items,
                "interactions": interactions,
                "min_per_user": min_per_user,
                "max_per_user": cap,
                "noisy_modality": noisy_modality,
                "blocks": ["behaviour", *modalities],
                "clusters_per_block": cat.C,
                "latent_dim": LATENT_DIM,
                "prefs_per_block": PREFS_PER_BLOCK,
                "behaviour_share": BEHAVIOUR_SHARE,
                "chunk_users": CHUNK_USERS,
            },
            "item_popularity": {
                "max": int(ranked[0]),
                "top_1pct_share": round(float(ranked[:top].sum() / max(1, ranked.sum())), 4),
                "items_without_interactions": int((popularity == 0).sum()),
            },
        },
    }
