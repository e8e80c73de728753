"""Import a dataset in MMRec's layout.

MMRec (https://github.com/enoche/MMRec) keeps one folder per dataset with
- ``<name>.inter``: tab-separated, header row, columns ``userID``, ``itemID``, ``x_label``
  (0 train, 1 valid, 2 test) and usually ``rating``, ``timestamp``; ids 0-based;
- ``image_feat.npy`` / ``text_feat.npy``: float ``[num_items, d]``, row i = item i.
They become the modalities ``visual`` and ``text`` (in that order); sizes come from the files.

:func:`export_mmrec` writes a prepared dataset back in this layout, so MMRec's own models train
and are scored on exactly the split magnet_dist uses (``launch/export_mmrec.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from magnet_dist.data.dataset import Dataset
from magnet_dist.data.validate import (
    check_finite_matrix,
    clean_interactions,
    data_error,
    require_columns,
    require_contiguous_ids,
    require_integer,
    require_no_nulls,
    require_range,
    require_rows,
    require_split_values,
)
from magnet_dist.data.writer import DatasetWriter, folder_renamed_into_place
from magnet_dist.errors import DataError

USER, ITEM, LABEL, TIME = "userID", "itemID", "x_label", "timestamp"
FEATURE_FILES = {"visual": "image_feat.npy", "text": "text_feat.npy"}
_MAX_ID = 1 << 40


def read_inter(file: Path) -> pa.Table:
    if not file.is_file():
        raise data_error(file, "is a folder, not a file", hint="the .inter file must be a file")
    if file.stat().st_size == 0:
        raise data_error(file, "empty file", hint="an MMRec .inter file has a header and rows")
    try:
        table = pacsv.read_csv(file, parse_options=pacsv.ParseOptions(delimiter="\t"))
    except (pa.ArrowInvalid, OSError) as err:
        raise data_error(file, f"cannot parse as a tab-separated file ({err})") from err
    return table


def load_npy(file: Path) -> np.ndarray:
    try:
        mat = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise data_error(file, f"cannot read it as a .npy array ({err})") from err
    if mat.ndim != 2:
        raise data_error(
            file, f"expected a 2-D [num_items, d] array, got shape {mat.shape}", column="feature"
        )
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        raise data_error(file, f"empty file (shape {mat.shape})", column="feature")
    if not np.issubdtype(mat.dtype, np.floating):
        raise data_error(
            file,
            f"wrong dtype {mat.dtype} (expected floats)",
            column="feature",
            row=0,
            example=f"{np.asarray(mat[0, :6]).tolist()}...",
        )
    return mat


def import_mmrec(
    src: Path, writer: DatasetWriter, *, duplicates: str, seed: int, log: Any = print
) -> dict[str, Any]:
    """Read, check and write an MMRec folder; returns the counts for the manifest/summary."""
    if not src.is_dir():
        raise DataError(f"{src}: MMRec folder not found")
    inters = sorted(src.glob("*.inter"))
    if len(inters) != 1:
        raise DataError(
            f"{src}: expected exactly one *.inter file, found {[p.name for p in inters] or 'none'}"
        )
    file = inters[0]
    table = read_inter(file)
    require_rows(table, file, "interactions")
    require_columns(table, file, [USER, ITEM, LABEL])
    for col in (USER, ITEM):
        require_integer(table, file, col)
        require_no_nulls(table, file, col)
    require_split_values(table, file, LABEL)

    mats: dict[str, np.ndarray] = {}
    for name, fname in FEATURE_FILES.items():
        if (src / fname).exists():
            mats[name] = load_npy(src / fname)
    if not mats:
        raise DataError(
            f"{src}: no feature file; expected {' and/or '.join(FEATURE_FILES.values())}"
        )
    rows = {FEATURE_FILES[n]: m.shape[0] for n, m in mats.items()}
    if len(set(rows.values())) != 1:
        raise DataError(f"{src}: feature files disagree on the number of items: {rows}")
    num_items = next(iter(rows.values()))

    require_range(table, file, USER, 0, _MAX_ID, what="user id")
    require_range(
        table, file, ITEM, 0, num_items, what=f"item id (the feature files have {num_items} rows)"
    )
    users = table.column(USER).to_numpy()
    items = table.column(ITEM).to_numpy()
    split = table.column(LABEL).to_numpy().astype(np.int8)
    num_users = require_contiguous_ids(users, file, USER, what="user id")
    timestamp = None
    if TIME in table.column_names and table.column(TIME).null_count == 0:
        ts = table.column(TIME)
        if pa.types.is_integer(ts.type):
            timestamp = ts.to_numpy().astype(np.int64)
        elif pa.types.is_floating(ts.type) and pc.all(pc.is_finite(ts)).as_py():
            timestamp = np.floor(ts.to_numpy()).astype(np.int64)
    users, items, split, timestamp, n_dup = clean_interactions(
        users,
        items,
        split,
        timestamp,
        num_users=num_users,
        num_items=num_items,
        duplicates=duplicates,
        seed=seed,
        file=file,
        table=table,
        split_column=LABEL,
        id_columns=(USER, ITEM),
    )
    for name, mat in mats.items():
        check_finite_matrix(mat, src / FEATURE_FILES[name])
    writer.write_interactions(users, items, split, timestamp)
    for name, mat in mats.items():
        writer.write_features(name, np.asarray(mat, dtype=np.float32))
    return {
        "num_users": num_users,
        "num_items": num_items,
        "duplicates_merged": n_dup,
        "details": {"inter_file": file.name, "feature_files": dict(FEATURE_FILES)},
    }


def export_mmrec(ds: Dataset, out: Path, image: str | None, text: str | None) -> dict[str, Any]:
    """Write dataset ``ds`` in MMRec's layout under ``out`` (MMRec's dataset name is the folder
    name): ``<name>.inter`` with every interaction and its split as ``x_label`` (0 train,
    1 valid, 2 test), and the modalities ``image`` / ``text`` as ``image_feat.npy`` /
    ``text_feat.npy`` (MMRec has those two slots; either may be None). Refuses a non-empty
    ``out``. The inverse of :func:`import_mmrec` for one or two modalities."""
    chosen = {FEATURE_FILES["visual"]: image, FEATURE_FILES["text"]: text}
    if not any(chosen.values()):
        raise DataError("export to MMRec: name at least one modality (--image and/or --text)")
    for file, name in chosen.items():
        if name is not None and name not in ds.modalities:
            raise DataError(
                f"{ds.path}: no modality {name!r} for MMRec's {file}; it has {list(ds.modalities)}"
            )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; choose a new folder")
    # MMRec does not read the timestamps; they are kept so an import gets them back
    columns = [USER, ITEM, LABEL] + ([TIME] if ds.has_timestamp else [])
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for code in (0, 1, 2):
        users, items = ds.pairs(code)
        parts[USER].append(users)
        parts[ITEM].append(items)
        parts[LABEL].append(np.full(len(users), code, dtype=np.int8))
        if ds.has_timestamp:
            parts[TIME].append(ds.timestamps(code))
    table = pa.table({c: np.concatenate(parts[c]) for c in columns})
    # a failure halfway (disk full, Ctrl-C) leaves no partial dataset for MMRec to read
    with folder_renamed_into_place(out) as tmp:
        with open(tmp / f"{out.name}.inter", "wb") as f:
            f.write(("\t".join(columns) + "\n").encode())  # unquoted, as MMRec's files
            options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
            pacsv.write_csv(table, f, options)
        for file, name in chosen.items():
            if name is not None:
                np.save(tmp / file, ds.features(name))
    return {"interactions": table.num_rows, "users": ds.num_users, "items": ds.num_items, **chosen}
