"""Run-folder and dataset-build locks, between real processes: a second run into a run folder,
or a second build in a dataset folder, is refused with the folder and the holder's PID; the
lock ends with its holder, even a SIGKILLed one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from magnet_dist.locks import FolderLocked, dataset_lock, run_lock

HOLD = """
import sys
from magnet_dist.locks import {kind}
with {kind}(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@contextmanager
def held_by_another_process(kind: str, folder: Path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(kind=kind), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "magnet_dist.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_second_run_into_a_locked_run_folder_is_refused(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--quiet", f"data.path={tiny_dataset}", f"train.run_dir={run}"]
    tiny = ["train.epochs=1", "train.batch_size=512", "model.dim=8"]
    with held_by_another_process("run_lock", run) as holder:
        done = cli(*train, *tiny)
        assert done.returncode == 2, done.stderr
        assert f"run folder {run} is in use by PID {holder.pid} on " in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait(timeout=30)
        done = cli(*train, *tiny)
        assert done.returncode == 0, done.stderr
        assert (run / "metrics.json").is_file()


def test_distributed_driver_refuses_a_locked_run_folder_before_ray_starts(tiny_dataset, tmp_path):
    from distributed_support import tiny_distributed_config

    from magnet_dist.train.distributed import train_distributed

    run = tmp_path / "run"
    with held_by_another_process("run_lock", run) as holder:
        with pytest.raises(FolderLocked, match=f"run folder {run} is in use by PID {holder.pid}"):
            train_distributed(tiny_distributed_config(tiny_dataset, run), progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing else written


def test_second_build_in_a_locked_dataset_folder_is_refused(tiny_dataset, tmp_path):
    data = tmp_path / "tiny"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns("partitions-*"))
    edges = data / "content_edges.parquet"
    before = edges.read_bytes()
    with held_by_another_process("dataset_lock", data) as holder:
        done = cli("content", "--data", str(data), "--quiet", "graph.content_k=4")
        assert done.returncode == 2, done.stderr
        assert f"dataset folder {data} (a build" in done.stderr, done.stderr
        assert f"in use by PID {holder.pid} on " in done.stderr
        assert edges.read_bytes() == before
        from magnet_dist.graph.partition import partition_dataset

        with pytest.raises(FolderLocked, match=f"PID {holder.pid}"):
            partition_dataset(data, 2, method="random", verbose=False)
        assert not list(data.glob("partitions-*"))


def test_prepare_into_a_locked_dataset_folder_is_refused(tmp_path):
    """`magnet-dist prepare` itself (not only the pipeline's automatic prepare) takes the
    dataset folder's build lock: nothing is written while another build holds it."""
    out = tmp_path / "syn"
    prepare = ["prepare", "--source", "synthetic", "--users", "50", "--items", "40"]
    prepare += ["--interactions", "600", "--out", str(out)]
    with held_by_another_process("dataset_lock", out) as holder:
        done = cli(*prepare)
        assert done.returncode == 2, done.stderr
        assert f"in use by PID {holder.pid} on " in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not out.exists()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".syn.")]
    done = cli(*prepare)
    assert done.returncode == 0, done.stderr  # the control: free again, it builds
    assert (out / "manifest.json").is_file()


def test_locks_are_reentrant_in_one_process(tmp_path):
    with run_lock(tmp_path / "run"), run_lock(tmp_path / "run"), dataset_lock(tmp_path / "d"):
        pass
    with run_lock(tmp_path / "run"):  # released: can be taken again
        pass
