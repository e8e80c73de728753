"""Atomic writer of a dataset folder.

Everything is written into a hidden temp folder next to ``out`` and renamed into place by
:meth:`DatasetWriter.commit`; on any error (or Ctrl-C) the temp folder is removed, so a failed
``prepare`` leaves nothing behind and an existing dataset is only replaced by a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magnet_dist.data.schema import (
    FORMAT_VERSION,
    ID_MAP_DIR,
    INTERACTIONS_FILE,
    MANIFEST_FILE,
    SPLIT_NAMES,
    TRAIN,
    features_file,
    features_schema,
    interactions_schema,
)
from magnet_dist.errors import NO_SPACE_ERRNOS, DataError, output_error
from magnet_dist.file_record import file_sha256


def combined_checksum(file_hashes: dict[str, str]) -> str:
    """sha256 over ``"<relative path> <sha256 of its bytes>\\n"`` lines, in the given order."""
    h = hashlib.sha256()
    for rel, digest in file_hashes.items():
        h.update(f"{rel} {digest}\n".encode())
    return h.hexdigest()


def features_table(matrix: np.ndarray, start: int = 0) -> pa.Table:
    """A float32 ``[n, d]`` matrix -> (item_id, feature fixed_size_list<float32>[d]) table."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = matrix.shape
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    feature = pa.FixedSizeListArray.from_arrays(values, dim)
    item_id = pa.array(np.arange(start, start + n, dtype=np.int64))
    return pa.Table.from_arrays([item_id, feature], schema=features_schema(dim))


class InteractionSink:
    """Appends interaction chunks to ``interactions.parquet`` (one row group per chunk)."""

    def __init__(self, path: Path, with_timestamp: bool) -> None:
        self.schema = interactions_schema(with_timestamp)
        self.with_timestamp = with_timestamp
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows = 0
        self.split_counts = np.zeros(3, dtype=np.int64)
        self.train_per_user = np.zeros(0, dtype=np.int64)
        self.max_user = -1
        self.max_item = -1
        self.min_id = 0

    def write(
        self,
        users: np.ndarray,
        items: np.ndarray,
        split: np.ndarray,
        timestamp: np.ndarray | None = None,
    ) -> None:
        if users.shape[0] == 0:
            return
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        split = np.asarray(split, dtype=np.int8)
        arrays = [pa.array(users), pa.array(items)]
        if self.with_timestamp:
            if timestamp is None:
                raise ValueError("this sink writes a timestamp column; pass timestamp")
            arrays.append(pa.array(np.asarray(timestamp, dtype=np.int64)))
        arrays.append(pa.array(split))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += users.shape[0]
        self.split_counts += np.bincount(split, minlength=3)[:3]
        self.max_user = max(self.max_user, int(users.max()))
        self.max_item = max(self.max_item, int(items.max()))
        self.min_id = min(self.min_id, int(users.min()), int(items.min()))
        train = np.bincount(users[split == TRAIN], minlength=self.max_user + 1)
        if train.shape[0] > self.train_per_user.shape[0]:
            train[: self.train_per_user.shape[0]] += self.train_per_user
            self.train_per_user = train
        else:
            self.train_per_user[: train.shape[0]] += train

    def close(self) -> None:
        self._writer.close()


