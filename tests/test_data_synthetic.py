"""The synthetic generator: counts, per-user minimum, popularity, planted content signal,
determinism."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_dist.data import synthetic
from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.data.split import split_sizes
from magnet_dist.errors import DataError

SIZE = {"users": 3000, "items": 800, "interactions": 60_000}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    a = prepare_dataset("synthetic", root / "a", seed=11, quiet=True, **SIZE)
    b = prepare_dataset("synthetic", root / "b", seed=11, quiet=True, **SIZE)
    noisy = prepare_dataset(
        "synthetic", root / "noisy", seed=11, quiet=True, noisy_modality="visual", **SIZE
    )
    other = prepare_dataset("synthetic", root / "other", seed=12, quiet=True, **SIZE)
    return {
        k: load_dataset(v, verify_checksum=True)
        for k, v in {"a": a, "b": b, "noisy": noisy, "other": other}.items()
    }


def _all_pairs(ds):
    parts = [ds.pairs(s) for s in range(3)]
    users = np.concatenate([p[0] for p in parts])
    items = np.concatenate([p[1] for p in parts])
    split = np.concatenate([np.full(p[0].size, s) for s, p in enumerate(parts)])
    return users, items, split


def test_counts_and_per_user_minimum(syn):
    ds = syn["a"]
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (3000, 800, 60_000)
    assert ds.modalities == {"visual": 128, "text": 384}
    users, items, split = _all_pairs(ds)
    assert users.min() >= 0 and users.max() < 3000 and items.min() >= 0 and items.max() < 800
    per_user = np.bincount(users, minlength=3000)
    assert per_user.min() >= 5 and per_user.sum() == 60_000
    assert per_user.max() <= 400  # capped at half the catalogue
    assert per_user.std() > 5  # heavy-tailed activity, not constant
    for code in range(3):  # every user (>= 5 each) has train, valid and test
        assert np.bincount(users[split == code], minlength=3000).min() >= 1
    assert np.unique(users * 800 + items).size == users.size  # no duplicate pairs
    sp = ds.manifest["splits"]
    valid, test = split_sizes(per_user)  # MMRec's per-user arithmetic
    assert (sp["valid"], sp["test"]) == (valid.sum(), test.sum())
    assert sp["valid"] <= sp["test"] and 0.75 < sp["train"] / 60_000 < 0.85


def test_popularity_is_power_law_ish(syn):
    _, items, _ = _all_pairs(syn["a"])
    pop = np.sort(np.bincount(items, minlength=800))[::-1]
    assert pop[:8].sum() / pop.sum() > 0.05  # top 1% of items: > 5x their uniform share
    assert pop[:160].sum() / pop.sum() > 0.45  # top 20%
    rank = np.arange(1, 801)
    sel = (rank >= 5) & (rank <= 400) & (pop > 0)
    slope = np.polyfit(np.log(rank[sel]), np.log(pop[sel]), 1)[0]
    assert -1.5 < slope < -0.3
    assert syn["a"].manifest["details"]["item_popularity"]["top_1pct_share"] > 0.05


def _nn_cooccurrence_lift(ds, modality):
    """How much more often an item's nearest feature neighbour is co-consumed than a random
    item (1.0 = features say nothing about behaviour)."""
    users, items, _ = _all_pairs(ds)
    x = np.zeros((ds.num_users, ds.num_items), np.float32)
    x[users, items] = 1
    co = x.T @ x
    np.fill_diagonal(co, 0)
    f = np.array(ds.features(modality))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.arange(ds.num_items)
    rand = np.random.default_rng(0).integers(0, ds.num_items, ds.num_items)
    return co[idx, sim.argmax(1)].sum() / co[idx, rand].sum()


def test_content_carries_preference_signal(syn):
    assert _nn_cooccurrence_lift(syn["a"], "visual") > 1.5
    assert _nn_cooccurrence_lift(syn["a"], "text") > 1.5
    assert _nn_cooccurrence_lift(syn["noisy"], "visual") < 1.4


def test_noisy_modality_changes_only_that_modality(syn):
    a, noisy = syn["a"].manifest["files"], syn["noisy"].manifest["files"]
    assert a["interactions.parquet"] == noisy["interactions.parquet"]
    assert a["item_features/text.parquet"] == noisy["item_features/text.parquet"]
    assert a["item_features/visual.parquet"] != noisy["item_features/visual.parquet"]
    assert syn["noisy"].manifest["details"]["generator"]["noisy_modality"] == "visual"


def test_deterministic_for_a_seed(syn):
    a, b, other = syn["a"], syn["b"], syn["other"]
    assert a.checksum == b.checksum
    for rel in a.manifest["files"]:
        assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes()
    assert a.checksum != other.checksum


def test_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_USERS", 128)
    ds = load_dataset(
        prepare_dataset(
            "synthetic",
            tmp_path / "s",
            users=1000,
            items=300,
            interactions=15_000,
            seed=3,
            quiet=True,
        )
    )
    users, items, split = _all_pairs(ds)
    per_user = np.bincount(users, minlength=1000)
    assert per_user.sum() == 15_000 and per_user.min() >= 5 and users.max() == 999
    assert np.bincount(users[split == 0], minlength=1000).min() >= 1


def test_bad_arguments(tmp_path, assert_no_output):
    out = tmp_path / "s"
    with pytest.raises(DataError, match="--interactions 100 < 5 per user x 100 users"):
        prepare_dataset("synthetic", out, users=100, items=50, interactions=100, quiet=True)
    assert_no_output(out)
    with pytest.raises(DataError, match="--noisy-modality 'audio' is not a modality"):
        prepare_dataset(
            "synthetic",
            out,
            users=100,
            items=50,
            interactions=1000,
            noisy_modality="audio",
            quiet=True,
        )
    assert_no_output(out)
    with pytest.raises(DataError, match="--items 6 is too small"):
        prepare_dataset("synthetic", out, users=10, items=6, interactions=60, quiet=True)
    assert_no_output(out)
