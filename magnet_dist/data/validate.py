"""Vectorised input checks (pyarrow compute / numpy) that fail with a precise ``DataError``.

Every error names the file, the column and an example row, says what is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from magnet_dist.data.schema import SPLIT_NAMES, TRAIN
from magnet_dist.errors import DataError

DUPLICATE_POLICIES = ("merge", "reject")


def data_error(
    file: str | Path,
    problem: str,
    *,
    column: str | None = None,
    row: int | None = None,
    example: Any = None,
    hint: str | None = None,
) -> DataError:
    """Build the one error format: ``FILE: column 'C': PROBLEM (e.g. row R: {...}); HINT``."""
    msg = str(file)
    if column is not None:
        msg += f": column '{column}'"
    msg += f": {problem}"
    if row is not None:
        msg += f" (e.g. row {row}" + (f": {example}" if example is not None else "") + ")"
    if hint:
        msg += f"; {hint}"
    return DataError(msg)


def _fmt(value: Any, max_items: int = 6) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        head = ", ".join(_fmt(v) for v in value[:max_items])
        more = f", ... ({len(value)} values)" if len(value) > max_items else ""
        return f"[{head}{more}]"
    return repr(value)


def row_repr(table: pa.Table, row: int) -> str:
    """One row of a table as ``{col: value}`` with long vectors shortened."""
    values = table.slice(row, 1).to_pylist()[0]
    return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in values.items()) + "}"


def first_true(mask: pa.Array | pa.ChunkedArray | np.ndarray) -> int | None:
    """Index of the first true value of a boolean mask (nulls count as false), or None."""
    if isinstance(mask, np.ndarray):
        hits = np.flatnonzero(mask)
        return int(hits[0]) if hits.size else None
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file; unreadable or missing files become a ``DataError``."""
    if not file.exists():
        raise data_error(file, "file not found")
    try:
        return pq.read_table(file, columns=columns, memory_map=True)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise data_error(file, f"cannot read it as Parquet ({err})") from err


def require_columns(table: pa.Table, file: Path, columns: list[str]) -> None:
    for col in columns:
        if col not in table.column_names:
            raise data_error(
                file,
                "missing column",
                column=col,
                hint=f"the file has columns {table.column_names}; add '{col}'",
            )


def require_rows(table: pa.Table, file: Path, what: str = "rows") -> None:
    if table.num_rows == 0:
        raise data_error(file, f"empty file (no {what})", hint="give a file with at least one row")


def require_no_nulls(table: pa.Table, file: Path, column: str) -> None:
    col = table.column(column)
    if col.null_count:
        row = first_true(pc.is_null(col))
        raise data_error(
            file, "missing (null) value", column=column, row=row, example=row_repr(table, row)
        )


def require_integer(table: pa.Table, file: Path, column: str, what: str = "integer ids") -> None:
    typ = table.schema.field(column).type
    if not pa.types.is_integer(typ):
        raise data_error(
            file,
            f"wrong dtype {typ} (expected {what})",
            column=column,
            row=0,
            example=row_repr(table, 0),
        )


def require_range(
    table: pa.Table, file: Path, column: str, low: int, high: int, what: str = "id"
) -> None:
    """Every value of ``column`` in ``[low, high)``."""
    col = table.column(column)
    below = first_true(pc.less(col, low))
    if below is not None:
        raise data_error(
            file,
            f"negative {what}" if low == 0 else f"{what} below {low}",
            column=column,
            row=below,
            example=row_repr(table, below),
            hint=f"{what}s must be in [{low}, {high})",
        )
    above = first_true(pc.greater_equal(col, high))
    if above is not None:
        raise data_error(
            file,
            f"{what} out of range",
            column=column,
            row=above,
            example=row_repr(table, above),
            hint=f"{what}s must be in [{low}, {high})",
        )


def require_contiguous_ids(ids: np.ndarray, file: Path, column: str, what: str = "id") -> int:
    """``max + 1`` when the (non-negative) ids are exactly 0..max, checked before anything is
    sized by them: one id near 2**40 would otherwise allocate arrays of 2**40 entries."""
    if ids.size == 0:
        return 0
    present = np.unique(ids)
    top = int(present[-1])
    if present.size != top + 1:
        first_missing = int(np.flatnonzero(present != np.arange(present.size))[0])
        row = int(np.flatnonzero(ids == top)[0])
        raise data_error(
            file,
            f"{what.split()[0]} {first_missing} has no interaction at all: {what}s are not "
            f"contiguous (the largest is {top}, {present.size:,} distinct ones appear)",
            column=column,
            row=row,
            example=f"{column}={top}",
            hint=f"{what}s must be 0..N-1 (MMRec's layout); re-index them, or use --source "
            "parquet, which re-indexes any ids",
        )
    return top + 1


def require_split_values(table: pa.Table, file: Path, column: str = "split") -> None:
    require_integer(table, file, column, what="integer split codes 0/1/2")
    require_no_nulls(table, file, column)
    col = table.column(column)
    bad = first_true(pc.invert(pc.is_in(col, value_set=pa.array([0, 1, 2], col.type))))
    if bad is not None:
        raise data_error(
            file,
            "unknown split code",
            column=column,
            row=bad,
            example=row_repr(table, bad),
            hint="use 0 (train), 1 (valid), 2 (test)",
        )


def feature_matrix(table: pa.Table, file: Path, column: str, dim: int | None = None) -> np.ndarray:
    """A list / fixed-size-list float column as a float32 ``[rows, d]`` matrix, checked.

    Rejects: a non-list or non-float column, null vectors or values, vectors of another length
    than ``dim`` (or than the most common length when ``dim`` is None), NaN / inf.
    """
    col = table.column(column)
    typ = col.type
    if not (
        pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
    ) or not pa.types.is_floating(typ.value_type):
        raise data_error(
            file,
            f"wrong dtype {typ} (expected a list of floats per item)",
            column=column,
            row=0,
            example=row_repr(table, 0) if table.num_rows else None,
        )
    require_no_nulls(table, file, column)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    lengths = pc.list_value_length(arr)
    if dim is None:
        counts = pc.value_counts(lengths)
        dims = counts.field("values").to_numpy()
        dim = int(dims[int(np.argmax(counts.field("counts").to_numpy()))])
    wrong = first_true(pc.not_equal(lengths, dim))
    if wrong is not None:
        raise data_error(
            file,
            f"wrong-length feature vector: {lengths[wrong].as_py()} values, expected {dim}",
            column=column,
            row=wrong,
            example=row_repr(table, wrong),
            hint="every item needs a vector of the same length",
        )
    if dim == 0:
        raise data_error(file, "feature vectors are empty (0 values)", column=column, row=0)
    values = arr.flatten()
    if values.null_count:
        row = first_true(pc.is_null(values)) // dim
        raise data_error(
            file,
            "null value inside a feature vector",
            column=column,
            row=row,
            example=row_repr(table, row),
        )
    original = values
    if values.type != pa.float32():
        values = pc.cast(values, pa.float32(), safe=False)
    bad = first_true(pc.invert(pc.is_finite(values)))  # after the cast: overflow is inf too
    if bad is not None:
        row = bad // dim
        value = original[bad].as_py()
        problem = (
            f"value {value:.6g} does not fit float32"
            if value is not None and np.isfinite(value)
            else f"non-finite value ({value})"
        )
        raise data_error(
            file,
            f"{problem} in a feature vector",
            column=column,
            row=row,
            example=row_repr(table, row),
            hint="replace NaN/inf (e.g. by recomputing the features)",
        )
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def check_finite_matrix(matrix: np.ndarray, file: Path, chunk_rows: int = 65536) -> None:
    """NaN/inf check of a (possibly memory-mapped) 2-D matrix, chunk by chunk, as float32 (the
    stored type): a finite float64 beyond float32's range would be stored as inf."""
    for start in range(0, matrix.shape[0], chunk_rows):
        block = np.asarray(matrix[start : start + chunk_rows])
        with np.errstate(over="ignore"):
            finite = np.isfinite(block.astype(np.float32, copy=False))
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            value = block[r, c]
            problem = (
                f"value {value:.6g} does not fit float32 (|x| <= {np.finfo(np.float32).max:.4g})"
                if np.isfinite(value)
                else f"non-finite value ({value})"
            )
            raise data_error(
                file,
                f"{problem} in a feature vector",
                column="feature",
                row=int(start + r),
                example=f"item {int(start + r)}, dimension {int(c)}",
                hint="replace NaN/inf and out-of-range values (e.g. by recomputing the features)",
            )


