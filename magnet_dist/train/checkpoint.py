"""Checkpoint files: atomic writes, verified and safe loads (``weights_only=True``), and the
config check of a resume.

Integrity: torch 2.2 does not check the CRC32 that ``torch.save``'s zip records carry, so a
flipped bit loads as a wrong weight without an error. Every single-file load checks those CRCs
first (:func:`verify_file`); a distributed checkpoint (one folder, every worker writes its own
files) also carries one manifest per worker with the size and sha256 of each file it wrote,
written last (:func:`write_manifest`, :func:`verify_checkpoint_dir`), so a damaged, truncated
or missing file is named before anything is loaded.

Config: a checkpoint stores the config it was written under. Resuming compares every key; only
the keys of :data:`RESUMABLE_CHANGES` (length, cadence, places, resources) may differ, unless
``train.resume_changed_config=true``. Loading a best model (evaluate, recommend) compares only
the sections that shape the weights (:data:`FINGERPRINT_SECTIONS`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from magnet_dist.atomic import write_text_atomic
from magnet_dist.config import Config
from magnet_dist.errors import MagnetError, OutputError, output_error
from magnet_dist.file_record import mismatch, record_files

# Sections whose values must match for a checkpoint's weights to fit the model.
FINGERPRINT_SECTIONS = ("model", "moe")

# Keys that may change when a run resumes: how long and how often, where, on what resources.
# Every other key changes the result (data, graph, model, routing, optimisation, batches,
# workers), so a resume with a different value is refused unless train.resume_changed_config.
RESUMABLE_CHANGES = frozenset(
    {
        "train.epochs",
        "train.patience",
        "train.eval_every",
        "train.run_dir",
        "train.run_name",
        "train.storage_path",
        "train.checkpoint_every",
        "train.checkpoint_every_steps",
        "train.checkpoint_every_minutes",
        "train.max_failures",
        "train.threads_per_worker",
        "train.cpus_per_worker",
        "train.use_gpu",
        "train.placement_strategy",
        "train.sparse_update",
        "train.local_sampling",
        "train.resume_changed_config",
        "trainer.ray_address",
        "trainer.host",
        "trainer.interface",
        "trainer.client_ports",
        "trainer.server_threads",
        "trainer.server_port",
        "trainer.server_timeout_s",
        "eval.user_chunk",
        "eval.item_chunk",
        "eval.two_stage_above_items",
        "eval.candidates",
    }
)

MANIFEST_FORMAT = "magnet-checkpoint-manifest-v1"


class CheckpointDamaged(MagnetError):
    """A checkpoint file is damaged, truncated or missing."""


def config_fingerprint(cfg: Config) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    fp = {s: dump[s] for s in FINGERPRINT_SECTIONS}
    fp["data.path"] = str(cfg.data.path)
    return fp


def save_checkpoint(path: Path, cfg: Config, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename: a crash mid-write leaves the previous one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(
                {
                    **payload,
                    "config_fingerprint": json.dumps(fp, sort_keys=True),
                    "config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except Exception as err:  # a failed write (disk full) leaves no .tmp behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise output_error(err, path) from None
        if isinstance(err, RuntimeError):  # torch's zip writer reports a failed write so
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise OutputError(
                f"cannot write {path} (torch.save: {first}); is the disk full? free space "
                "and re-run"
            ) from None
        raise


def load_checkpoint(path: Path, cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save_checkpoint`. ``resume``: compare
    every config key (see :func:`resume_differences`), else only the weight-shaping sections."""
    path = Path(path)
    verify_file(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a tensors-only file
        raise MagnetError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it to start over, or point train.run_dir at another run"
        ) from None
    if not isinstance(ck, dict) or "config_fingerprint" not in ck:
        raise MagnetError(f"{path} is not a magnet_dist checkpoint (no config fingerprint)")
    if resume and "config" in ck:
        check_resume_config(path, json.loads(ck["config"]), cfg)
        return ck
    theirs = json.loads(ck["config_fingerprint"])
    ours = config_fingerprint(cfg)
    if not resume:  # evaluate / recommend: only what shapes the weights
        theirs = {k: v for k, v in theirs.items() if k in FINGERPRINT_SECTIONS}
        ours = {k: v for k, v in ours.items() if k in FINGERPRINT_SECTIONS}
    diff = [f"{key}: checkpoint {a!r} vs config {b!r}" for key, a, b in _diff(theirs, ours)]
    if diff:
        raise MagnetError(
            f"checkpoint {path} was written with a different config ({'; '.join(diff[:6])}); "
            "use the same config to resume, or a new train.run_name / train.run_dir"
        )
    return ck


