"""Content-induced item-item edges (MAGNET_SPEC.md, "(II) Content-induced edges").

Per content modality c: L2-normalise x^c, build an HNSW index (inner product on unit vectors =
cosine), query the k_c nearest items of every item (self excluded), weight = cosine. Fuse
S = sum_c w_c S_c over the (directed, sparse) per-modality KNN matrices, keep the top-k of every
row of S, symmetrise, drop weights <= 0. The build measures its recall@k against exact search on
a sample of items, so the quality of the approximate search is known on the real features.

Symmetrisation: S is not symmetric even though cosine is, because KNN membership is not (j may
be among i's neighbours in both modalities while i is among j's in only one). A pair kept in
both directions gets the larger of its two fused weights, so the written graph is symmetric.

Output (``content_edges.parquet``): src, dst (0-based item ids, every edge listed in both
directions, sorted by (src, dst)) and weight (float32 in (0, 1]); ``content_edges.json`` holds
the build report, the settings used and the dataset checksum.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magnet_dist.atomic import atomic_path, write_text_atomic
from magnet_dist.config import GraphConfig, load_config
from magnet_dist.errors import ConfigError, DataError
from magnet_dist.file_record import file_sha256
from magnet_dist.graph.hnsw import build_index, l2_normalise, query_index

EDGES_FILE = "content_edges.parquet"
REPORT_FILE = "content_edges.json"
_EXACT_BLOCK = 1 << 24  # similarity entries per block of the exact (brute-force) recall check


# ----------------------------------------------------------------------------------------------
# building


def _modality_weights(modalities: list[str], cfg: GraphConfig) -> dict[str, float]:
    """w_c per modality, normalised to sum to 1 (so fused weights stay in (0, 1]).

    ``graph.modality_weights=None`` means equal weights; a modality missing from an explicit
    mapping gets weight 0 (it is skipped, and the report says so).
    """
    if cfg.modality_weights is None:
        return {m: 1.0 / len(modalities) for m in modalities}
    unknown = sorted(set(cfg.modality_weights) - set(modalities))
    if unknown:
        raise ConfigError(
            f"graph.modality_weights names unknown modalities {unknown}; the dataset's content "
            f"modalities are {sorted(modalities)}"
        )
    raw = {m: float(cfg.modality_weights.get(m, 0.0)) for m in modalities}
    bad = {m: w for m, w in raw.items() if not np.isfinite(w) or w < 0}
    if bad:
        raise ConfigError(f"graph.modality_weights must be finite and >= 0, got {bad}")
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError(
            f"graph.modality_weights are all zero ({raw}); give at least one modality a "
            "positive weight"
        )
    return {m: w / total for m, w in raw.items()}


def _check_features(features: dict[str, np.ndarray]) -> int:
    if not features:
        raise DataError("no content modalities given: the dataset has no item features")
    counts = {}
    for name, x in features.items():
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] < 1:
            shape = getattr(x, "shape", None)
            raise DataError(f"item features {name!r} must be a 2-d array [items, dim], got {shape}")
        if not np.isfinite(x).all():
            raise DataError(
                f"item features {name!r} contain NaN or infinite values; clean or impute them "
                "before building content edges"
            )
        counts[name] = x.shape[0]
    if len(set(counts.values())) > 1:
        raise DataError(f"item feature tables disagree on the number of items: {counts}")
    return next(iter(counts.values()))


def _exclude_self(labels: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own id from k+1 results (or, if absent, its last = least similar one).

    The own id can be absent when more than k+1 items are exact duplicates of it; any of them is
    then a correct neighbour. hnswlib returns distinct labels, so exactly one column goes.
    """
    n, kq = labels.shape
    drop = labels == np.arange(n, dtype=np.int64)[:, None]
    drop[~drop.any(axis=1), kq - 1] = True
    keep = ~drop
    return labels[keep].reshape(n, kq - 1), sims[keep].reshape(n, kq - 1)


