"""Size and sha256 of the files a step wrote, recorded after them and checked before they are
used again (partition folders, distributed checkpoints): a missing, truncated or changed file is
found without loading it. Each caller words the error for its own folder."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def record_files(root: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{path relative to root: {"size", "sha256"}}`` of ``files``."""
    root = Path(root)
    return {
        Path(f).relative_to(root).as_posix(): {
            "size": Path(f).stat().st_size,
            "sha256": file_sha256(Path(f)),
        }
        for f in files
    }


def mismatch(root: Path, rel: str, recorded: dict[str, Any]) -> str | None:
    """What is wrong with ``root / rel`` against its record: ``"missing"``, ``"size"`` or
    ``"sha256"``; None when it is intact (the hash is read only when the size matches)."""
    path = Path(root) / rel
    if not path.is_file():
        return "missing"
    if path.stat().st_size != recorded.get("size"):
        return "size"
    if file_sha256(path) != recorded.get("sha256"):
        return "sha256"
    return None
