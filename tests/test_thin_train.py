"""launch/thin_train.py: sparser copies of a prepared dataset for measuring models on sparse data."""

from __future__ import annotations

import errno
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.errors import OutputError

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "thin_train.py"


def thin(tiny_dataset: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--data", str(tiny_dataset), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def original_pairs(ds, split: str) -> list[tuple[int, int]]:
    """A prepared parquet import's pairs in the source's ids (through its id maps)."""
    users = pq.read_table(ds.path / "id_map/users.parquet").column("original").to_numpy()
    items = pq.read_table(ds.path / "id_map/items.parquet").column("original").to_numpy()
    u, i = ds.pairs(split)
    return sorted(zip(users[u].astype(int).tolist(), items[i].astype(int).tolist(), strict=True))


def test_cold_items_keep_at_most_k_training_rows_and_nothing_else_changes(tmp_path, tiny_dataset):
    done = thin(tiny_dataset, tmp_path / "cold", "--cold-items", "0.5", "--keep", "2")
    assert done.returncode == 0, done.stderr
    src = load_dataset(tiny_dataset)
    cold = set(pq.read_table(tmp_path / "cold/cold_items.parquet").column("item_id").to_pylist())
    assert len(cold) == src.num_items // 2
    out = load_dataset(
        prepare_dataset("parquet", tmp_path / "p", path=tmp_path / "cold", quiet=True)
    )
    before = sorted(zip(*(a.tolist() for a in src.pairs("train")), strict=True))
    after = original_pairs(out, "train")
    assert set(after) <= set(before)
    per_item = Counter(i for _, i in after)
    dropped = Counter(i for _, i in set(before) - set(after))
    assert dropped and set(dropped) <= cold  # only cold items lose rows
    # a cold item keeps K rows, more only where a row was a user's last one
    users_after = Counter(u for u, _ in after)
    for item in dropped:
        lone = sum(users_after[u] == 1 for u, i in after if i == item)
        assert per_item[item] <= 2 + lone, item
    assert set(users_after) == {u for u, _ in before}  # every user keeps a training row
    for split in ("valid", "test"):
        want = sorted(zip(*(a.tolist() for a in src.pairs(split)), strict=True))
        assert original_pairs(out, split) == want
    assert out.modalities == src.modalities


def test_train_fraction_is_kept_and_every_user_keeps_a_row(tmp_path, tiny_dataset):
    done = thin(tiny_dataset, tmp_path / "g", "--train-frac", "0.25", "--seed", "3")
    assert done.returncode == 0, done.stderr
    src = load_dataset(tiny_dataset)
    table = pq.read_table(tmp_path / "g/interactions.parquet")
    split = table.column("split").to_numpy()
    n_before = len(src.pairs("train")[0])
    n_after = int((split == 0).sum())
    assert abs(n_after / n_before - 0.25) < 0.05  # plus the rows kept for users with none
    assert np.array_equal(
        np.unique(table.column("user_id").to_numpy()[split == 0]), np.arange(src.num_users)
    )
    again = thin(tiny_dataset, tmp_path / "g2", "--train-frac", "0.25", "--seed", "3")
    assert again.returncode == 0
    assert pq.read_table(tmp_path / "g2/interactions.parquet").equals(table)  # seeded


def test_bad_arguments_are_refused_with_the_reason(tmp_path, tiny_dataset):
    for args, reason in (
        ((), "exactly one of"),
        (("--cold-items", "0.5", "--train-frac", "0.5"), "exactly one of"),
        (("--train-frac", "1.5"), "in (0, 1]"),
    ):
        done = thin(tiny_dataset, tmp_path / "x", *args)
        assert done.returncode == 2 and reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
    (tmp_path / "used").mkdir()
    done = thin(tiny_dataset, tmp_path / "used", "--train-frac", "0.5")
    assert done.returncode == 2 and "already exists" in done.stderr


@pytest.mark.parametrize("fault", ["disk full", "interrupt"])
def test_a_failed_write_leaves_nothing_behind(tmp_path, tiny_dataset, monkeypatch, fault):
    """A failure after interactions.parquet is written (copying the features) leaves neither
    the target folder nor the hidden partial one; a full disk is an error naming the folder."""
    spec = importlib.util.spec_from_file_location("thin_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def failing_copy(src, dst):
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.shutil, "copytree", failing_copy)
    out = tmp_path / "out" / "thin"
    with pytest.raises(KeyboardInterrupt if fault == "interrupt" else OutputError) as err:
        module.thin_train(tiny_dataset, out, train_frac=0.5)
    if fault == "disk full":
        assert "disk full" in str(err.value) and str(out) in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []
