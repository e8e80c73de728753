"""``magnet-dist recommend``: top-K items per user of a trained run, written to Parquet.

Schema: ``user_id int64, rank int16 (1..K), item_id int64, score float32``, one row per
(user, rank), ranks best first. Training items are left out unless ``--include-train``; a user
with fewer than K remaining items gets fewer rows. Scores are the full MAGNET score (dot + MoE),
by exact ranking over every item or, above ``eval.two_stage_above_items`` items, by re-ranking
``eval.candidates`` HNSW candidates. ``--items`` recommends among the listed items only (e.g.
new ones to promote), every one scored exactly. ``--original-ids`` writes (and reads ``--users``
and ``--items`` as) the source's ids from the dataset's id maps, whose type they keep.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from magnet_dist.atomic import atomic_path
from magnet_dist.errors import MagnetError
from magnet_dist.eval.model_io import (
    LoadedRun,
    add_ranking_arguments,
    candidate_score_fn,
    load_run,
    retrieve_for,
)

MAX_K = np.iinfo(np.int16).max
SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("rank", pa.int16()),
        pa.field("item_id", pa.int64()),
        pa.field("score", pa.float32()),
    ]
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.yaml + checkpoints/)")
    parser.add_argument("--k", type=int, default=20, help="items per user")
    parser.add_argument("--out", required=True, help="output Parquet file")
    parser.add_argument(
        "--users",
        default=None,
        help="users to recommend for: a text file (ids separated by newlines / commas), a "
        "Parquet file (column user_id, else its only column) or a comma-separated list; "
        "None: every user",
    )
    parser.add_argument(
        "--items",
        default=None,
        help="recommend among these items only (e.g. new ones), each scored with the full "
        "score: a Parquet file (column item_id, else its only column), a text file or a "
        "comma-separated list; None: every item",
    )
    parser.add_argument(
        "--include-train", action="store_true", help="keep the users' training items"
    )
    parser.add_argument(
        "--original-ids",
        action="store_true",
        help="write and read user/item ids of the source (the dataset's id maps)",
    )
    add_ranking_arguments(
        parser,
        candidates_help="two-stage: candidates retrieved per user (None: max(eval.candidates, K))",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


# ----------------------------------------------------------------------------------------------
# the user list


def read_id_tokens(spec: str, option: str = "--users", column: str = "user_id") -> list:
    """Raw ids from a file (Parquet: ``column``, else its only column; text: ids separated by
    newlines / commas) or a comma-separated list, for the command-line ``option``."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            try:
                table = pq.read_table(path)
            except (pa.ArrowException, OSError) as err:
                raise MagnetError(f"{option} {path}: unreadable Parquet ({err})") from None
            if column in table.column_names:
                col = table.column(column)
            elif table.num_columns == 1:
                col = table.column(0)
            else:
                raise MagnetError(
                    f"{option} {path}: needs a column named '{column}' or a single column, has "
                    f"{table.column_names}"
                )
            if col.null_count:
                raise MagnetError(f"{option} {path}: the id column has null values")
            return col.to_pylist()
        tokens = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0]
            tokens += [t for t in line.replace(",", " ").split() if t]
        return tokens
    if spec.endswith((".parquet", ".txt", ".csv")) or os.sep in spec:
        raise MagnetError(f"{option} {spec}: file not found")
    return [t.strip() for t in spec.split(",") if t.strip()]


def resolve_ids(
    tokens: list, count: int, id_map: pa.Array | None, option: str = "--users", kind: str = "user"
) -> np.ndarray:
    """Internal ids (int64, first-seen order, no repeats) of ``tokens``, of ``count`` users or
    items (``kind``).

    With ``id_map`` the tokens are original ids (parsed to the map's type), else internal ids.
    Unknown ids raise a MagnetError naming them.
    """
    if not tokens:
        raise MagnetError(f"{option} names no {kind}")
    unknown: list = []
    ids: list[int] = []
    if id_map is None:
        for t in tokens:
            try:
                u = int(t) if not isinstance(t, float) or float(t).is_integer() else None
            except (TypeError, ValueError):
                u = None
            if u is None or not 0 <= u < count:
                unknown.append(t)
            else:
                ids.append(u)
        where = f"internal {kind} ids are 0..{count - 1}"
    else:
        lookup = {v: i for i, v in enumerate(id_map.to_pylist())}
        as_int = pa.types.is_integer(id_map.type)
        for t in tokens:
            try:
                key = int(t) if as_int else str(t)
            except (TypeError, ValueError):
                key = None
            if key is None or key not in lookup:
                unknown.append(t)
            else:
                ids.append(lookup[key])
        where = f"original ids of the dataset's {kind}s id map"
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise MagnetError(f"{len(unknown)} unknown {kind}(s) in {option}: {shown}{more}; {where}")
    return np.fromiter(dict.fromkeys(ids), dtype=np.int64)


