"""The dataset folder format: write -> load round trip, checksums, atomic writes, split rule."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.schema import INTERACTIONS_FILE, MANIFEST_FILE, features_file
from magnet_dist.data.split import per_user_split
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError


def _write_small(out, force=False, fail_before_commit=False):
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2], dtype=np.int64)
    items = np.array([0, 1, 2, 1, 2, 3, 0, 2, 3], dtype=np.int64)
    split = np.array([0, 1, 2, 0, 0, 2, 0, 1, 0], dtype=np.int8)
    ts = np.arange(9, dtype=np.int64) * 100
    vis = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    txt = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    with DatasetWriter(out, source="test", seed=7, force=force) as w:
        w.write_interactions(users, items, split, ts)
        w.write_features("visual", vis)
        w.write_features("text", txt)
        w.write_id_map("users", pa.array(["a", "b", "c"]))
        if fail_before_commit:
            raise RuntimeError("boom")
        w.commit(3, 4, {"note": "x"})
    return users, items, split, ts, vis, txt


def test_round_trip(tmp_path):
    out = tmp_path / "ds"
    users, items, split, ts, vis, txt = _write_small(out)
    ds = load_dataset(out, verify_checksum=True)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (3, 4, 9)
    assert ds.modalities == {"visual": 3, "text": 5}
    assert list(ds.modalities) == ["visual", "text"]  # manifest order
    assert ds.manifest["splits"] == {"train": 5, "valid": 2, "test": 2}
    assert ds.manifest["source"] == "test" and ds.manifest["seed"] == 7
    assert len(ds.checksum) == 64
    for code, name in enumerate(["train", "valid", "test"]):
        u, i = ds.pairs(code)
        assert u.dtype == np.int64 and i.dtype == np.int64
        np.testing.assert_array_equal(u, users[split == code])
        np.testing.assert_array_equal(i, items[split == code])
        np.testing.assert_array_equal(ds.pairs(name)[0], u)
        np.testing.assert_array_equal(ds.timestamps(code), ts[split == code])
    v = ds.features("visual")
    assert v.dtype == np.float32 and v.shape == (4, 3)
    np.testing.assert_array_equal(v, vis)
    np.testing.assert_array_equal(ds.features("text"), txt)
    assert not v.flags.writeable  # a view of the Arrow buffer, not a copy
    assert ds.id_map("users").to_pylist() == ["a", "b", "c"]
    assert ds.id_map("items") is None
    # on-disk schema
    schema = pq.read_schema(out / features_file("visual"))
    assert schema.field("feature").type == pa.list_(pa.float32(), 3)
    assert schema.field("item_id").type == pa.int64()
    ischema = pq.read_schema(out / INTERACTIONS_FILE)
    assert [ischema.field(c).type for c in ischema.names] == [
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.int8(),
    ]
    with pytest.raises(DataError, match="no modality 'audio'"):
        ds.features("audio")


def test_checksum_detects_a_changed_file(tmp_path):
    out = tmp_path / "ds"
    _write_small(out)
    table = pq.read_table(out / features_file("text"))
    pq.write_table(table.slice(0, 4), out / features_file("text"), compression="zstd")
    load_dataset(out)  # cheap checks still pass
    with pytest.raises(DataError, match=r"text\.parquet: checksum mismatch"):
        load_dataset(out, verify_checksum=True)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing"):
        load_dataset(tmp_path / "empty")
    out = tmp_path / "ds"
    _write_small(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["num_items"] = 5
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"visual\.parquet: 4 rows, expected one per item \(5\)"):
        load_dataset(out)
    manifest["num_items"] = 4
    manifest["num_interactions"] = 10
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="9 rows but manifest.json says num_interactions=10"):
        load_dataset(out)
    del manifest["checksum"]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"missing key\(s\) \['checksum'\]"):
        load_dataset(out)


def test_atomic_write_leaves_nothing_on_error(tmp_path, assert_no_output):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        _write_small(out, fail_before_commit=True)
    assert_no_output(out)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "ds"
    _write_small(out)
    before = load_dataset(out).checksum
    with pytest.raises(DataError, match="already exists; use --force"):
        _write_small(out)
    _write_small(out, force=True)  # replaces a dataset folder
    assert load_dataset(out, verify_checksum=True).checksum == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # a failed forced rewrite keeps the old dataset
    with pytest.raises(RuntimeError):
        _write_small(out, force=True, fail_before_commit=True)
    assert load_dataset(out, verify_checksum=True).checksum == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dataset folder"):
        _write_small(other, force=True)
    assert (other / "notes.txt").exists()


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 0, 0)),
        (2, (2, 0, 0)),
        (3, (1, 1, 1)),
        (5, (3, 1, 1)),
        (9, (7, 1, 1)),
        (10, (8, 1, 1)),
        (15, (12, 1, 2)),  # MMRec: h = int(0.2 n) = 3 held out, the larger half to test
        (25, (20, 2, 3)),
        (100, (80, 10, 10)),
        (101, (81, 10, 10)),
    ],
)
def test_per_user_split_sizes(n, expected):
    users = np.repeat(np.array([3, 0]), n)  # two users, non-contiguous rows order
    split = per_user_split(users, np.random.default_rng(1))
    for u in (0, 3):
        counts = np.bincount(split[users == u], minlength=3)
        assert tuple(counts) == expected


def test_per_user_split_is_seeded_and_random():
    users = np.repeat(np.arange(50), 20)
    a = per_user_split(users, np.random.default_rng(5))
    b = per_user_split(users, np.random.default_rng(5))
    c = per_user_split(users, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # not always the same positions inside a user
    assert len({tuple(np.flatnonzero(a[users == u] == 2)) for u in range(50)}) > 10
