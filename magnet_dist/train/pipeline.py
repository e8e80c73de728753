"""Run whatever stages are missing before training: prepare -> content -> (partition).

Each stage writes to disk and is skipped when its output is present and up to date, so the quick
start is one command and re-runs are cheap.
"""

from __future__ import annotations

import time
from pathlib import Path

from magnet_dist.config import Config


def ensure_dataset(cfg: Config, quiet: bool = False) -> Path:
    path = Path(cfg.data.path)
    if (path / "manifest.json").exists():
        return path
    from magnet_dist.data.prepare import prepare_dataset

    print(f"[pipeline] dataset {path} missing: preparing it from source {cfg.data.source!r}")
    t0 = time.time()
    prepare_dataset(
        cfg.data.source,
        path,
        path=cfg.data.source_path,
        seed=cfg.data.seed,
        users=cfg.data.synthetic_users,
        items=cfg.data.synthetic_items,
        interactions=cfg.data.synthetic_interactions,
        quiet=quiet,
    )
    print(f"[pipeline] prepared {path} in {time.time() - t0:.1f} s")
    return path


def ensure_content_edges(cfg: Config, quiet: bool = False) -> None:
    if not cfg.model.content_view:
        return
    from magnet_dist.graph import content

    if content.content_edges_up_to_date(cfg.data.path, cfg.graph):
        return
    from magnet_dist.data.dataset import load_dataset

    print(f"[pipeline] content edges for {cfg.data.path} missing or stale: building them")
    ds = load_dataset(cfg.data.path)
    feats = {m: ds.features(m) for m in ds.modalities}
    src, dst, weight, report = content.build_content_edges(
        feats, cfg.graph, seed=cfg.data.seed, progress=not quiet
    )
    content.write_content_edges(cfg.data.path, src, dst, weight, report)
    print(content.format_report(report))


def ensure_stages(cfg: Config, quiet: bool = False) -> None:
    ensure_dataset(cfg, quiet)
    ensure_content_edges(cfg, quiet)