def read_item_list(spec: str, dataset, original_ids: bool) -> np.ndarray:
    """Internal ids of an ``--items`` list (evaluate, bench_quality); with ``original_ids`` read
    through the dataset's item id map, refused where the dataset has none."""
    id_map = dataset.id_map("items") if original_ids else None
    if original_ids and id_map is None:
        raise MagnetError(
            f"--original-ids: dataset {dataset.path} has no item id map (the source had no ids "
            "of its own); give internal ids"
        )
    tokens = read_id_tokens(spec, "--items", "item_id")
    return resolve_ids(tokens, dataset.num_items, id_map, "--items", "item")


# ----------------------------------------------------------------------------------------------
# top-K


@torch.no_grad()
def rerank_topk(
    score_pairs_fn, users: np.ndarray, candidates: np.ndarray, k: int, user_chunk: int, progress
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each user's candidates (-1 = padding) by ``score_pairs_fn``; like topk_items."""
    out_ids = np.full((len(users), k), -1, dtype=np.int64)
    out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    starts = range(0, len(users), user_chunk)
    for lo in tqdm(starts, desc="re-ranking", unit="chunk", disable=not progress, leave=False):
        cand = candidates[lo : lo + user_chunk]
        safe = torch.from_numpy(np.maximum(cand, 0))
        scores = score_pairs_fn(torch.from_numpy(users[lo : lo + user_chunk]), safe).float()
        scores = scores.masked_fill(torch.from_numpy(cand < 0), float("-inf"))
        vals, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        ids = torch.gather(safe, 1, pos).numpy()
        vals = vals.numpy()
        ids[vals == -np.inf] = -1
        out_ids[lo : lo + len(cand), : ids.shape[1]] = ids
        out_scores[lo : lo + len(cand), : ids.shape[1]] = vals
    return out_ids, out_scores


def recommend(
    loaded: LoadedRun,
    users: np.ndarray,
    k: int,
    include_train: bool = False,
    mode: str = "auto",
    candidates: int | None = None,
    progress: bool = False,
    items: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(item ids [U, k] int64, scores [U, k] float32, info); -1 / -inf where items ran out.
    With ``items`` (internal ids), among those items only."""
    from magnet_dist.eval.ranking import topk_items
    from magnet_dist.eval.scoring import ranking_score_fn

    ev = loaded.cfg.eval
    if items is not None:
        if mode == "two-stage":
            raise MagnetError(
                "--items scores every listed item with the full score (no retrieval); use "
                "--mode exact or auto"
            )
        return recommend_among(loaded, users, k, items, include_train, progress)
    exclude = None if include_train else loaded.train_csr()
    if loaded.use_two_stage(mode):
        n = candidates if candidates is not None else max(ev.candidates, k)
        if n < k:
            raise MagnetError(f"--candidates {n} is below --k {k}: re-ranking needs N >= K")
        cand = retrieve_for(loaded, users, n, exclude, progress)
        pair_fn = candidate_score_fn(loaded.model, loaded.user_reps, loaded.item_reps)
        ids, scores = rerank_topk(pair_fn, users, cand, k, ev.user_chunk, progress)
        return ids, scores, {"mode": "two-stage", "candidates": min(n, loaded.num_items)}
    score_fn = ranking_score_fn(loaded.model, loaded.user_reps, loaded.item_reps)
    ids, scores = topk_items(
        score_fn, users, loaded.num_items, k, exclude, ev.user_chunk, ev.item_chunk, progress
    )
    return ids, scores, {"mode": "exact"}


def recommend_among(
    loaded: LoadedRun,
    users: np.ndarray,
    k: int,
    items: np.ndarray,
    include_train: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-k of the listed ``items`` only (e.g. new items to promote), as :func:`recommend`
    returns them: the list is scored as a catalogue of its own, every item with the full score,
    so no retrieval is needed however large the full catalogue is."""
    from magnet_dist.eval.ranking import csr_from_pairs, topk_items
    from magnet_dist.eval.scoring import listed_reps, pairs_among, ranking_score_fn

    ev = loaded.cfg.eval
    listed = listed_reps(loaded.item_reps, items)
    score_fn = ranking_score_fn(loaded.model, loaded.user_reps, listed)
    exclude = None
    if not include_train:  # the users' training items among the listed, by list position
        tu, ti = pairs_among(*loaded.dataset.pairs(0), items, loaded.num_items)
        exclude = csr_from_pairs(tu, ti, loaded.num_users)
    pos, scores = topk_items(
        score_fn, users, len(items), k, exclude, ev.user_chunk, ev.item_chunk, progress
    )
    ids = np.where(pos >= 0, items[np.maximum(pos, 0)], -1)
    return ids, scores, {"mode": "exact", "items": len(items)}


def recommendations_table(
    users: np.ndarray,
    ids: np.ndarray,
    scores: np.ndarray,
    user_map: pa.Array | None = None,
    item_map: pa.Array | None = None,
) -> pa.Table:
    """One row per (user, rank) with an item; ids mapped through the id maps if given."""
    k = ids.shape[1]
    keep = (ids >= 0).ravel()
    user_col = np.repeat(users, k)[keep]
    rank_col = np.tile(np.arange(1, k + 1, dtype=np.int16), len(users))[keep]
    item_col = ids.ravel()[keep]
    score_col = scores.ravel()[keep].astype(np.float32)
    u = pa.array(user_col, pa.int64())
    i = pa.array(item_col, pa.int64())
    if user_map is not None:
        u = user_map.take(u)
    if item_map is not None:
        i = item_map.take(i)
    schema = pa.schema(
        [
            pa.field("user_id", u.type),
            SCHEMA.field("rank"),
            pa.field("item_id", i.type),
            SCHEMA.field("score"),
        ]
    )
    return pa.table(
        [u, pa.array(rank_col, pa.int16()), i, pa.array(score_col, pa.float32())], schema=schema
    )


def write_parquet_atomic(table: pa.Table, out: Path) -> None:
    """Hidden temp file + rename; on failure (disk full) no temp file is left and the error
    names ``out``."""
    with atomic_path(out, tmp=out.with_name(f".{out.name}.tmp")) as tmp:
        pq.write_table(table, tmp)


def check_out_file(out: Path) -> None:
    """Before ranking (minutes at scale): ``--out`` must be a file path we can create."""
    if out.is_dir():
        raise MagnetError(f"--out {out} is a folder; give a file path, e.g. {out / 'recs.parquet'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MagnetError(f"--out {out}: {parent} is a file, not a folder")
            break


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.k <= MAX_K:
        raise MagnetError(f"--k must be in 1..{MAX_K}, got {args.k}")
    check_out_file(Path(args.out))
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.time()
    loaded = load_run(args.run, args.data, quiet=args.quiet, any_dataset=args.any_dataset)
    ds = loaded.dataset
    user_map = item_map = None
    if args.original_ids:
        user_map, item_map = ds.id_map("users"), ds.id_map("items")
        missing = [k for k, m in (("users", user_map), ("items", item_map)) if m is None]
        if missing and not args.quiet:
            print(
                f"[recommend] note: dataset {ds.path} has no id map for {' and '.join(missing)} "
                "(the source had no ids of its own); writing internal ids there",
                file=sys.stderr,
            )
    if args.users is None:
        users = np.arange(ds.num_users, dtype=np.int64)
    else:
        users = resolve_ids(read_id_tokens(args.users), ds.num_users, user_map)
    items = None
    if args.items is not None:
        tokens = read_id_tokens(args.items, "--items", "item_id")
        items = resolve_ids(tokens, ds.num_items, item_map, "--items", "item")
    ids, scores, info = recommend(
        loaded, users, args.k, args.include_train, args.mode, args.candidates, progress, items
    )
    table = recommendations_table(users, ids, scores, user_map, item_map)
    out = Path(args.out)
    write_parquet_atomic(table, out)
    if not args.quiet:
        short = int((ids < 0).any(axis=1).sum())
        how = info["mode"] + (
            f" ({info['candidates']} candidates/user)" if "candidates" in info else ""
        )
        if "items" in info:
            how += f" among the {info['items']} items of --items"
        print(
            f"[recommend] {table.num_rows} rows: top-{args.k} for {len(users)} users "
            f"({how}, training items {'included' if args.include_train else 'excluded'}"
            f"{f', {short} users with fewer than {args.k} items' if short else ''}) "
            f"-> {out} in {time.time() - t0:.1f} s"
        )
    return 0
