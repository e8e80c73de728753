"""MMRec's split arithmetic is recorded in the manifest, and a dataset split by the older rule
is rebuilt (bundled MovieLens) or refused, never silently reused."""

import json

import numpy as np
import pytest

from magnet_dist.config import load_config
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.data.split import SPLIT_RULE, per_user_split, split_sizes, stale_split
from magnet_dist.errors import DataError
from magnet_dist.train import pipeline


def test_split_sizes_follow_mmrec_notebook():
    """n >= 10: h = int(0.2 n), valid h // 2, test the rest; n < 10: one each; n < 3: none."""
    n = np.array([2, 3, 9, 10, 15, 19, 20, 25, 99, 272])
    valid, test = split_sizes(n)
    assert valid.tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 9, 27]
    assert test.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 10, 27]


def test_split_codes_match_the_sizes_for_every_user():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 60, size=200)
    users = rng.permutation(np.repeat(np.arange(200), counts))
    split = per_user_split(users, np.random.default_rng(3))
    valid, test = split_sizes(counts)
    got = np.zeros((200, 3), dtype=int)
    np.add.at(got, (users, split), 1)
    assert (got[:, 1] == valid).all() and (got[:, 2] == test).all()


def rewrite_manifest(path, **changes):
    mf = path / "manifest.json"
    manifest = json.loads(mf.read_text())
    details = changes.pop("details", None)
    manifest.update(changes)
    if details is not None:
        manifest["details"] = details
    mf.write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def small(tmp_path):
    out = tmp_path / "syn"
    prepare_dataset("synthetic", out, users=60, items=40, interactions=900, seed=2024, quiet=True)
    return out


def test_manifest_records_the_split_rule(small):
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["details"]["split_rule"] == SPLIT_RULE
    assert stale_split(manifest) is None


def test_old_split_synthetic_dataset_is_refused(small):
    manifest = json.loads((small / "manifest.json").read_text())
    details = {k: v for k, v in manifest["details"].items() if k != "split_rule"}
    rewrite_manifest(small, details=details)
    cfg = load_config(overrides=[f"data.path={small}", "data.source=synthetic"])
    with pytest.raises(DataError, match="older rule.*--force"):
        pipeline.ensure_dataset(cfg, quiet=True)


def test_old_split_movielens_is_rebuilt(small, monkeypatch):
    """The bundled MovieLens is rebuilt from its fixed input (no network here: the build is
    recorded, not run)."""
    manifest = json.loads((small / "manifest.json").read_text())
    details = {k: v for k, v in manifest["details"].items() if k != "split_rule"}
    rewrite_manifest(small, source="movielens-100k", seed=2024, details=details)
    calls = []
    import magnet_dist.data.prepare as prepare

    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, **kw: calls.append((a, kw)))
    cfg = load_config(overrides=[f"data.path={small}", "data.source=movielens-100k"])
    pipeline.ensure_dataset(cfg, quiet=True)
    assert len(calls) == 1 and calls[0][0][0] == "movielens-100k" and calls[0][1]["force"]
    # another seed than the folder's: not the same dataset, so refused rather than replaced
    calls.clear()
    cfg = load_config(overrides=[f"data.path={small}", "data.source=movielens-100k", "data.seed=1"])
    with pytest.raises(DataError, match="older rule"):
        pipeline.ensure_dataset(cfg, quiet=True)
    assert not calls


def test_given_split_is_never_stale():
    assert stale_split({"source": "mmrec", "details": {}}) is None
    assert stale_split({"source": "parquet", "details": {"split_given": True}}) is None
    assert stale_split({"source": "parquet", "details": {"split_given": False}}) is not None


def test_missing_movielens_1m_declared_with_its_path_is_prepared(tmp_path, monkeypatch):
    """Like movielens-100k, movielens-1m needs no input of the user's: a missing folder declared
    beside it is built (recorded here, not run: no network); an undeclared one is not."""
    import magnet_dist.data.prepare as prepare

    calls = []
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, **kw: calls.append(a))
    path = tmp_path / "ml-1m"
    cfg = load_config(overrides=["data.source=movielens-1m", f"data.path={path}"])
    pipeline.ensure_dataset(cfg, quiet=True)
    assert calls == [("movielens-1m", path)]
    monkeypatch.chdir(tmp_path)  # the default data.path (data/ml-100k), the source overridden
    with pytest.raises(DataError, match="data.source=movielens-1m from an override"):
        pipeline.ensure_dataset(load_config(overrides=["data.source=movielens-1m"]), quiet=True)
    assert len(calls) == 1
