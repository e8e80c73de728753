"""``prepare --source parquet`` and the bad-input cases (each: precise error, nothing left)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from magnet_dist import cli
from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.errors import DataError

N_USERS, N_ITEMS, PER_USER = 12, 15, 6


def _interactions(with_split: bool = False) -> dict:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        users += [f"user-{u:02d}"] * PER_USER
        items += (100 + rng.choice(N_ITEMS, PER_USER, replace=False)).tolist()
    data = {
        "user_id": users,
        "item_id": items,
        "timestamp": list(range(len(users))),
    }
    if with_split:
        data["split"] = ([0, 0, 0, 0, 1, 2] * N_USERS)[: len(users)]
    return data


def _features(dim: int, ids=None, fixed: bool = False) -> dict:
    ids = list(range(100, 100 + N_ITEMS)) if ids is None else ids
    vecs = [[float(i) + k / 10 for k in range(dim)] for i in ids]
    typ = pa.list_(pa.float32(), dim) if fixed else pa.list_(pa.float64())
    return {"item_id": pa.array(ids, pa.int64()), "feature": pa.array(vecs, typ)}


def make_input(root, inter=None, features=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "item_features").mkdir(exist_ok=True)
    inter = _interactions() if inter is None else inter
    pq.write_table(pa.table(inter), root / "interactions.parquet")
    if features is None:
        features = {"visual": _features(4), "text": _features(6, fixed=True)}
    for name, cols in features.items():
        pq.write_table(pa.table(cols), root / "item_features" / f"{name}.parquet")
    return root


def _fail(tmp_path, assert_no_output, src, *patterns, **options):
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_dataset("parquet", out, path=src, quiet=True, **options)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert_no_output(out)
    return msg


def test_parquet_import(tmp_path):
    src = make_input(tmp_path / "in")
    # an extra feature row for an item nobody interacted with: dropped
    feats = _features(4, ids=list(range(100, 100 + N_ITEMS)) + [999])
    make_input(src, features={"visual": feats, "text": _features(6, fixed=True)})
    out = prepare_dataset("parquet", tmp_path / "out", path=src, quiet=True, seed=3)
    ds = load_dataset(out, verify_checksum=True)
    inter = _interactions()
    n_items = len(set(inter["item_id"]))
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (N_USERS, n_items, 72)
    assert ds.modalities == {"text": 6, "visual": 4}  # ordered by file name
    assert ds.manifest["splits"] == {"train": 48, "valid": 12, "test": 12}  # 4/1/1 per user
    assert ds.manifest["details"]["feature_rows_dropped"] == {
        "text": N_ITEMS - n_items,
        "visual": N_ITEMS - n_items + 1,
    }
    users = ds.id_map("users").to_pylist()
    items = ds.id_map("items").to_pylist()
    assert users == sorted(set(inter["user_id"])) and items == sorted(set(inter["item_id"]))
    # row i of a feature matrix is the vector of (re-indexed) item i
    vis = ds.features("visual")
    np.testing.assert_allclose(vis[:, 0], np.array(items, dtype=np.float32))
    # pairs map back to the original pairs
    orig = set(zip(inter["user_id"], inter["item_id"], strict=True))
    got = set()
    for s in range(3):
        u, i = ds.pairs(s)
        got |= {(users[a], items[b]) for a, b in zip(u, i, strict=True)}
    assert got == orig
    # same seed, same files
    again = prepare_dataset("parquet", tmp_path / "again", path=src, quiet=True, seed=3)
    assert load_dataset(again).checksum == ds.checksum


def test_given_split_is_kept(tmp_path):
    src = make_input(tmp_path / "in", inter=_interactions(with_split=True))
    ds = load_dataset(prepare_dataset("parquet", tmp_path / "out", path=src, quiet=True))
    assert ds.manifest["splits"] == {"train": 48, "valid": 12, "test": 12}
    assert ds.manifest["details"]["split_given"] is True


def test_duplicates_merged_and_counted(tmp_path, capsys):
    inter = _interactions()
    for key in ("user_id", "item_id"):
        inter[key] = inter[key] + inter[key][:3]
    inter["timestamp"] = inter["timestamp"] + [-1, -2, -3]  # earlier copies: these are kept
    src = make_input(tmp_path / "in", inter=inter)
    out = prepare_dataset("parquet", tmp_path / "out", path=src)
    ds = load_dataset(out)
    assert ds.num_interactions == 72
    assert ds.manifest["details"]["duplicates_merged"] == 3
    assert "duplicate (user, item) rows merged: 3" in capsys.readouterr().out
    ts = np.concatenate([ds.timestamps(s) for s in range(3)])
    assert set(ts[ts < 0]) == {-1, -2, -3}


def test_duplicates_rejected(tmp_path, assert_no_output):
    inter = _interactions()
    inter["user_id"].append(inter["user_id"][5])
    inter["item_id"].append(inter["item_id"][5])
    inter["timestamp"].append(1000)
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'user_id, item_id'",
        "duplicate",
        "row 72",
        "repeats row 5",
        "1 duplicate row(s)",
        duplicates="reject",
    )


def test_nan_feature(tmp_path, assert_no_output):
    feats = _features(4)
    vecs = feats["feature"].to_pylist()
    vecs[7][2] = float("nan")
    feats["feature"] = pa.array(vecs, pa.list_(pa.float64()))
    src = make_input(tmp_path / "in", features={"visual": feats})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "visual.parquet",
        "column 'feature'",
        "non-finite",
        "row 7",
        "'item_id': 107",
    )


def test_inf_feature(tmp_path, assert_no_output):
    feats = _features(6, fixed=True)
    vecs = feats["feature"].to_pylist()
    vecs[3][0] = float("inf")
    feats["feature"] = pa.array(vecs, pa.list_(pa.float32(), 6))
    src = make_input(tmp_path / "in", features={"text": feats})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "text.parquet",
        "column 'feature'",
        "non-finite value (inf)",
        "row 3",
    )


def test_wrong_length_feature(tmp_path, assert_no_output):
    feats = _features(4)
    vecs = feats["feature"].to_pylist()
    vecs[9] = vecs[9][:3]
    feats["feature"] = pa.array(vecs, pa.list_(pa.float64()))
    src = make_input(tmp_path / "in", features={"visual": feats})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "visual.parquet",
        "column 'feature'",
        "wrong-length feature vector: 3 values, expected 4",
        "row 9",
    )


def test_item_without_feature_row(tmp_path, assert_no_output):
    inter = _interactions()
    missing = inter["item_id"][0]
    ids = [i for i in range(100, 100 + N_ITEMS) if i != missing]
    src = make_input(tmp_path / "in", features={"visual": _features(4, ids=ids)})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "visual.parquet",
        "column 'item_id'",
        f"item {missing} has no feature row",
        "interactions.parquet row 0",
    )


def test_user_without_training_interaction(tmp_path, assert_no_output):
    inter = _interactions(with_split=True)
    for r in range(12, 18):  # user-02: only valid/test
        inter["split"][r] = 1 if r % 2 else 2
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'split'",
        "user 2 has no training interaction",
        "row 12",
        "'user_id': 'user-02'",
    )


def test_split_code_out_of_range(tmp_path, assert_no_output):
    inter = _interactions(with_split=True)
    inter["split"][4] = 3
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'split'",
        "unknown split code",
        "row 4",
    )


def test_empty_interactions(tmp_path, assert_no_output):
    inter = {"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.int64())}
    src = make_input(tmp_path / "in", inter=inter)
    _fail(tmp_path, assert_no_output, src, "interactions.parquet", "empty file")


def test_empty_feature_file(tmp_path, assert_no_output):
    feats = {"item_id": pa.array([], pa.int64()), "feature": pa.array([], pa.list_(pa.float32()))}
    src = make_input(tmp_path / "in", features={"visual": feats})
    _fail(tmp_path, assert_no_output, src, "visual.parquet", "empty file")


def test_not_a_parquet_file(tmp_path, assert_no_output):
    src = make_input(tmp_path / "in")
    (src / "interactions.parquet").write_bytes(b"user_id,item_id\n1,2\n")
    _fail(tmp_path, assert_no_output, src, "interactions.parquet", "cannot read it as Parquet")


def test_wrong_dtype_ids(tmp_path, assert_no_output):
    inter = _interactions()
    inter["user_id"] = [float(i) for i in range(len(inter["item_id"]))]
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'user_id'",
        "wrong dtype double",
        "row 0",
    )


def test_wrong_dtype_feature(tmp_path, assert_no_output):
    feats = _features(4)
    feats["feature"] = pa.array([str(v) for v in feats["feature"].to_pylist()])
    src = make_input(tmp_path / "in", features={"visual": feats})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "visual.parquet",
        "column 'feature'",
        "wrong dtype string (expected a list of floats",
        "row 0",
    )
    feats["feature"] = pa.array([[1, 2, 3, 4]] * N_ITEMS, pa.list_(pa.int64()))
    make_input(src, features={"visual": feats})
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "visual.parquet",
        "column 'feature'",
        "wrong dtype list<element: int64>",
        "row 0",
    )


def test_wrong_dtype_timestamp(tmp_path, assert_no_output):
    inter = _interactions()
    inter["timestamp"] = [str(t) for t in inter["timestamp"]]
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'timestamp'",
        "wrong dtype string",
    )


def test_missing_column(tmp_path, assert_no_output):
    inter = _interactions()
    del inter["item_id"]
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'item_id'",
        "missing column",
    )


def test_missing_feature_item_column(tmp_path, assert_no_output):
    feats = _features(4)
    feats["movie"] = feats.pop("item_id")
    src = make_input(tmp_path / "in", features={"visual": feats})
    _fail(tmp_path, assert_no_output, src, "visual.parquet", "column 'item_id'", "missing column")


def test_null_id(tmp_path, assert_no_output):
    inter = _interactions()
    inter["item_id"][8] = None
    src = make_input(tmp_path / "in", inter=inter)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "interactions.parquet",
        "column 'item_id'",
        "missing (null) value",
        "row 8",
    )


def test_cli_reports_error_and_exit_code(tmp_path, capsys, assert_no_output):
    feats = _features(4)
    vecs = feats["feature"].to_pylist()
    vecs[2][1] = float("nan")
    feats["feature"] = pa.array(vecs, pa.list_(pa.float64()))
    src = make_input(tmp_path / "in", features={"visual": feats})
    out = tmp_path / "out"
    rc = cli.main(["prepare", "--source", "parquet", "--path", str(src), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "visual.parquet" in err and "row 2" in err
    assert_no_output(out)
    rc = cli.main(["prepare", "--source", "parquet", "--out", str(out), "--quiet"])
    assert rc == 2 and "needs --path" in capsys.readouterr().err