def dedupe_pairs(
    users: np.ndarray,
    items: np.ndarray,
    num_items: int,
    policy: str,
    file: Path,
    table: pa.Table | None = None,
    tiebreak: np.ndarray | None = None,
    columns: tuple[str, str] = ("user_id", "item_id"),
) -> tuple[np.ndarray, int]:
    """Row indices to keep, sorted by (user, item), and the number of duplicate rows dropped.

    ``merge`` keeps the first row of each (user, item) pair (the earliest by ``tiebreak``,
    e.g. the timestamp, then file order); ``reject`` raises on the first duplicate.
    """
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"unknown duplicates policy {policy!r}; use one of {DUPLICATE_POLICIES}")
    n = users.shape[0]
    key = users.astype(np.int64) * np.int64(num_items) + items.astype(np.int64)
    rows = np.arange(n, dtype=np.int64)
    order = np.lexsort((rows, key) if tiebreak is None else (rows, tiebreak, key))
    sorted_key = key[order]
    dup = np.empty(n, dtype=bool)
    if n:
        dup[0] = False
        np.equal(sorted_key[1:], sorted_key[:-1], out=dup[1:])
    n_dup = int(dup.sum())
    if n_dup and policy == "reject":
        pos = int(np.flatnonzero(dup)[np.argmin(order[dup])])
        row = int(order[pos])
        first = pos
        while first > 0 and dup[first]:
            first -= 1
        example = row_repr(table, row) if table is not None else None
        raise data_error(
            file,
            f"duplicate ({columns[0]}, {columns[1]}) pair, repeats row {int(order[first])}; "
            f"{n_dup} duplicate row(s) in all",
            column=f"{columns[0]}, {columns[1]}",
            row=row,
            example=example,
            hint="remove them, or use --duplicates merge to keep the first of each pair",
        )
    return order[~dup], n_dup


def require_train_per_user(
    users: np.ndarray,
    split: np.ndarray,
    num_users: int,
    file: Path,
    table: pa.Table | None = None,
    rows: np.ndarray | None = None,
    column: str = "split",
    user_column: str = "user_id",
) -> None:
    """Every user id in ``[0, num_users)`` has at least one training interaction.

    ``rows`` maps positions in ``users`` back to rows of ``table`` (for the example row).
    """
    has_train = np.zeros(num_users, dtype=bool)
    has_train[users[split == TRAIN]] = True
    missing = np.flatnonzero(~has_train)
    if missing.size == 0:
        return
    user = int(missing[0])
    at = np.flatnonzero(users == user)
    if at.size == 0:
        raise data_error(
            file,
            f"user {user} has no interaction at all ({missing.size} user(s) without a training "
            "interaction); user ids must be contiguous 0..max",
            column=user_column,
        )
    pos = int(at[0])
    row = int(rows[pos]) if rows is not None else pos
    example = row_repr(table, row) if table is not None else None
    raise data_error(
        file,
        f"user {user} has no training interaction (only {SPLIT_NAMES[int(split[pos])]}); "
        f"{missing.size} such user(s)",
        column=column,
        row=row,
        example=example,
        hint="give every user at least one split=0 row, or drop the split column to split 8:1:1",
    )


def clean_interactions(
    users: np.ndarray,
    items: np.ndarray,
    split: np.ndarray | None,
    timestamp: np.ndarray | None,
    *,
    num_users: int,
    num_items: int,
    duplicates: str,
    seed: int,
    file: Path,
    table: pa.Table | None = None,
    split_column: str = "split",
    id_columns: tuple[str, str] = ("user_id", "item_id"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Dedupe, split (per-user 8:1:1 when ``split`` is None) and check train coverage.

    Returns (users, items, split, timestamp, duplicates dropped), sorted by (user, item).
    """
    from magnet_dist.data.split import per_user_split

    keep, n_dup = dedupe_pairs(
        users,
        items,
        num_items,
        duplicates,
        file,
        table=table,
        tiebreak=timestamp,
        columns=id_columns,
    )
    users, items = users[keep], items[keep]
    timestamp = None if timestamp is None else timestamp[keep]
    if split is None:
        split = per_user_split(users, np.random.default_rng(seed))
    else:
        split = split[keep].astype(np.int8)
    # with a given split: every user needs a split=0 row; after our own 8:1:1 split that
    # holds for every user with a row, so this only catches gaps in the ids
    require_train_per_user(
        users,
        split,
        num_users,
        file,
        table=table,
        rows=keep,
        column=split_column,
        user_column=id_columns[0],
    )
    return users, items, split, timestamp, n_dup
