"""Checkpoint integrity and resume checks, on the reference trainer (no Ray): bit rot in a
checkpoint is named before anything loads it, a resume under a config that changes the result
is refused with every differing key (before anything is written or rebuilt), a fresh start
in a used run folder keeps nothing of the earlier attempt's logs. Distributed checkpoints
(dense.pt, shards) are in test_faults.py: they need a finished distributed run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_support import flip_tensor_bytes
from cli_support import TINY, train_cli

from magnet_dist.cli import main as cli_main
from magnet_dist.config import load_config
from magnet_dist.errors import MagnetError
from magnet_dist.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """One finished reference run (1 epoch); tests copy it before changing anything."""
    from magnet_dist.train.reference import train_reference

    run = tmp_path_factory.mktemp("integrity") / "run"
    train_reference(
        load_config(overrides=[f"data.path={tiny_dataset}", f"train.run_dir={run}", *TINY]),
        progress=False,
    )
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def steps(run: Path) -> list[int]:
    with (run / "metrics.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# bit rot


def test_flipped_bytes_in_a_checkpoint_are_found_before_loading(tmp_path):
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(path, load_config(), {"w": torch.randn(4096)})
    ckpt.verify_file(path)  # intact
    record = flip_tensor_bytes(path)  # torch.load accepts it (checked inside)
    with pytest.raises(ckpt.CheckpointDamaged) as info:
        ckpt.load_checkpoint(path, load_config())
    assert str(path) in str(info.value) and record in str(info.value), info.value
    assert "CRC mismatch" in str(info.value) and "delete the checkpoint" in str(info.value)


def test_damaged_reference_checkpoint_is_refused_on_resume(run, tiny_dataset, capsys):
    path = run / "checkpoints" / "reference.pt"
    flip_tensor_bytes(path)
    config_before = (run / "config.yaml").read_text()
    rc, err = train_cli(capsys, tiny_dataset, run, "train.epochs=2")
    assert rc == 2, err
    assert f"checkpoint {path} cannot be read: it is damaged (CRC mismatch" in err, err
    assert "Traceback" not in err
    assert (run / "config.yaml").read_text() == config_before
    assert steps(run) == list(range(1, len(steps(run)) + 1))  # nothing logged


@pytest.mark.parametrize("command", ["evaluate", "recommend"])
def test_damaged_best_checkpoint_is_refused(run, tmp_path, capsys, command):
    path = run / "checkpoints" / "best.pt"
    flip_tensor_bytes(path)
    extra = ["--k", "5", "--out", str(tmp_path / "recs.parquet")] if command == "recommend" else []
    rc = cli_main([command, "--run", str(run), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"checkpoint {path} cannot be read: it is damaged (CRC mismatch" in err, err
    assert not (tmp_path / "recs.parquet").exists()


def test_manifest_names_a_damaged_missing_or_unlisted_file(tmp_path):
    """A distributed checkpoint folder: two workers' files, each with its manifest."""
    folder = tmp_path / "ck"
    folder.mkdir()
    files = []
    for rank in range(2):
        path = folder / f"embeddings.part{rank}-0.pt"
        torch.save({"user": torch.randn(2048)}, path)
        files.append(path)
        ckpt.write_manifest(folder, [path], rank, 2)
    ckpt.verify_checkpoint_dir(folder)

    flip_tensor_bytes(files[1])
    with pytest.raises(ckpt.CheckpointDamaged, match="part1-0.pt cannot be read: it is damaged"):
        ckpt.verify_checkpoint_dir(folder)
    files[1].unlink()
    with pytest.raises(
        ckpt.CheckpointDamaged, match=r"incomplete: embeddings.part1-0.pt .*missing"
    ):
        ckpt.verify_checkpoint_dir(folder)
    (folder / ckpt.manifest_name(1)).unlink()  # rank 1 died before it wrote its manifest
    with pytest.raises(ckpt.CheckpointDamaged, match=r"no manifest of ranks \[1\]"):
        ckpt.verify_checkpoint_dir(folder)


def test_damaged_expert_shard_is_named_when_loaded_alone(tmp_path):
    """The expert-shard reader checks the CRCs itself (it is also used without a manifest)."""
    from magnet_dist.model.magnet import build_dense_moe
    from magnet_dist.parallel.checkpoint import load_expert_shard, save_expert_shard

    moe = build_dense_moe(load_config(), ["behaviour", "visual", "text"])
    path = save_expert_shard(moe, tmp_path)
    load_expert_shard(moe, tmp_path)  # intact
    flip_tensor_bytes(path)
    with pytest.raises(ckpt.CheckpointDamaged, match=f"{path.name} cannot be read: it is damaged"):
        load_expert_shard(moe, tmp_path)


