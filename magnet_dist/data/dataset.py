"""Read a prepared dataset folder (see :mod:`magnet_dist.data.schema` for the format)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magnet_dist.data.schema import (
    FEATURE_COL,
    FORMAT_VERSION,
    INTERACTIONS_FILE,
    ITEM_COL,
    MANIFEST_FILE,
    SPLIT_COL,
    SPLIT_NAMES,
    TIME_COL,
    USER_COL,
    feature_type,
    features_file,
    split_code,
)
from magnet_dist.data.writer import combined_checksum
from magnet_dist.errors import DataError
from magnet_dist.file_record import file_sha256

_REQUIRED_KEYS = (
    "format_version",
    "num_users",
    "num_items",
    "num_interactions",
    "splits",
    "modalities",
    "checksum",
)
_PREPARE_HINT = "re-create it with `magnet-dist prepare --force ...`"


class Dataset:
    """A prepared dataset: counts from the manifest, interactions and features from Parquet.

    Interactions are read once (on first use) and kept as numpy arrays; feature matrices are
    read on demand and are read-only views of the Arrow buffers (copy them to modify).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.num_users = int(manifest["num_users"])
        self.num_items = int(manifest["num_items"])
        self.num_interactions = int(manifest["num_interactions"])
        self.modalities: dict[str, int] = {k: int(v) for k, v in manifest["modalities"].items()}
        self.checksum: str = manifest["checksum"]
        self.source: str | None = manifest.get("source")
        self.seed: int | None = manifest.get("seed")
        self.has_timestamp = bool(manifest.get("has_timestamp", False))
        self._features: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        mods = ", ".join(f"{k}:{v}" for k, v in self.modalities.items())
        return (
            f"Dataset({str(self.path)!r}, users={self.num_users}, items={self.num_items}, "
            f"interactions={self.num_interactions}, modalities=[{mods}])"
        )

    @property
    def split_counts(self) -> dict[str, int]:
        return {k: int(self.manifest["splits"][k]) for k in SPLIT_NAMES}

    # -- interactions ---------------------------------------------------------------------
    @cached_property
    def _interactions(self) -> dict[str, np.ndarray]:
        file = self.path / INTERACTIONS_FILE
        cols = [USER_COL, ITEM_COL, SPLIT_COL] + ([TIME_COL] if self.has_timestamp else [])
        try:
            table = pq.read_table(file, columns=cols, memory_map=True)
            out = {c: table.column(c).to_numpy() for c in cols}
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: unreadable ({err}); {_PREPARE_HINT}") from err
        del table
        users, items, split = out[USER_COL], out[ITEM_COL], out[SPLIT_COL]
        if users.size:
            lo = min(int(users.min()), int(items.min()))
            if lo < 0 or users.max() >= self.num_users or items.max() >= self.num_items:
                raise DataError(
                    f"{file}: ids out of range for {self.num_users} users / {self.num_items} "
                    f"items of {MANIFEST_FILE}; {_PREPARE_HINT}"
                )
        counts = np.bincount(split, minlength=3)
        if counts.shape[0] > 3 or any(
            int(counts[i]) != int(self.manifest["splits"][n]) for i, n in enumerate(SPLIT_NAMES)
        ):
            raise DataError(
                f"{file}: column '{SPLIT_COL}': split counts {counts.tolist()} differ from "
                f"{MANIFEST_FILE} {self.manifest['splits']}; {_PREPARE_HINT}"
            )
        return out

    def pairs(self, split: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(user ids, item ids), int64, of one split (0/"train", 1/"valid", 2/"test")."""
        code = split_code(split)
        data = self._interactions
        mask = data[SPLIT_COL] == code
        return data[USER_COL][mask], data[ITEM_COL][mask]

    def timestamps(self, split: int | str) -> np.ndarray | None:
        """int64 timestamps aligned with :meth:`pairs` (None if the source had none)."""
        if not self.has_timestamp:
            return None
        data = self._interactions
        return data[TIME_COL][data[SPLIT_COL] == split_code(split)]

    # -- features -------------------------------------------------------------------------
    def features(self, name: str) -> np.ndarray:
        """float32 ``[num_items, d]``, row i = item i (read-only, zero-copy from Arrow)."""
        if name not in self.modalities:
            raise DataError(f"{self.path}: no modality {name!r}; it has {list(self.modalities)}")
        if name not in self._features:
            self._features[name] = self._read_features(name)
        return self._features[name]

    def _read_features(self, name: str) -> np.ndarray:
        file = self.path / features_file(name)
        dim = self.modalities[name]
        try:
            table = pq.read_table(file, memory_map=True)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: unreadable ({err}); {_PREPARE_HINT}") from err
        if table.num_rows != self.num_items:
            raise DataError(
                f"{file}: {table.num_rows} rows, expected one per item ({self.num_items}); "
                f"{_PREPARE_HINT}"
            )
        item_id = table.column(ITEM_COL).to_numpy()
        if not np.array_equal(item_id, np.arange(self.num_items, dtype=np.int64)):
            raise DataError(f"{file}: column '{ITEM_COL}' is not 0..num_items-1 in order")
        col = table.column(FEATURE_COL)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        values = arr.flatten()  # honours slice offsets; no copy for a single chunk
        if values.null_count:
            raise DataError(f"{file}: column '{FEATURE_COL}' has null values; {_PREPARE_HINT}")
        return values.to_numpy(zero_copy_only=True).reshape(self.num_items, dim)

    # -- id maps --------------------------------------------------------------------------
    def id_map(self, kind: str) -> pa.Array | None:
        """Original ids of ``users`` or ``items`` (index i = id i), if the source had any."""
        rel = self.manifest.get("id_maps", {}).get(kind)
        if rel is None:
            return None
        return pq.read_table(self.path / rel).column("original").combine_chunks()

    # -- checks ---------------------------------------------------------------------------
    def verify_checksum(self) -> None:
        """Recompute the file hashes; raise ``DataError`` naming the file that changed."""
        files: dict[str, str] = self.manifest.get("files") or {}
        expected_files = [INTERACTIONS_FILE] + [features_file(m) for m in self.modalities]
        if list(files) != expected_files:
            raise DataError(
                f"{self.path / MANIFEST_FILE}: 'files' lists {list(files)}, expected "
                f"{expected_files}; {_PREPARE_HINT}"
            )
        actual: dict[str, str] = {}
        for rel, digest in files.items():
            actual[rel] = file_sha256(self.path / rel)
            if actual[rel] != digest:
                raise DataError(
                    f"{self.path / rel}: checksum mismatch (file changed since prepare); "
                    f"{_PREPARE_HINT}"
                )
        if combined_checksum(actual) != self.checksum:
            raise DataError(f"{self.path / MANIFEST_FILE}: 'checksum' does not match its files")


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: dataset folder not found; build it with `magnet-dist prepare --out {path} ...`"
        )
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (expected a dataset folder with {MANIFEST_FILE})")
    mf = path / MANIFEST_FILE
    if not mf.exists():
        raise DataError(f"{mf}: missing; {path} is not a prepared dataset ({_PREPARE_HINT})")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{mf}: unreadable ({err}); {_PREPARE_HINT}") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{mf}: not a JSON object; {_PREPARE_HINT}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{mf}: missing key(s) {missing}; {_PREPARE_HINT}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{mf}: format_version {manifest['format_version']} is not supported "
            f"(this magnet_dist reads {FORMAT_VERSION}); {_PREPARE_HINT}"
        )
    _check_manifest_types(manifest, mf)
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest_types(manifest: dict[str, Any], mf: Path) -> None:
    """Each key the readers use has its type, so a hand-edited or damaged manifest is an
    error naming the key rather than a ValueError deep in a reader."""

    def bad(key: str, want: str) -> DataError:
        got = manifest
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        return DataError(f"{mf}: key '{key}' must be {want}, got {shown}; {_PREPARE_HINT}")

    for key in ("num_users", "num_items", "num_interactions"):
        if not _is_count(manifest[key]):
            raise bad(key, "a non-negative integer")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise bad("splits", "an object {train, valid, test: counts}")
    for name in SPLIT_NAMES:
        if not _is_count(splits.get(name)):
            raise bad(f"splits.{name}", "a non-negative integer")
    modalities = manifest["modalities"]
    if not isinstance(modalities, dict) or not modalities:
        raise bad("modalities", "an object {modality: dimension}")
    for name, dim in modalities.items():
        if not _is_count(dim) or dim == 0 or not name or "/" in name:
            raise bad(f"modalities.{name}", "a positive integer (with a plain name)")
    if not isinstance(manifest["checksum"], str):
        raise bad("checksum", "a string")
    for key in ("files", "id_maps"):
        value = manifest.get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad(key, "an object of strings")
    if not isinstance(manifest.get("has_timestamp", False), bool):
        raise bad("has_timestamp", "true or false")


def load_dataset(path: str | Path, verify_checksum: bool = False) -> Dataset:
    """Open a dataset folder; cheap consistency checks (files, schemas, row counts) now.

    Ids and split counts are checked when interactions are first read; ``verify_checksum``
    re-hashes every data file against the manifest.
    """
    path = Path(path).expanduser().absolute()
    manifest = load_manifest(path)
    ds = Dataset(path, manifest)
    inter = path / INTERACTIONS_FILE
    if not inter.exists():
        raise DataError(f"{inter}: missing; {_PREPARE_HINT}")
    try:
        meta = pq.read_metadata(inter)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{inter}: unreadable ({err}); {_PREPARE_HINT}") from err
    want = {USER_COL: pa.int64(), ITEM_COL: pa.int64(), SPLIT_COL: pa.int8()}
    if ds.has_timestamp:
        want[TIME_COL] = pa.int64()
    for col, typ in want.items():
        if col not in schema.names:
            raise DataError(f"{inter}: column '{col}': missing; {_PREPARE_HINT}")
        if schema.field(col).type != typ:
            raise DataError(
                f"{inter}: column '{col}': dtype {schema.field(col).type}, expected {typ}"
            )
    if meta.num_rows != ds.num_interactions:
        raise DataError(
            f"{inter}: {meta.num_rows} rows but {MANIFEST_FILE} says num_interactions="
            f"{ds.num_interactions}; {_PREPARE_HINT}"
        )
    if sum(int(v) for v in manifest["splits"].values()) != ds.num_interactions:
        raise DataError(f"{path / MANIFEST_FILE}: split counts do not add up to num_interactions")
    for name, dim in ds.modalities.items():
        file = path / features_file(name)
        if not file.exists():
            raise DataError(f"{file}: missing (modality {name!r} of {MANIFEST_FILE})")
        try:
            fmeta = pq.read_metadata(file)
            fschema = fmeta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: unreadable ({err}); {_PREPARE_HINT}") from err
        if FEATURE_COL not in fschema.names or fschema.field(FEATURE_COL).type != feature_type(dim):
            got = fschema.field(FEATURE_COL).type if FEATURE_COL in fschema.names else "missing"
            raise DataError(
                f"{file}: column '{FEATURE_COL}': {got}, expected {feature_type(dim)} "
                f"(dim {dim} from {MANIFEST_FILE})"
            )
        if fmeta.num_rows != ds.num_items:
            raise DataError(
                f"{file}: {fmeta.num_rows} rows, expected one per item ({ds.num_items})"
            )
    if verify_checksum:
        ds.verify_checksum()
    return ds
