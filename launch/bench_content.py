"""Benchmark of the content-edge build (HNSW per modality + fusion) on synthetic features.

Clustered random vectors stand in for real item features: ``--clusters`` centres per modality
(standard normal) plus per-dimension Gaussian noise of std ``--noise``. Prints a table and writes
JSON (timings, HNSW recall@k against exact search, edges, peak RSS).

    python launch/bench_content.py --items 100000 --dims 128,384 --out runs/bench_content.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from magnet_dist.config import GraphConfig
from magnet_dist.graph.content import build_content_edges, format_report


def clustered_features(items: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = rng.standard_normal((items, dim), dtype=np.float32)
    x *= np.float32(noise)
    x += centres[rng.integers(0, clusters, items)]
    return x


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dims", default="128,384", help="one feature size per modality")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=-1, help="query threads (-1: all cores)")
    parser.add_argument(
        "--build-threads", type=int, default=1, help="index-building threads (1: reproducible)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/bench_content.json")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="GraphConfig fields, e.g. hnsw_ef=128"
    )
    args = parser.parse_args()
    cfg = GraphConfig(**{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.overrides)})
    dims = [int(d) for d in args.dims.split(",")]

    t0 = time.perf_counter()
    features = {
        f"m{i}_{d}d": clustered_features(args.items, d, args.clusters, args.noise, args.seed + i)
        for i, d in enumerate(dims)
    }
    gen_s = time.perf_counter() - t0
    rss_before = peak_rss_mb()
    src, dst, weight, report = build_content_edges(
        features,
        cfg,
        seed=args.seed,
        progress=not args.quiet,
        num_threads=args.threads,
        build_threads=args.build_threads,
    )
    print(format_report(report))
    result = {
        "items": args.items,
        "dims": dims,
        "clusters": args.clusters,
        "noise": args.noise,
        "threads": args.threads,
        "build_threads": args.build_threads,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "generate_s": round(gen_s, 2),
        "build_total_s": report["total_s"],
        "peak_rss_mb_after_generate": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "report": report,
    }
    print(
        f"wall {report['total_s']:.1f} s for the build (+{gen_s:.1f} s generating features), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
