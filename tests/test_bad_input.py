"""Bad input to ``magnet-dist train``: each case is a named MagnetError (exit status 2 from the
CLI, a message naming the input, no traceback) and leaves no run folder behind; plus the
reference trainer's checkpoint atomicity and determinism.

Config keys and types, ``moe.top_k`` > E and ``moe.ep_size`` not dividing E are in
test_cli.py; a distributed checkpoint from another config or truncated is in test_faults.py
(it needs a finished distributed run). None of these tests starts Ray: the distributed
driver checks its inputs first."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from magnet_dist.cli import main as cli_main
from magnet_dist.config import load_config
from magnet_dist.errors import ConfigError, DataError, MagnetError
from magnet_dist.train import checkpoint as ckpt
from magnet_dist.train.reference import train_reference

TINY = [
    "train.epochs=1",
    "train.batch_size=512",
    "model.dim=8",
    "routing.min_steps=2",
    "routing.window=2",
    "routing.max_steps=6",
    "routing.ramp_steps=2",
]


def train_cli(capsys, data: Path, run: Path, *extra: str) -> tuple[int, str]:
    rc = cli_main(["train", "--quiet", f"data.path={data}", f"train.run_dir={run}", *TINY, *extra])
    return rc, capsys.readouterr().err


@pytest.fixture
def data_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny dataset (without its partitions) to damage."""
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out, ignore=shutil.ignore_patterns("partitions-*"))
    return out


def test_config_file_with_unknown_key_and_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: many\n  batchsize: 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "train.epochs" in str(info.value) and "train.batchsize" in str(info.value)
    rc = cli_main(["train", "--config", str(cfg), f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "train.batchsize: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["reference", "distributed"])
def test_truncated_interactions_parquet(data_copy, tmp_path, capsys, mode):
    path = data_copy / "interactions.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, err = train_cli(capsys, data_copy, tmp_path / "run", f"trainer.mode={mode}")
    assert rc == 2, err
    assert "interactions.parquet" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["reference", "distributed"])
def test_corrupted_feature_parquet_fails_its_checksum(data_copy, tmp_path, capsys, mode):
    path = next((data_copy / "item_features").glob("*.parquet"))
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    path.write_bytes(bytes(raw))  # footer intact: readable, but not the prepared data
    rc, err = train_cli(capsys, data_copy, tmp_path / "run", f"trainer.mode={mode}")
    assert rc == 2, err
    assert path.name in err and "checksum mismatch" in err
    assert not (tmp_path / "run").exists()


def test_workers_that_do_not_fit_the_partitions(tiny_dataset, tmp_path, capsys):
    rc, err = train_cli(
        capsys,
        tiny_dataset,
        tmp_path / "run",
        "trainer.mode=distributed",
        "train.workers=2",
        "graph.partitions=3",
    )
    assert rc == 2 and "train.workers=2 does not fit graph.partitions=3" in err
    assert not (tmp_path / "run").exists()


def test_partition_folder_of_another_dataset(tiny_dataset, tmp_path, capsys):
    from magnet_dist.data.prepare import prepare_dataset
    from magnet_dist.graph.partition import partition_dataset
    from magnet_dist.train.pipeline import ensure_content_edges

    other = tmp_path / "other"
    prepare_dataset("synthetic", other, users=200, items=80, interactions=3000, seed=8, quiet=True)
    ensure_content_edges(load_config(overrides=[f"data.path={other}"]), quiet=True)
    parts = tmp_path / "parts"
    partition_dataset(other, 2, method="random", out_dir=parts, verbose=False)
    before = sorted(p.name for p in parts.rglob("*"))
    rc, err = train_cli(
        capsys,
        tiny_dataset,
        tmp_path / "run",
        "trainer.mode=distributed",
        "graph.partition_method=random",
        f"graph.partition_dir={parts}",
    )
    assert rc == 2, err
    assert f"partition folder {parts} was built for other inputs (checksum" in err
    assert sorted(p.name for p in parts.rglob("*")) == before  # left as it was
    assert not (tmp_path / "run").exists()


def test_truncated_reference_checkpoint(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(capsys, tiny_dataset, run)[0] == 0
    path = run / "checkpoints" / "reference.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    rc, err = train_cli(capsys, tiny_dataset, run, "train.epochs=2")
    assert rc == 2 and f"checkpoint {path} cannot be read" in err


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = load_config()
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(path, cfg, {"step": 1, "w": torch.ones(3)})

    def dies_half_way(obj, f):  # the process "dies" after writing part of the file
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, cfg, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert (tmp_path / "ck.pt.tmp").exists()  # the torn write is the temporary file
    assert ckpt.load_checkpoint(path, cfg)["step"] == 1  # the previous checkpoint is intact


def test_resume_ignores_a_torn_temporary_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(overrides=[f"data.path={tiny_dataset}", f"train.run_dir={run}", *TINY])
    train_reference(cfg, progress=False)
    first = len(_steps(run))
    good = run / "checkpoints" / "reference.pt"
    good.with_name("reference.pt.tmp").write_bytes(good.read_bytes()[:200])  # a crash mid-write
    cfg2 = load_config(
        overrides=[f"data.path={tiny_dataset}", f"train.run_dir={run}", *TINY, "train.epochs=2"]
    )
    train_reference(cfg2, progress=False)
    assert _steps(run) == list(range(1, 2 * first + 1))
    assert not good.with_name("reference.pt.tmp").exists()  # replaced by the next save


def test_reference_same_seed_same_every_step(tiny_dataset, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = load_config(
            overrides=[f"data.path={tiny_dataset}", f"train.run_dir={tmp_path / name}", *TINY]
        )
        runs.append(train_reference(cfg, progress=False))
    rows = [_rows(tmp_path / name) for name in ("a", "b")]
    assert [(r["loss"], r["h_use"]) for r in rows[0]] == [(r["loss"], r["h_use"]) for r in rows[1]]
    for key in ("test.recall@20", "test.ndcg@20", "valid.recall@20"):
        assert runs[0][key] == runs[1][key]


def test_errors_are_magnet_errors():
    assert issubclass(DataError, MagnetError) and issubclass(ConfigError, MagnetError)


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(run)]
