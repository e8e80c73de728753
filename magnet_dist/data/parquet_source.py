"""Import a user's own Parquet files.

Input folder::

    interactions.parquet        user_id, item_id (ints or strings, any values), [timestamp], [split]
    item_features/<modality>.parquet   item_id + one float-vector column (``feature``, or the
                                       only list column), list or fixed-size list

Ids are re-indexed to 0-based contiguous ints in sorted order of the original ids (the mapping is
kept in ``id_map/``). Without a ``split`` column each user's interactions are split 8:1:1 at
random (seeded). The items are those of the interactions: feature rows of other items are
dropped (and counted); an interacted item without a feature row in every modality is an error.
Modalities are ordered by file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from magnet_dist.data.schema import FEATURE_COL, FEATURES_DIR
from magnet_dist.data.validate import (
    clean_interactions,
    data_error,
    feature_matrix,
    first_true,
    read_parquet,
    require_columns,
    require_no_nulls,
    require_rows,
    require_split_values,
    row_repr,
)
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError

USER, ITEM, TIME, SPLIT = "user_id", "item_id", "timestamp", "split"


def _id_column(table: pa.Table, file: Path, column: str) -> pa.Array:
    """An id column as int64 or string (nulls and other dtypes rejected)."""
    require_no_nulls(table, file, column)
    col = table.column(column)
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = pc.cast(col, typ.value_type)
        typ = col.type
    if pa.types.is_integer(typ):
        if typ == pa.uint64():
            too_big = first_true(pc.greater(col, pa.scalar(np.iinfo(np.int64).max, pa.uint64())))
            if too_big is not None:
                raise data_error(
                    file,
                    f"id {table.column(column)[too_big].as_py()} is above 2**63-1 (int64)",
                    column=column,
                    row=too_big,
                    example=row_repr(table, too_big),
                    hint="store ids this large as strings",
                )
        col = pc.cast(col, pa.int64())
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        col = pc.cast(col, pa.string())
    else:
        raise data_error(
            file,
            f"wrong dtype {typ} (ids must be integers or strings)",
            column=column,
            row=0,
            example=row_repr(table, 0),
        )
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _reindex(col: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(0-based ids in sorted order of the originals, the sorted originals)."""
    uniq = pc.unique(col)
    uniq = uniq.take(pc.sort_indices(uniq))
    idx = pc.index_in(col, value_set=uniq)
    return idx.to_numpy(zero_copy_only=False).astype(np.int64), uniq


def _timestamp(table: pa.Table, file: Path) -> np.ndarray | None:
    if TIME not in table.column_names:
        return None
    require_no_nulls(table, file, TIME)
    col = table.column(TIME)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("s")) if pa.types.is_date(col.type) else col
        return pc.cast(col, pa.int64()).to_numpy().astype(np.int64)
    if not pa.types.is_integer(col.type):
        raise data_error(
            file,
            f"wrong dtype {col.type} (expected integer or timestamp)",
            column=TIME,
            row=0,
            example=row_repr(table, 0),
        )
    return col.to_numpy().astype(np.int64)


def _vector_column(table: pa.Table, file: Path) -> str:
    if FEATURE_COL in table.column_names:
        return FEATURE_COL
    lists = [
        f.name
        for f in table.schema
        if f.name != ITEM
        and (
            pa.types.is_list(f.type)
            or pa.types.is_large_list(f.type)
            or pa.types.is_fixed_size_list(f.type)
        )
    ]
    if len(lists) != 1:
        raise data_error(
            file,
            "missing column (the feature vectors)",
            column=FEATURE_COL,
            hint=f"name the vector column '{FEATURE_COL}' (the file has {table.column_names})",
        )
    return lists[0]


def import_parquet(
    src: Path, writer: DatasetWriter, *, duplicates: str, seed: int, log: Any = print
) -> dict[str, Any]:
    if not src.is_dir():
        raise DataError(f"{src}: input folder not found")
    file = src / "interactions.parquet"
    table = read_parquet(file)
    require_rows(table, file, "interactions")
    require_columns(table, file, [USER, ITEM])
    user_col = _id_column(table, file, USER)
    item_col = _id_column(table, file, ITEM)
    timestamp = _timestamp(table, file)
    split = None
    if SPLIT in table.column_names:
        require_split_values(table, file, SPLIT)
        split = table.column(SPLIT).to_numpy().astype(np.int8)

    feature_files = sorted((src / FEATURES_DIR).glob("*.parquet"))
    if not feature_files:
        raise DataError(
            f"{src / FEATURES_DIR}: no <modality>.parquet feature file; "
            "give at least one (item_id + a float vector column)"
        )

    users, user_orig = _reindex(user_col)
    items, item_orig = _reindex(item_col)
    num_users, num_items = len(user_orig), len(item_orig)
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
    )

    dropped: dict[str, int] = {}
    mats: dict[str, np.ndarray] = {}
    for ffile in feature_files:
        name = ffile.stem
        ft = read_parquet(ffile)
        require_rows(ft, ffile, "feature rows")
        require_columns(ft, ffile, [ITEM])
        fid = _id_column(ft, ffile, ITEM)
        if fid.type != item_orig.type:
            raise data_error(
                ffile,
                f"wrong dtype {ft.schema.field(ITEM).type}: the item ids of "
                f"interactions.parquet are {item_orig.type}",
                column=ITEM,
                row=0,
                example=row_repr(ft, 0),
            )
        vec_col = _vector_column(ft, ffile)
        pos = pc.fill_null(pc.index_in(fid, value_set=item_orig), -1).to_numpy().astype(np.int64)
        known = pos >= 0
        seen = np.zeros(num_items, dtype=np.int64)
        np.add.at(seen, pos[known], 1)
        if (seen > 1).any():
            item = int(np.flatnonzero(seen > 1)[0])
            rows = np.flatnonzero(pos == item)
            raise data_error(
                ffile,
                f"item {item_orig[item].as_py()!r} has {int(seen[item])} feature rows "
                f"(rows {rows[:5].tolist()})",
                column=ITEM,
                row=int(rows[1]),
                example=row_repr(ft, int(rows[1])),
                hint="give one row per item",
            )
        if (seen == 0).any():
            item = int(np.flatnonzero(seen == 0)[0])
            row = first_true(pc.equal(item_col, item_orig[item]))
            raise data_error(
                ffile,
                f"item {item_orig[item].as_py()!r} has no feature row "
                f"({int((seen == 0).sum())} interacted item(s) lack one)",
                column=ITEM,
                row=row,
                example=f"interactions.parquet row {row}: {row_repr(table, row)}",
                hint=f"add a '{name}' vector for every item of interactions.parquet",
            )
        vectors = feature_matrix(ft, ffile, vec_col)
        mat = np.empty((num_items, vectors.shape[1]), dtype=np.float32)
        mat[pos[known]] = vectors[known]
        mats[name] = mat
        dropped[name] = int((~known).sum())
        if dropped[name]:
            log(
                f"  {ffile.name}: dropped {dropped[name]} feature row(s) of items without interactions"
            )

    writer.write_interactions(users, items, split, timestamp)
    for name, mat in mats.items():
        writer.write_features(name, mat)
    writer.write_id_map("users", user_orig)
    writer.write_id_map("items", item_orig)
    return {
        "num_users": num_users,
        "num_items": num_items,
        "duplicates_merged": n_dup,
        "details": {
            "split_given": SPLIT in table.column_names,
            "feature_rows_dropped": dropped,
        },
    }
