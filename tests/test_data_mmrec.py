"""``prepare --source mmrec`` on a tiny folder in MMRec's layout, and its bad inputs."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magnet_dist.data import mmrec
from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.errors import DataError, OutputError

N_USERS, N_ITEMS = 8, 10


def _rows():
    """(itemID, userID, rating, timestamp, x_label): 6 interactions per user, 4/1/1."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(N_USERS):
        for k, i in enumerate(rng.choice(N_ITEMS, 6, replace=False)):
            rows.append([int(i), u, 5.0, 1000 * u + k, [0, 0, 0, 0, 1, 2][k]])
    return rows


def make_mmrec(
    root, rows=None, image=None, text=None, header="itemID\tuserID\trating\ttimestamp\tx_label"
):
    root.mkdir(parents=True, exist_ok=True)
    rows = _rows() if rows is None else rows
    lines = [header] + ["\t".join(str(v) for v in r) for r in rows]
    (root / "baby.inter").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(2)
    image = rng.standard_normal((N_ITEMS, 8)) if image is None else image  # float64 on disk
    text = rng.standard_normal((N_ITEMS, 5)).astype(np.float32) if text is None else text
    np.save(root / "image_feat.npy", image)
    np.save(root / "text_feat.npy", text)
    return root, image, text


def _fail(tmp_path, assert_no_output, src, *patterns, **options):
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_dataset("mmrec", out, path=src, quiet=True, **options)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert_no_output(out)
    return msg


def test_mmrec_import(tmp_path):
    src, image, text = make_mmrec(tmp_path / "baby")
    ds = load_dataset(
        prepare_dataset("mmrec", tmp_path / "out", path=src, quiet=True), verify_checksum=True
    )
    rows = np.array(_rows())
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (N_USERS, N_ITEMS, len(rows))
    assert ds.modalities == {"visual": 8, "text": 5}
    assert list(ds.modalities) == ["visual", "text"]
    assert ds.manifest["splits"] == {"train": 32, "valid": 8, "test": 8}
    np.testing.assert_allclose(ds.features("visual"), image.astype(np.float32))
    np.testing.assert_array_equal(ds.features("text"), text)
    for code in range(3):
        u, i = ds.pairs(code)
        sel = rows[:, 4] == code
        want = sorted(zip(rows[sel, 1].tolist(), rows[sel, 0].tolist(), strict=True))
        assert list(zip(u.tolist(), i.tolist(), strict=True)) == want
    assert ds.has_timestamp


def test_negative_user_id(tmp_path, assert_no_output):
    rows = _rows()
    rows[3][1] = -1
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "baby.inter",
        "column 'userID'",
        "negative user id",
        "row 3",
    )


def test_item_id_out_of_range(tmp_path, assert_no_output):
    rows = _rows()
    rows[5][0] = N_ITEMS
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "baby.inter",
        "column 'itemID'",
        "out of range",
        f"the feature files have {N_ITEMS} rows",
        "row 5",
    )


def test_user_without_training_interaction(tmp_path, assert_no_output):
    rows = [r for r in _rows() if not (r[1] == 3 and r[4] == 0)]
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "baby.inter",
        "column 'x_label'",
        "user 3 has no training interaction",
    )


def test_user_id_gap(tmp_path, assert_no_output):
    rows = [r for r in _rows() if r[1] != 2]
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "baby.inter",
        "column 'userID'",
        "user 2 has no interaction at all",
    )


def test_duplicates(tmp_path, assert_no_output):
    rows = _rows()
    rows.append(list(rows[0]))
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(
        tmp_path,
        assert_no_output,
        src,
        "baby.inter",
        "duplicate (userID, itemID) pair",
        f"row {len(rows) - 1}",
        duplicates="reject",
    )
    ds = load_dataset(prepare_dataset("mmrec", tmp_path / "out", path=src, quiet=True))
    assert ds.num_interactions == len(rows) - 1
    assert ds.manifest["details"]["duplicates_merged"] == 1