# ----------------------------------------------------------------------------------------------
# resume under a changed config


def test_resume_with_a_changed_result_key_is_refused_naming_every_key(run, tiny_dataset, capsys):
    config_before = (run / "config.yaml").read_text()
    rc, err = train_cli(
        capsys,
        tiny_dataset,
        run,
        "train.epochs=2",  # may change
        "routing.tau=0.8",
        "train.lr=0.01",
        "graph.content_k=5",
    )
    assert rc == 2, err
    assert "3 config key(s) differ" in err, err
    for change in (
        "routing.tau: 0.9 -> 0.8",
        "train.lr: 0.001 -> 0.01",
        "graph.content_k: 10 -> 5",
    ):
        assert change in err, (change, err)
    assert "train.resume_changed_config=true" in err
    assert (run / "config.yaml").read_text() == config_before  # nothing rewritten


def test_refused_resume_does_not_rebuild_the_datasets_content_edges(run, tiny_dataset, capsys):
    edges = tiny_dataset / "content_edges.parquet"
    before = edges.stat().st_mtime_ns
    rc, err = train_cli(capsys, tiny_dataset, run, "graph.content_k=5")
    assert rc == 2 and "graph.content_k: 10 -> 5" in err, err
    assert edges.stat().st_mtime_ns == before


def test_resume_with_allowed_changes_continues(run, tiny_dataset, capsys):
    first = len(steps(run))
    rc, err = train_cli(
        capsys, tiny_dataset, run, "train.epochs=2", "train.patience=3", "eval.user_chunk=64"
    )
    assert rc == 0, err
    assert steps(run) == list(range(1, 2 * first + 1))


def test_resume_changed_config_override(run, tiny_dataset, capsys):
    rc = cli_main(
        [
            "train",
            "--quiet",
            f"data.path={tiny_dataset}",
            f"train.run_dir={run}",
            *TINY,
            "train.epochs=2",
            "train.lr=0.01",
            "train.resume_changed_config=true",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "resuming from" in out and "train.lr: 0.001 -> 0.01" in out, out


def test_resume_config_check_unit():
    saved = load_config().model_dump(mode="json")
    cfg = load_config(overrides=["train.epochs=99", "trainer.server_port=4000", "moe.top_k=1"])
    assert ckpt.resume_differences(saved, cfg) == [("moe.top_k", 2, 1)]
    with pytest.raises(MagnetError, match=r"moe.top_k: 2 -> 1"):
        ckpt.check_resume_config(Path("x.pt"), saved, cfg)


# ----------------------------------------------------------------------------------------------
# a fresh start in a used run folder


def test_fresh_start_in_a_used_run_folder_logs_each_step_once(run, tiny_dataset, capsys):
    """No checkpoint to resume (deleted, or a restart before the first one): the run starts at
    step 0 and keeps nothing the earlier attempt logged."""
    first = steps(run)
    evaluations = (run / "evaluations.csv").read_text()
    (run / "checkpoints" / "reference.pt").unlink()
    rc, err = train_cli(capsys, tiny_dataset, run)
    assert rc == 0, err
    assert steps(run) == first
    assert (run / "evaluations.csv").read_text().count("\n") == evaluations.count("\n")


def test_tensorboard_events_of_repeated_steps_are_replaced(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from magnet_dist.train.run_folder import StepLog

    def attempt(first: int, last: int, resume_at: int | None) -> None:
        log = StepLog(tmp_path)
        if resume_at is not None:
            log.resume_at(resume_at)
        for step in range(first, last + 1):
            log.log({"step": step, "loss": float(100 * attempt_no[0] + step)})
        log.close()
        attempt_no[0] += 1

    attempt_no = [0]
    attempt(1, 6, None)  # dies after step 6
    attempt(1, 4, 0)  # restarted from scratch, dies after step 4
    attempt(3, 8, 2)  # resumed from a step-2 checkpoint
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 9))
    assert [e.value for e in events] == [101, 102, 203, 204, 205, 206, 207, 208]
    assert steps(tmp_path) == list(range(1, 9))
    rows = json.dumps(list(csv.DictReader((tmp_path / "metrics.csv").open())))
    assert '"loss": "101.0"' in rows and '"loss": "208.0"' in rows