class DatasetWriter:
    """Context manager: ``with DatasetWriter(out, ...) as w: ...; w.commit(...)``."""

    def __init__(self, out: str | Path, *, source: str, seed: int | None, force: bool = False):
        self.out = Path(out).expanduser().absolute()
        self.source = source
        self.seed = seed
        self.force = force
        self.tmp: Path | None = None
        self.modalities: dict[str, int] = {}
        self.sink: InteractionSink | None = None
        self.id_maps: list[str] = []
        check_out_dir(self.out, force)

    def __enter__(self) -> DatasetWriter:
        self.tmp = partial_folder_beside(self.out)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.sink is not None and exc_type is not None:
            try:
                self.sink.close()
            except Exception:  # cleanup after the real error; keep raising that one
                pass
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            # disk full while writing: one line naming the dataset folder (removed above)
            raise output_error(exc, self.out) from None

    # -- writing --------------------------------------------------------------------------
    def open_interactions(self, with_timestamp: bool = False) -> InteractionSink:
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        self.sink = InteractionSink(self.tmp / INTERACTIONS_FILE, with_timestamp)
        return self.sink

    def write_interactions(
        self,
        users: np.ndarray,
        items: np.ndarray,
        split: np.ndarray,
        timestamp: np.ndarray | None = None,
        chunk_rows: int = 1 << 20,
    ) -> None:
        sink = self.open_interactions(timestamp is not None)
        for s in range(0, max(users.shape[0], 1), chunk_rows):
            sl = slice(s, s + chunk_rows)
            sink.write(
                users[sl], items[sl], split[sl], None if timestamp is None else timestamp[sl]
            )

    def write_features(self, name: str, matrix: np.ndarray) -> None:
        """One modality: float32 ``[num_items, d]``, row i = item i (one row group)."""
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        if not name or "/" in name or name.startswith("."):
            raise DataError(f"invalid modality name {name!r}")
        if name in self.modalities:
            raise DataError(f"modality {name!r} given twice")
        table = features_table(matrix)
        path = self.tmp / features_file(name)
        path.parent.mkdir(exist_ok=True)
        pq.write_table(
            table,
            path,
            row_group_size=max(table.num_rows, 1),
            compression="none",
            use_dictionary=False,
        )
        self.modalities[name] = int(matrix.shape[1])

    def write_id_map(self, kind: str, original: pa.Array) -> None:
        """``id_map/<kind>.parquet``: index (0-based id) -> original id of the source."""
        assert self.tmp is not None
        (self.tmp / ID_MAP_DIR).mkdir(exist_ok=True)
        table = pa.table(
            {"index": pa.array(np.arange(len(original), dtype=np.int64)), "original": original}
        )
        pq.write_table(table, self.tmp / ID_MAP_DIR / f"{kind}.parquet")
        self.id_maps.append(kind)

    # -- commit ---------------------------------------------------------------------------
    def commit(self, num_users: int, num_items: int, details: dict[str, Any] | None = None) -> Path:
        """Check the written data against the sizes, write manifest.json, rename into place."""
        assert self.tmp is not None and self.sink is not None, "write interactions first"
        sink = self.sink
        sink.close()
        self.sink = None
        # internal consistency (sources validate their input; this guards the writers)
        if sink.rows == 0:
            raise DataError(f"{self.source}: no interactions to write")
        if sink.min_id < 0 or sink.max_user >= num_users or sink.max_item >= num_items:
            raise DataError(
                f"{self.source}: ids out of range while writing (max user {sink.max_user}, "
                f"max item {sink.max_item}, {num_users} users, {num_items} items)"
            )
        train = np.zeros(num_users, dtype=np.int64)
        train[: sink.train_per_user.shape[0]] = sink.train_per_user
        if (train == 0).any():
            user = int(np.flatnonzero(train == 0)[0])
            raise DataError(f"{self.source}: user {user} has no training interaction")
        if not self.modalities:
            raise DataError(f"{self.source}: no item feature modality")

        files = {INTERACTIONS_FILE: file_sha256(self.tmp / INTERACTIONS_FILE)}
        for name in self.modalities:
            files[features_file(name)] = file_sha256(self.tmp / features_file(name))
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "seed": self.seed,
            "num_users": int(num_users),
            "num_items": int(num_items),
            "num_interactions": int(sink.rows),
            "splits": {name: int(sink.split_counts[i]) for i, name in enumerate(SPLIT_NAMES)},
            "modalities": dict(self.modalities),
            "has_timestamp": sink.with_timestamp,
            "checksum": combined_checksum(files),
            "files": files,
            "id_maps": {k: f"{ID_MAP_DIR}/{k}.parquet" for k in self.id_maps},
            "details": details or {},
        }
        with open(self.tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        self._swap_into_place()
        return self.out

    def _swap_into_place(self) -> None:
        assert self.tmp is not None
        old: Path | None = None
        if self.out.exists() or self.out.is_symlink():
            check_out_dir(self.out, self.force)
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            old.rmdir()
            self.out.rename(old)
        try:
            self.tmp.rename(self.out)
        except OSError:
            if old is not None:
                old.rename(self.out)
            raise
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def partial_folder_beside(out: Path) -> Path:
    """A new hidden folder next to ``out`` to write a dataset into before renaming it into
    place (same file system, so the rename is atomic). Readable like any folder (mkdtemp makes
    it 0700); an OSError becomes an OutputError naming ``out``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o755)
    except OSError as err:
        raise output_error(err, out) from None
    return tmp


@contextmanager
def folder_renamed_into_place(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write a small output into (export_mmrec,
    launch/thin_train.py): renamed to ``out`` when the block ends, removed when it fails (disk
    full, Ctrl-C), so nothing partial is left; an OSError becomes an OutputError naming ``out``.
    DatasetWriter does the same with its own replace of an existing dataset (``--force``)."""
    tmp = partial_folder_beside(out)
    try:
        yield tmp
        os.replace(tmp, out)  # replaces an empty ``out`` folder too
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise output_error(err, out) from None
        raise


def check_out_dir(out: Path, force: bool) -> None:
    """``out`` must not exist, or (with ``force``) be a dataset folder or an empty folder."""
    if not (out.exists() or out.is_symlink()):
        for parent in out.parents:  # the first existing ancestor must be a folder
            if parent.exists():
                if not parent.is_dir():
                    raise DataError(
                        f"{out}: {parent} is a file, not a folder; choose another --out"
                    )
                break
        return
    if not force:
        raise DataError(f"{out}: already exists; use --force to overwrite it")
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out}: exists and is not a folder; refusing to overwrite it")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise DataError(
            f"{out}: exists and is not a dataset folder (no {MANIFEST_FILE}); "
            "refusing to overwrite it, choose another --out"
        )