def test_nan_in_npy(tmp_path, assert_no_output):
    image = np.random.default_rng(0).standard_normal((N_ITEMS, 8))
    image[4, 2] = np.nan
    src, *_ = make_mmrec(tmp_path / "baby", image=image)
    _fail(
        tmp_path, assert_no_output, src, "image_feat.npy", "column 'feature'", "non-finite", "row 4"
    )


def test_feature_row_counts_disagree(tmp_path, assert_no_output):
    src, *_ = make_mmrec(tmp_path / "baby", text=np.zeros((N_ITEMS + 1, 5), np.float32))
    _fail(tmp_path, assert_no_output, src, "disagree on the number of items", "image_feat.npy")


def test_missing_column(tmp_path, assert_no_output):
    rows = [r[:4] for r in _rows()]
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows, header="itemID\tuserID\trating\ttimestamp")
    _fail(tmp_path, assert_no_output, src, "baby.inter", "column 'x_label'", "missing column")


def test_wrong_dtype(tmp_path, assert_no_output):
    rows = _rows()
    rows[2][1] = "u2"
    src, *_ = make_mmrec(tmp_path / "baby", rows=rows)
    _fail(tmp_path, assert_no_output, src, "baby.inter", "column 'userID'", "wrong dtype")


def test_empty_inter(tmp_path, assert_no_output):
    src, *_ = make_mmrec(tmp_path / "baby")
    (src / "baby.inter").write_text("")
    _fail(tmp_path, assert_no_output, src, "baby.inter", "empty file")
    (src / "baby.inter").write_text("itemID\tuserID\tx_label\n")
    _fail(tmp_path, assert_no_output, src, "baby.inter", "empty file")


def test_export_to_mmrec_round_trips(tmp_path, tiny_dataset):
    """launch/export_mmrec.py writes MMRec's layout: imported back, every split's pairs and
    both feature matrices are the original's."""
    ds = load_dataset(tiny_dataset)
    assert list(ds.modalities) == ["visual", "text"]
    out = tmp_path / "tiny_mm"
    script = Path(__file__).resolve().parents[1] / "launch" / "export_mmrec.py"
    args = [sys.executable, str(script), "--data", str(tiny_dataset), "--out", str(out)]
    done = subprocess.run([*args, "--image", "visual", "--text", "text"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == [
        "image_feat.npy",
        "text_feat.npy",
        "tiny_mm.inter",
    ]
    back = load_dataset(prepare_dataset("mmrec", tmp_path / "back", path=out, quiet=True))
    assert (back.num_users, back.num_items) == (ds.num_users, ds.num_items)
    assert back.has_timestamp == ds.has_timestamp
    for split in ("train", "valid", "test"):
        got, want = back.pairs(split), ds.pairs(split)
        assert sorted(zip(*got, strict=True)) == sorted(zip(*want, strict=True)), split
    assert np.array_equal(back.features("visual"), ds.features("visual"))
    assert np.array_equal(back.features("text"), ds.features("text"))
    # a misspelt modality and a folder in use are refused with the reason, not a traceback
    bad = subprocess.run([*args[:-1], str(tmp_path / "x"), "--image", "meta"], capture_output=True)
    assert bad.returncode == 2 and b"no modality 'meta'" in bad.stderr
    assert b"Traceback" not in bad.stderr
    again = subprocess.run([*args, "--text", "text"], capture_output=True)
    assert again.returncode == 2 and b"not empty" in again.stderr


@pytest.mark.parametrize("fault", ["disk full", "interrupt"])
def test_export_to_mmrec_leaves_nothing_when_a_write_fails(
    tmp_path, tiny_dataset, monkeypatch, fault
):
    """A failure while the feature files are written (after the .inter file) leaves neither the
    target folder nor the hidden partial one: MMRec must never find half a dataset."""

    def failing_save(path, array):
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mmrec.np, "save", failing_save)
    out = tmp_path / "tiny_mm"
    want = KeyboardInterrupt if fault == "interrupt" else OutputError
    with pytest.raises(want) as err:
        mmrec.export_mmrec(load_dataset(tiny_dataset), out, "visual", "text")
    if fault == "disk full":
        assert "disk full" in str(err.value) and str(out) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