def resume_differences(saved: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, config value) of every key that differs and may not change on
    resume (keys absent on one side count as differences: another version's config)."""
    return [d for d in _diff(saved, cfg.model_dump(mode="json")) if d[0] not in RESUMABLE_CHANGES]


def check_resume_config(path: Path, saved: dict[str, Any], cfg: Config) -> None:
    """Refuse (or, with ``train.resume_changed_config``, announce) a resume under a config that
    differs from the checkpoint's in a key that changes the result."""
    diff = resume_differences(saved, cfg)
    if not diff:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff)
    if cfg.train.resume_changed_config:
        print(
            f"magnet_dist: warning: resuming from {path} with {len(diff)} changed config key(s) "
            f"(train.resume_changed_config=true): {listed}",
            flush=True,
        )
        return
    raise MagnetError(
        f"cannot resume from checkpoint {path}: {len(diff)} config key(s) differ from the run "
        f"that wrote it (checkpoint -> now): {listed}. Use the run's config (only "
        "train.epochs, train.patience, train.eval_every, checkpoint cadence, places and "
        "resources may change), start a new run (another train.run_dir / train.run_name), "
        "or set train.resume_changed_config=true to resume anyway"
    )


def _diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


# -- integrity --------------------------------------------------------------------------------


def _damaged(path: Path, detail: str) -> CheckpointDamaged:
    return CheckpointDamaged(
        f"checkpoint {path} cannot be read: it is damaged ({detail}); delete the "
        f"checkpoint ({path.parent}) to start over or to resume from an earlier one, or "
        "restore it from a backup"
    )


def verify_file(path: Path) -> None:
    """Check the CRC32 of every record of a ``torch.save`` zip file (``torch.load`` does not)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointDamaged(f"checkpoint file {path} is missing")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001 - a damaged header raises anything zipfile can
        bad = f"not a readable zip archive: {type(err).__name__}: {err}"
    else:
        bad = None if bad is None else f"CRC mismatch in record {bad}"
    if bad is not None:
        raise _damaged(path, bad)


def manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:03d}.json"


def write_manifest(directory: Path, files: list[Path], rank: int, world: int) -> Path:
    """Record size and sha256 of the ``files`` this worker wrote into a checkpoint folder;
    written last (atomically), so a worker that died while writing leaves no manifest."""
    directory = Path(directory)
    entries = record_files(directory, files)
    manifest = {"format": MANIFEST_FORMAT, "rank": rank, "world": world, "files": entries}
    path = directory / manifest_name(rank)
    write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def verify_checkpoint_dir(directory: Path) -> None:
    """Every file of a distributed checkpoint is present and intact: the manifests of all
    ``world`` workers exist and every file they list has its recorded size and sha256. A
    checkpoint without manifests (older versions) gets the zip CRC check of every file."""
    directory = Path(directory)
    manifests = sorted(directory.glob("manifest-rank*.json"))
    if not manifests:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and ".pt" in path.name:
                verify_file(path)
        return
    worlds, seen = set(), set()
    for m in manifests:
        try:
            data = json.loads(m.read_text())
            if data["format"] != MANIFEST_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            worlds.add(int(data["world"]))
            seen.add(int(data["rank"]))
            files = dict(data["files"])
        except Exception as err:  # noqa: BLE001 - any damage to the manifest itself
            raise _damaged(m, f"unreadable manifest: {type(err).__name__}: {err}") from None
        for rel, meta in files.items():
            path = directory / rel
            kind = mismatch(directory, rel, meta)
            if kind == "missing":
                raise CheckpointDamaged(
                    f"checkpoint {directory} is incomplete: {rel} (listed in {m.name}) is "
                    f"missing; delete {directory} to resume from an earlier checkpoint, or "
                    "start over"
                )
            if kind == "size":
                raise _damaged(path, f"{path.stat().st_size} bytes, {meta['size']} when written")
            if kind == "sha256":
                raise _damaged(path, f"sha256 differs from the one recorded in {m.name}")
    if len(worlds) > 1:
        problem = f"its manifests are of different runs (world sizes {sorted(worlds)})"
    else:
        missing = sorted(set(range(worlds.pop())) - seen)
        problem = f"no manifest of ranks {missing} (their files were never completed)"
        if not missing:
            return
    raise CheckpointDamaged(
        f"checkpoint {directory} is incomplete: {problem}; delete {directory} to resume from "
        "an earlier checkpoint, or start over"
    )
