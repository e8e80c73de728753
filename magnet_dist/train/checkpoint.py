"""Checkpoint files: atomic writes, safe loads (``weights_only=True``), config fingerprint.

A checkpoint records a fingerprint of the config fields that change tensor shapes or semantics;
loading one written under a different config is refused with the differing keys named.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from magnet_dist.config import Config
from magnet_dist.errors import MagnetError

# Sections whose values must match for a checkpoint to be resumable.
FINGERPRINT_SECTIONS = ("model", "moe")


def config_fingerprint(cfg: Config) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    fp = {s: dump[s] for s in FINGERPRINT_SECTIONS}
    fp["data.path"] = str(cfg.data.path)
    return fp


def _digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, cfg: Config, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename: a crash mid-write leaves the previous one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({**payload, "config_fingerprint": json.dumps(fp, sort_keys=True)}, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: Config) -> dict[str, Any]:
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupted file
        raise MagnetError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it to start over, or point train.run_dir at another run"
        ) from None
    if not isinstance(ck, dict) or "config_fingerprint" not in ck:
        raise MagnetError(f"{path} is not a magnet_dist checkpoint (no config fingerprint)")
    theirs = json.loads(ck["config_fingerprint"])
    ours = config_fingerprint(cfg)
    if theirs != ours:
        diff = _diff(theirs, ours)
        raise MagnetError(
            f"checkpoint {path} was written with a different config ({'; '.join(diff[:6])}); "
            "use the same config to resume, or a new train.run_name / train.run_dir"
        )
    return ck


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: checkpoint {va!r} vs config {vb!r}")
    return out
