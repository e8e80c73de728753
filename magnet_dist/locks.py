"""Exclusive locks on a run folder (one run writes it at a time) and on the builds of a dataset
folder (prepare, content edges, partitions).

``fcntl.flock`` on a lock file: the lock belongs to an open file description, so it ends with
the process holding it (a crash or a SIGKILL frees it: there is never a stale lock to delete).
The file records the holder (PID, host, start time) so a refused second process can name it.
Within one process the locks are re-entrant (the CLI takes the run lock, the trainer takes it
again). The descriptor is not inherited by processes the holder starts (PEP 446).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from magnet_dist.errors import MagnetError

RUN_LOCK = "run.lock"

_held: dict[str, int] = {}  # lock file -> depth, for re-entrance within this process


class FolderLocked(MagnetError):
    """Another process holds the lock of a run folder or of a dataset folder's builds."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"PID {info['pid']} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded its PID yet)"


@contextmanager
def folder_lock(lock_file: Path, what: str, advice: str) -> Iterator[None]:
    """Hold ``lock_file`` exclusively; if another process holds it, raise :class:`FolderLocked`
    naming ``what`` (the folder), the holder, and ``advice``."""
    lock_file = Path(lock_file).absolute()
    key = str(lock_file)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderLocked(f"{what} is in use by {holder} (lock {lock_file}); {advice}") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        yield
    finally:
        _held.pop(key, None)
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        finally:
            os.close(fd)  # releases the lock


def check_run_folder_free(run_dir: Path) -> None:
    """Raise :class:`FolderLocked` now if another process holds the run folder's lock (before
    reading checkpoints it may be writing); creates nothing."""
    lock_file = (Path(run_dir) / RUN_LOCK).absolute()
    if str(lock_file) in _held or not lock_file.is_file():
        return
    with run_lock(run_dir):
        pass


def run_lock(run_dir: Path) -> AbstractContextManager[None]:
    """The lock of a run folder, held by the process that drives the run (the reference
    trainer, or the distributed driver) for the run's whole duration."""
    run_dir = Path(run_dir)
    return folder_lock(
        run_dir / RUN_LOCK,
        f"run folder {run_dir}",
        "wait until that run ends, or train into another folder (train.run_dir / train.run_name)",
    )


def dataset_lock(data_path: Path) -> AbstractContextManager[None]:
    """The lock of the builds in a dataset folder (prepare, content edges, partitions). Its
    file sits next to the folder, so it exists before the folder does."""
    data_path = Path(data_path).absolute()
    return folder_lock(
        data_path.parent / f".{data_path.name}-build.lock",
        f"dataset folder {data_path} (a build: prepare, content edges or partitions)",
        "wait until that build ends and run again (the finished build is then reused)",
    )
