"""Atomic file writes: write a temporary file next to the target, rename it into place.

A failed write (disk full, Ctrl-C, any exception) removes the temporary file and leaves the
previous file as it was; an ``OSError`` becomes an :class:`~magnet_dist.errors.OutputError`
naming the path (``disk full`` for ENOSPC), which the CLI prints as one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from magnet_dist.errors import output_error


def tmp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` becomes ``p`` on success only."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else tmp_path_for(path)
    if path.is_dir():
        raise output_error(IsADirectoryError(21, "Is a directory"), path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, path) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise output_error(err, path) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # cleanup after the real error; keep raising that one
        pass


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