def _exact_recall(xn: np.ndarray, sample: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of HNSW neighbours that belong to the exact top-k (ties with the k-th count as hits)."""
    n = xn.shape[0]
    rows = max(1, _EXACT_BLOCK // max(n, 1))
    hits = 0
    for start in range(0, len(sample), rows):
        ids = sample[start : start + rows]
        sims = xn[ids] @ xn.T
        sims[np.arange(len(ids)), ids] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        found = np.take_along_axis(sims, labels[ids], axis=1)
        hits += int((found >= kth[:, None] - 1e-5).sum())
    return hits / (len(sample) * k)


def modality_knn(
    x: np.ndarray,
    k: int,
    cfg: GraphConfig,
    *,
    name: str = "",
    seed: int = 0,
    num_threads: int = -1,
    build_threads: int = 1,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The k nearest items of every item by cosine (self excluded): labels, cosines, report.

    ``num_threads`` query the index; ``build_threads`` insert into it (1, the default, keeps
    the result reproducible: see :func:`~magnet_dist.graph.hnsw.build_index`)."""
    n = x.shape[0]
    xn = l2_normalise(x)
    t0 = time.perf_counter()
    index = build_index(
        xn,
        space="ip",
        m=cfg.hnsw_m,
        ef_construction=cfg.hnsw_ef_construction,
        seed=seed,
        num_threads=build_threads,
        progress=progress,
        desc=f"HNSW build [{name}]",
    )
    t1 = time.perf_counter()
    labels, dists = query_index(
        index,
        xn,
        k + 1,
        ef=cfg.hnsw_ef,
        num_threads=num_threads,
        progress=progress,
        desc=f"HNSW query [{name}]",
    )
    t2 = time.perf_counter()
    sims = np.clip(1.0 - dists, -1.0, 1.0)  # hnswlib "ip" distance is 1 - <a, b>
    labels, sims = _exclude_self(labels, sims)
    sample = np.random.default_rng(seed).choice(n, size=min(cfg.recall_sample, n), replace=False)
    recall = _exact_recall(xn, np.sort(sample), labels, k)
    t3 = time.perf_counter()
    report = {
        "dim": int(x.shape[1]),
        "k": k,
        "recall_at_k": round(recall, 5),
        "recall_sample": int(len(sample)),
        "build_s": round(t1 - t0, 3),
        "query_s": round(t2 - t1, 3),
        "recall_check_s": round(t3 - t2, 3),
        "build_items_per_s": round(n / max(t1 - t0, 1e-9), 1),
        "query_items_per_s": round(n / max(t2 - t1, 1e-9), 1),
    }
    return labels, sims, report


def fuse_topk(
    neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
    weights: dict[str, float],
    num_items: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of S = sum_c w_c S_c cut to their top-k positive entries (directed, float64).

    ``neighbours[c] = (labels [n, k_c], cosines [n, k_c])`` is the sparse S_c. Returns
    (src, dst, weight) sorted by (src, -weight, dst); ties at the cut go to the smaller item id.
    """
    n = np.int64(num_items)
    keys, vals = [], []
    for name, (labels, sims) in neighbours.items():
        w = weights.get(name, 0.0)
        if w <= 0 or labels.size == 0:
            continue
        rows = np.repeat(np.arange(num_items, dtype=np.int64), labels.shape[1])
        keys.append(rows * n + labels.ravel())
        vals.append(w * sims.ravel().astype(np.float64))
    if not keys:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    pair, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    fused = np.bincount(inverse, weights=np.concatenate(vals), minlength=len(pair))
    src, dst = pair // n, pair % n
    keep = (fused > 0) & (src != dst)
    src, dst, fused = src[keep], dst[keep], fused[keep]
    order = np.lexsort((dst, -fused, src))
    src, dst, fused = src[order], dst[order], fused[order]
    rank = np.arange(len(src)) - np.searchsorted(src, src, side="left")
    top = rank < k
    return src[top], dst[top], fused[top]


def symmetrise(
    src: np.ndarray, dst: np.ndarray, weight: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both directions of every edge, one row per (src, dst) with the larger weight, sorted by
    (src, dst); weights clipped to <= 1, cast to float32, and those <= 0 dropped."""
    n = np.int64(num_items)
    key = np.concatenate([src * n + dst, dst * n + src])
    both = np.concatenate([weight, weight])
    order = np.lexsort((-both, key))
    key, both = key[order], both[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, out = key[first], np.minimum(both[first], 1.0).astype(np.float32)
    positive = out > 0
    key, out = key[positive], out[positive]
    return key // n, key % n, out


def build_content_edges(
    features: dict[str, np.ndarray],
    cfg: GraphConfig,
    seed: int = 0,
    progress: bool = True,
    num_threads: int = -1,
    build_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fused, symmetric item-item KNN edges over the content modalities, and a build report.

    ``features[c]`` is the [num_items, d_c] feature matrix of modality c (rows = item ids).
    Returns (src int64, dst int64, weight float32, report). ``num_threads``: threads that query
    the HNSW indexes (-1: all cores); ``build_threads``: threads that build them (default 1:
    the same input gives the same edges; more is faster and not reproducible).
    """
    num_items = _check_features(features)
    weights = _modality_weights(list(features), cfg)
    k_fused = cfg.content_k
    k_mod = min(cfg.per_modality_k or cfg.content_k, max(num_items - 1, 0))
    t0 = time.perf_counter()
    neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    per_modality: dict[str, dict[str, Any]] = {}
    for name, x in features.items():
        if weights[name] <= 0:
            per_modality[name] = {"dim": int(x.shape[1]), "weight": 0.0, "skipped": "weight 0"}
            continue
        if k_mod == 0:
            per_modality[name] = {"dim": int(x.shape[1]), "weight": weights[name], "k": 0}
            continue
        labels, sims, rep = modality_knn(
            x,
            k_mod,
            cfg,
            name=name,
            seed=seed,
            num_threads=num_threads,
            build_threads=build_threads,
            progress=progress,
        )
        neighbours[name] = (labels, sims)
        per_modality[name] = {"weight": round(weights[name], 6), **rep}
    src, dst, weight = symmetrise(*fuse_topk(neighbours, weights, num_items, k_fused), num_items)
    degree = np.bincount(src, minlength=num_items) if num_items else np.zeros(0, np.int64)
    report = {
        "num_items": int(num_items),
        "content_k": k_fused,
        "per_modality_k": k_mod,
        "hnsw": {
            "M": cfg.hnsw_m,
            "ef_construction": cfg.hnsw_ef_construction,
            "ef": cfg.hnsw_ef,
            "build_threads": build_threads,
        },
        "modalities": per_modality,
        "edges": int(len(src)),  # directed rows written (each undirected pair twice)
        "mean_degree": round(float(degree.mean()) if num_items else 0.0, 3),
        "max_degree": int(degree.max()) if num_items else 0,
        "isolated_items": int((degree == 0).sum()),
        "total_s": round(time.perf_counter() - t0, 3),
        "seed": seed,
        "config": content_config(cfg),
    }
    return src, dst, weight, report


def content_config(cfg: GraphConfig) -> dict[str, Any]:
    """The GraphConfig keys that determine the content edges (recorded next to them)."""
    keys = (
        "content_k",
        "per_modality_k",
        "modality_weights",
        "hnsw_m",
        "hnsw_ef_construction",
        "hnsw_ef",
        "recall_sample",
    )
    return {key: getattr(cfg, key) for key in keys}


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of a build report (one line per modality)."""
    lines = [
        f"content edges: {report['num_items']} items, k={report['content_k']} "
        f"(per modality {report['per_modality_k']}), HNSW M={report['hnsw']['M']} "
        f"ef_construction={report['hnsw']['ef_construction']} ef={report['hnsw']['ef']} "
        f"build threads={report['hnsw'].get('build_threads', 'all')}",
        f"  {'modality':<12}{'dim':>6}{'weight':>8}{'recall@k':>10}{'build s':>9}"
        f"{'query s':>9}{'build it/s':>12}{'query it/s':>12}",
    ]
    for name, rep in report["modalities"].items():
        if "recall_at_k" not in rep:
            lines.append(f"  {name:<12}{rep['dim']:>6}{rep['weight']:>8.3f}  (skipped)")
            continue
        lines.append(
            f"  {name:<12}{rep['dim']:>6}{rep['weight']:>8.3f}{rep['recall_at_k']:>10.4f}"
            f"{rep['build_s']:>9.1f}{rep['query_s']:>9.1f}{rep['build_items_per_s']:>12.0f}"
            f"{rep['query_items_per_s']:>12.0f}"
        )
    lines.append(
        f"  fused: {report['edges']} directed edges, mean degree {report['mean_degree']}, "
        f"max degree {report['max_degree']}, isolated items {report['isolated_items']}, "
        f"total {report['total_s']:.1f} s"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# files


def _dataset_checksum(dataset_dir: Path) -> str | None:
    manifest = dataset_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("checksum")
    except (json.JSONDecodeError, AttributeError):
        return None


def write_content_edges(
    dataset_dir: str | Path,
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray,
    report: dict[str, Any],
) -> Path:
    """Write content_edges.parquet + content_edges.json into the dataset folder (atomically)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DataError(f"dataset folder {dataset_dir} does not exist; run `magnet-dist prepare`")
    table = pa.table(
        {
            "src": pa.array(np.asarray(src, dtype=np.int64)),
            "dst": pa.array(np.asarray(dst, dtype=np.int64)),
            "weight": pa.array(np.asarray(weight, dtype=np.float32)),
        }
    )
    path = dataset_dir / EDGES_FILE
    with atomic_path(path, tmp=path.with_suffix(".parquet.tmp")) as tmp:
        pq.write_table(table, tmp)
    meta = {
        **report,
        "dataset_checksum": _dataset_checksum(dataset_dir),
        "edges_sha256": file_sha256(path),  # a damaged edges file counts as stale
    }
    write_text_atomic(dataset_dir / REPORT_FILE, json.dumps(meta, indent=2) + "\n")
    return path


def read_content_edges(
    dataset_dir: str | Path, num_items: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src int64, dst int64, weight float32) from content_edges.parquet, checked."""
    path = Path(dataset_dir) / EDGES_FILE
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; build it with `magnet-dist content --data {dataset_dir}`"
        )
    rebuild = f"rebuild it with `magnet-dist content --data {dataset_dir}`"
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is unreadable ({err}); {rebuild}") from None
    missing = {"src", "dst", "weight"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks columns {sorted(missing)}; {rebuild}")
    for col, check in (("src", pa.types.is_integer), ("dst", pa.types.is_integer)):
        if not check(table.schema.field(col).type) or table[col].null_count:
            raise DataError(f"{path}: column '{col}' must hold integer ids; {rebuild}")
    if not pa.types.is_floating(table.schema.field("weight").type) or table["weight"].null_count:
        raise DataError(f"{path}: column 'weight' must hold floats; {rebuild}")
    src = table["src"].to_numpy().astype(np.int64, copy=False)
    dst = table["dst"].to_numpy().astype(np.int64, copy=False)
    weight = table["weight"].to_numpy().astype(np.float32, copy=False)
    if not np.isfinite(weight).all():
        row = int(np.flatnonzero(~np.isfinite(weight))[0])
        raise DataError(f"{path}: column 'weight': non-finite value at row {row}; {rebuild}")
    if num_items is not None and len(src):
        lo, hi = min(src.min(), dst.min()), max(src.max(), dst.max())
        if lo < 0 or hi >= num_items:
            raise DataError(
                f"{path} has item ids in [{lo}, {hi}] but the dataset has {num_items} items; "
                "it was built for another dataset: rebuild it with `magnet-dist content`"
            )
    return src, dst, weight


def content_edges_up_to_date(dataset_dir: str | Path, cfg: GraphConfig) -> bool:
    """True if the edges exist and were built with these settings from this dataset version."""
    dataset_dir = Path(dataset_dir)
    meta_path = dataset_dir / REPORT_FILE
    if not (dataset_dir / EDGES_FILE).is_file() or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    if "edges_sha256" in meta and meta["edges_sha256"] != file_sha256(dataset_dir / EDGES_FILE):
        return False  # truncated or changed since written: rebuild
    return meta.get("config") == content_config(cfg) and meta.get(
        "dataset_checksum"
    ) == _dataset_checksum(dataset_dir)


# ----------------------------------------------------------------------------------------------
# command line: magnet-dist content


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset folder (manifest.json)")
    parser.add_argument("--config", default=None, help="YAML config file (graph section is used)")
    parser.add_argument("--seed", type=int, default=0, help="HNSW and recall-sample seed")
    parser.add_argument(
        "--threads", type=int, default=-1, help="threads querying the HNSW indexes (-1: all cores)"
    )
    parser.add_argument(
        "--build-threads",
        type=int,
        default=1,
        help="threads building the HNSW indexes (default 1: the same data gives the same edges; "
        "more is faster, but the edges then depend on thread timing; -1: all cores)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or report")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. graph.content_k=20",
    )


def main(args: argparse.Namespace) -> int:
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.locks import dataset_lock

    cfg = load_config(args.config, args.overrides)
    with dataset_lock(args.data):  # one build at a time per dataset folder
        dataset = load_dataset(args.data)
        features = {name: dataset.features(name) for name in dataset.modalities}
        src, dst, weight, report = build_content_edges(
            features,
            cfg.graph,
            seed=args.seed,
            progress=not args.quiet,
            num_threads=args.threads,
            build_threads=args.build_threads,
        )
        path = write_content_edges(args.data, src, dst, weight, report)
    if not args.quiet:
        print(format_report(report))
        print(f"wrote {path} and {Path(args.data) / REPORT_FILE}", file=sys.stderr)
    return 0
