"""Run whatever stages are missing before training: prepare -> content -> (partition).

Each stage writes to disk and is skipped when its output is present and up to date, so the quick
start is one command and re-runs are cheap.
"""

from __future__ import annotations

import time
from pathlib import Path

from magnet_dist.config import Config, check_expert_count, prepared_modalities
from magnet_dist.locks import dataset_lock


def ensure_dataset(cfg: Config, quiet: bool = False) -> Path:
    path = Path(cfg.data.path)
    rebuild = False
    if (path / "manifest.json").exists():
        why = stale_dataset(cfg, path)
        if why is None:
            return path
        print(f"[pipeline] dataset {path}: {why}; rebuilding it from {cfg.data.source!r}")
        rebuild = True
    from magnet_dist.data.prepare import prepare_dataset

    if not rebuild:
        check_auto_prepare(cfg, path)
        print(f"[pipeline] dataset {path} missing: preparing it from source {cfg.data.source!r}")
    t0 = time.time()
    prepare_dataset(  # takes the dataset folder's build lock itself
        cfg.data.source,
        path,
        path=cfg.data.source_path,
        seed=cfg.data.seed,
        users=cfg.data.synthetic_users,
        items=cfg.data.synthetic_items,
        interactions=cfg.data.synthetic_interactions,
        quiet=quiet,
        force=rebuild,
    )
    print(f"[pipeline] prepared {path} in {time.time() - t0:.1f} s")
    return path


GENERATED = ("movielens-100k", "movielens-1m", "synthetic")  # the config alone defines the data


def check_auto_prepare(cfg: Config, path: Path) -> None:
    """Build a missing dataset only if the config says what goes there: a source that needs no
    input of the user's, named in the same place as the path (both in the YAML file, both as
    overrides, or both defaults). A typo in an overridden data.path is an error, not a new
    dataset built from the config file's source."""
    from magnet_dist.config import data_origins
    from magnet_dist.errors import DataError

    source = cfg.data.source
    command = f"magnet-dist prepare --source {source} --out {path}"
    if path.exists() or path.is_symlink():
        raise DataError(
            f"data.path {path} exists but is not a prepared dataset (no manifest.json); fix "
            f"data.path, or replace it with `{command} --force`"
        )
    if source not in GENERATED:
        hint = f"{command} --path {cfg.data.source_path or 'INPUT_DIR'}"
        raise DataError(
            f"data.path {path} does not exist; prepare it first (`{hint}`) or fix data.path"
        )
    path_from, source_from = data_origins(cfg)
    if path_from != source_from:
        where = {"default": "the defaults", "file": "the config file", "override": "an override"}
        raise DataError(
            f"data.path {path} does not exist (the path comes from {where[path_from]}, "
            f"data.source={source} from {where[source_from]}); fix the path, or set "
            f"data.source beside it to build it there, or run `{command}`"
        )


# fixed input: the config alone rebuilds the same data
REBUILDABLE = ("movielens-100k", "movielens-1m")


def stale_dataset(cfg: Config, path: Path) -> str | None:
    """None if the prepared dataset at ``path`` can be used; why not, if it can be rebuilt from
    the config (its split was made by an older rule); raises DataError if it cannot."""
    from magnet_dist.data.dataset import load_manifest
    from magnet_dist.data.split import stale_split
    from magnet_dist.errors import DataError

    manifest = load_manifest(path)
    why = stale_split(manifest)
    if why is None:
        return None
    same = manifest["source"] == cfg.data.source and manifest.get("seed") == cfg.data.seed
    if same and cfg.data.source in REBUILDABLE:
        return why
    raise DataError(
        f"dataset {path}: {why}. Its metrics would not compare with MMRec's tables; rebuild it "
        f"with `magnet-dist prepare --source {manifest['source']} ... --out {path} --force`"
    )


def ensure_content_edges(cfg: Config, quiet: bool = False) -> None:
    if not cfg.model.content_view:
        return
    from magnet_dist.graph import content

    if content.content_edges_up_to_date(cfg.data.path, cfg.graph):
        return
    from magnet_dist.data.dataset import load_dataset

    print(f"[pipeline] content edges for {cfg.data.path} missing or stale: building them")
    with dataset_lock(cfg.data.path):  # one build at a time per dataset folder
        ds = load_dataset(cfg.data.path)
        feats = {m: ds.features(m) for m in ds.modalities}
        src, dst, weight, report = content.build_content_edges(
            feats, cfg.graph, seed=cfg.data.seed, progress=not quiet
        )
        content.write_content_edges(cfg.data.path, src, dst, weight, report)
    print(content.format_report(report))


def ensure_stages(cfg: Config, quiet: bool = False) -> None:
    ensure_dataset(cfg, quiet)
    # E depends on the dataset's modalities: a bad moe.top_k / moe.ep_size fails here, before
    # any worker starts, even if the dataset did not exist when the config was loaded
    num_modalities = prepared_modalities(cfg)
    if num_modalities is not None:
        check_expert_count(cfg, num_modalities)
    ensure_content_edges(cfg, quiet)
