"""The user-item-content heterograph and its DGL partitions (``magnet-dist partition``).

Graph: node types ``user`` and ``item``; edge types ``(user, ui, item)``, ``(item, iu, user)``
(the TRAINING interactions only, both directions: valid/test never enter the graph) and
``(item, ii, item)`` (content edges, both directions listed, weight = fused cosine; absent when
there are no content edges).

Node data (everything the sampler needs to rebuild :class:`~magnet_dist.model.hops.Hop` norms
exactly as ``full_graph_hop`` does, from *full-graph* degrees):

- ``deg_o``  observed-view degree (ui/iu edges, unweighted), float32
- ``deg_a``  augmented-view weighted degree (ui/iu weight 1 + incoming ii weights), float32
- ``orig_id`` the dataset's 0-based id (partitioning renumbers nodes), int64
- ``feat_<modality>`` item features, float32 ``[num_items, d]`` (items only)

Edge data: ``weight`` (float32: 1 on ui/iu, the content weight on ii) and, on ``ui``,
``train_mask`` (uint8, all ones: every ui edge is a training edge; ``edge_split`` reads it).

Output folder: DGL's ``magnet.json`` + ``part<k>/``, ``id_map/{user,item}_{new2orig,orig2new}.npy``
and ``magnet_partition.json`` (dataset checksum, content-edge checksum, counts, method, per-part
balance, timings). A folder with a matching meta file is reused; a mismatch is an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from magnet_dist.atomic import write_text_atomic
from magnet_dist.errors import (
    NO_SPACE_ERRNOS,
    DataError,
    MagnetError,
    OutputError,
    output_error,
)

GRAPH_NAME = "magnet"
META_FILE = "magnet_partition.json"
ID_MAP_DIR = "id_map"
UI = ("user", "ui", "item")
IU = ("item", "iu", "user")
II = ("item", "ii", "item")
ETYPES = (UI, IU, II)
FEATURE_PREFIX = "feat_"
FORMAT_VERSION = 3  # 2: item node data cnt_ii; 3: "files" (size + sha256 of every file)


# ----------------------------------------------------------------------------------------------
# the heterograph


def full_graph_degrees(
    num_users: int,
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    content_dst: np.ndarray,
    content_weight: np.ndarray,
) -> dict[str, dict[str, np.ndarray]]:
    """``{ntype: {"deg_o": ..., "deg_a": ...}}`` with the definitions of ``full_graph_hop``."""
    user_deg = np.bincount(train_users, minlength=num_users).astype(np.float64)
    item_deg = np.bincount(train_items, minlength=num_items).astype(np.float64)
    content = np.bincount(content_dst, weights=content_weight, minlength=num_items)
    content_count = np.bincount(content_dst, minlength=num_items)
    return {
        "user": {"deg_o": user_deg.astype(np.float32), "deg_a": user_deg.astype(np.float32)},
        "item": {
            "deg_o": item_deg.astype(np.float32),
            "deg_a": (item_deg + content).astype(np.float32),
            # unweighted ii in-degree: rescales sampled content neighbours (sampling.py)
            "cnt_ii": content_count.astype(np.float32),
        },
    }


def build_heterograph(
    num_users: int,
    num_items: int,
    train_users,
    train_items,
    content_src=None,
    content_dst=None,
    content_weight=None,
    item_features: dict[str, np.ndarray] | None = None,
):
    """The DGL heterograph of the training interactions + content edges, ids 0-based per type.

    ``content_*`` must already list both directions (as ``content_edges.parquet`` does).
    """
    import dgl
    import torch

    tu = _owned(train_users, np.int64)
    ti = _owned(train_items, np.int64)
    if tu.shape != ti.shape or tu.ndim != 1:
        raise DataError(f"train users/items must be 1-d of equal length, got {tu.shape}/{ti.shape}")
    _check_range("training user ids", tu, num_users)
    _check_range("training item ids", ti, num_items)
    if content_src is None:
        cs = cd = np.zeros(0, dtype=np.int64)
        cw = np.zeros(0, dtype=np.float32)
    else:
        cs = _owned(content_src, np.int64)
        cd = _owned(content_dst, np.int64)
        cw = _owned(content_weight, np.float32)
        _check_range("content edge src ids", cs, num_items)
        _check_range("content edge dst ids", cd, num_items)
    edges = {
        UI: (torch.from_numpy(tu), torch.from_numpy(ti)),
        IU: (torch.from_numpy(ti), torch.from_numpy(tu)),
    }
    if cs.size:  # DGL's partitioner fails on an edge type without edges: leave ii out then
        edges[II] = (torch.from_numpy(cs), torch.from_numpy(cd))
    g = dgl.heterograph(
        edges,
        num_nodes_dict={"user": int(num_users), "item": int(num_items)},
        idtype=torch.int64,
    )
    degrees = full_graph_degrees(num_users, num_items, tu, ti, cd, cw)
    for ntype, n in (("user", num_users), ("item", num_items)):
        for name, values in degrees[ntype].items():
            g.nodes[ntype].data[name] = torch.from_numpy(values)
        g.nodes[ntype].data["orig_id"] = torch.arange(n, dtype=torch.int64)
    for name, x in (item_features or {}).items():
        x = _owned(x, np.float32)
        if x.ndim != 2 or x.shape[0] != num_items:
            raise DataError(f"item features {name!r}: expected [{num_items}, d], got {x.shape}")
        if "/" in name or not name:
            raise DataError(f"modality name {name!r} cannot be used as a DGL feature name")
        g.nodes["item"].data[FEATURE_PREFIX + name] = torch.from_numpy(x)
    ones = torch.ones(tu.shape[0], dtype=torch.float32)
    g.edges[UI].data["weight"] = ones
    g.edges[IU].data["weight"] = ones.clone()
    if cs.size:
        g.edges[II].data["weight"] = torch.from_numpy(cw)
    g.edges[UI].data["train_mask"] = torch.ones(tu.shape[0], dtype=torch.uint8)
    return g


def _owned(values, dtype) -> np.ndarray:
    """A writable contiguous array (torch.from_numpy refuses Arrow's read-only buffers)."""
    arr = np.ascontiguousarray(values, dtype=dtype)
    return arr if arr.flags.writeable else arr.copy()


def _check_range(what: str, ids: np.ndarray, n: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f"{what} must lie in [0, {n}), got [{ids.min()}, {ids.max()}]")


# ----------------------------------------------------------------------------------------------
# partitioning


def part_config_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{GRAPH_NAME}.json"


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The magnet_partition.json of a partition folder (raises MagnetError if absent)."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise MagnetError(
            f"{path} does not exist: {out_dir} is not a finished magnet_dist partition folder; "
            "create it with `magnet-dist partition`"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MagnetError(f"{path} is damaged ({err}); delete {out_dir} to re-partition") from None
    if not isinstance(meta, dict):
        raise MagnetError(
            f"{path} is damaged (not a JSON object); delete {out_dir} to re-partition"
        )
    return meta


def partition_files(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file the partitioner wrote (all but the
    meta file, which lists them and is written last)."""
    from magnet_dist.file_record import record_files

    skip = {META_FILE, META_FILE + ".tmp"}
    paths = sorted(p for p in Path(out_dir).rglob("*") if p.is_file())
    return record_files(
        out_dir, [p for p in paths if p.relative_to(out_dir).as_posix() not in skip]
    )


def check_partition_files(out_dir: Path, meta: dict[str, Any]) -> None:
    """Every file the meta file lists is there with its size and sha256, else a MagnetError
    naming the first damaged file (a missing part, a truncated graph or part config)."""
    from magnet_dist.file_record import mismatch

    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise MagnetError(f"{out_dir / META_FILE} lists no files; delete {out_dir} to re-partition")
    for rel, want in files.items():
        kind = mismatch(out_dir, rel, want)
        if kind is None:
            continue
        if kind == "missing":
            problem = "is missing"
        elif kind == "size":
            size = (Path(out_dir) / rel).stat().st_size
            problem = f"has {size} bytes, {want.get('size')} were written"
        else:
            problem = "changed since it was written (sha256 mismatch)"
        raise MagnetError(
            f"partition folder {out_dir} is damaged: {rel} {problem}; delete {out_dir} "
            "to re-partition (`magnet-dist partition` or the next train run rebuilds it)"
        )


def partition_arrays(
    num_users: int,
    num_items: int,
    train_users,
    train_items,
    content_src,
    content_dst,
    content_weight,
    item_features: dict[str, np.ndarray],
    *,
    num_parts: int,
    out_dir: str | Path,
    method: str = "random",
    balance_edges: bool = True,
    checksum: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    verbose: bool = True,
) -> Path:
    """Build the heterograph, partition it with DGL, write id maps and the meta file.

    Returns the DGL partition config path. Reuses ``out_dir`` when its meta file matches
    ``checksum`` / ``num_parts`` / ``method``; raises :class:`MagnetError` on a mismatch.
    """
    out_dir = Path(out_dir)
    wanted = {
        "checksum": checksum,
        "num_parts": int(num_parts),
        "method": method,
        "format_version": FORMAT_VERSION,
    }
    if _reusable(out_dir, wanted, verbose):
        return part_config_path(out_dir)
    if method not in ("random", "metis"):
        raise MagnetError(f"partition method must be 'random' or 'metis', got {method!r}")
    if num_parts < 1:
        raise MagnetError(f"number of partitions must be >= 1, got {num_parts}")
    if num_parts > min(num_users, num_items):
        raise MagnetError(
            f"{num_parts} partitions for {num_users} users and {num_items} items: every "
            "partition needs nodes of both types; use at most "
            f"{min(num_users, num_items)} partitions (fewer workers / graph.partitions)"
        )
    existed = out_dir.is_dir()  # absent or empty: _reusable said so
    try:
        return _partition_into(
            out_dir,
            num_users,
            num_items,
            train_users,
            train_items,
            content_src,
            content_dst,
            content_weight,
            item_features,
            num_parts=num_parts,
            method=method,
            balance_edges=balance_edges,
            wanted=wanted,
            extra_meta=extra_meta,
            verbose=verbose,
        )
    except BaseException as err:
        shutil.rmtree(out_dir, ignore_errors=True)  # a failed build leaves nothing partial
        if existed:
            out_dir.mkdir(exist_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            raise output_error(err, out_dir) from None
        if type(err).__name__ == "DGLError" and "Write incomplete" in str(err):
            raise OutputError(  # DGL's C++ writer: fwrite fell short
                f"cannot write {out_dir}: DGL could not write a partition file completely; "
                "is the disk full? free space and re-run"
            ) from None
        raise


def _partition_into(
    out_dir: Path,
    num_users: int,
    num_items: int,
    train_users,
    train_items,
    content_src,
    content_dst,
    content_weight,
    item_features: dict[str, np.ndarray],
    *,
    num_parts: int,
    method: str,
    balance_edges: bool,
    wanted: dict[str, Any],
    extra_meta: dict[str, Any] | None,
    verbose: bool,
) -> Path:
    import dgl

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    g = build_heterograph(
        num_users,
        num_items,
        train_users,
        train_items,
        content_src,
        content_dst,
        content_weight,
        item_features,
    )
    timings["build_graph_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    orig_nids, _ = dgl.distributed.partition_graph(
        g,
        GRAPH_NAME,
        int(num_parts),
        str(out_dir),
        num_hops=1,
        part_method=method,
        balance_edges=balance_edges,
        return_mapping=True,
        # csc sorted by edge type: sample_etype_neighbors(etype_sorted=True) relies on it
        graph_formats=["csc", "coo"],
    )
    timings["partition_graph_s"] = time.perf_counter() - t0
    maps = out_dir / ID_MAP_DIR
    maps.mkdir(exist_ok=True)
    for ntype in ("user", "item"):
        new2orig = orig_nids[ntype].numpy().astype(np.int64)
        orig2new = np.empty_like(new2orig)
        orig2new[new2orig] = np.arange(new2orig.shape[0], dtype=np.int64)
        np.save(maps / f"{ntype}_new2orig.npy", new2orig)
        np.save(maps / f"{ntype}_orig2new.npy", orig2new)

    balance = partition_balance(part_config_path(out_dir))
    meta = {
        "format_version": FORMAT_VERSION,
        **wanted,
        "graph_name": GRAPH_NAME,
        "part_config": part_config_path(out_dir).name,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "num_train_edges": int(len(train_users)),
        "num_content_edges": int(0 if content_src is None else len(content_src)),
        "modalities": {k: int(np.shape(v)[1]) for k, v in item_features.items()},
        "balance_edges": bool(balance_edges),
        "balance": balance,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        **(extra_meta or {}),
        "files": partition_files(out_dir),  # checked before every reuse
    }
    write_text_atomic(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")  # last
    if verbose:
        print(format_report(meta))
    return part_config_path(out_dir)


def _reusable(out_dir: Path, wanted: dict[str, Any], verbose: bool) -> bool:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise MagnetError(
            f"partition folder {out_dir} exists but has no {META_FILE} (not a magnet_dist "
            "partition, or an interrupted run): delete it or pass another --out"
        )
    meta = read_meta(out_dir)
    diff = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: folder has {a!r}, wanted {b!r}" for k, (a, b) in diff.items())
        raise MagnetError(
            f"partition folder {out_dir} was built for other inputs ({what}); delete it to "
            "re-partition, or pass another --out / graph.partition_dir"
        )
    if not part_config_path(out_dir).is_file():
        raise MagnetError(f"{part_config_path(out_dir)} is missing: delete {out_dir} and re-run")
    check_partition_files(out_dir, meta)
    if verbose:
        print(f"reusing partitions in {out_dir} ({wanted['num_parts']} parts, {wanted['method']})")
    return True


def partition_balance(part_config: str | Path) -> list[dict[str, int]]:
    """Per part: nodes per type, edges per type (incl. ``train_edges`` = ui edges) from DGL's
    node/edge maps (each part owns a contiguous id range per type)."""
    cfg = json.loads(Path(part_config).read_text())
    out = []
    for p in range(cfg["num_parts"]):
        row: dict[str, int] = {"part": p}
        for ntype, ranges in cfg["node_map"].items():
            lo, hi = ranges[p]
            row[f"{ntype}_nodes"] = int(hi - lo)
        for etype, ranges in cfg["edge_map"].items():
            lo, hi = ranges[p]
            row[f"{etype.split(':')[1]}_edges"] = int(hi - lo)
        row["train_edges"] = row.get("ui_edges", 0)
        out.append(row)
    return out


def format_report(meta: dict[str, Any]) -> str:
    lines = [
        f"partitioned {meta['num_users']} users, {meta['num_items']} items, "
        f"{meta['num_train_edges']} training interactions, {meta['num_content_edges']} content "
        f"edges into {meta['num_parts']} parts ({meta['method']})",
        "  timings: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["timings"].items()),
    ]
    for row in meta["balance"]:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return "\n".join(lines)


def _content_checksum(dataset_dir: Path) -> str | None:
    from magnet_dist.file_record import file_sha256
    from magnet_dist.graph.content import EDGES_FILE

    path = dataset_dir / EDGES_FILE
    return file_sha256(path) if path.is_file() else None


def partition_dataset(
    dataset_dir: str | Path,
    num_parts: int,
    method: str = "metis",
    out_dir: str | Path | None = None,
    balance_edges: bool = True,
    allow_missing_content: bool = False,
    verbose: bool = True,
) -> Path:
    """Partition a prepared dataset (its training split + content edges) for ``num_parts``
    graph servers. Returns the DGL partition config path (``<out_dir>/magnet.json``)."""
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.graph.content import EDGES_FILE, read_content_edges
    from magnet_dist.locks import dataset_lock

    dataset_dir = Path(dataset_dir)
    ds = load_dataset(dataset_dir)
    if out_dir is None:
        out_dir = dataset_dir / f"partitions-{num_parts}-{method}"
    content_sum = _content_checksum(dataset_dir)
    if content_sum is None and not allow_missing_content:
        raise DataError(
            f"{dataset_dir / EDGES_FILE} does not exist; build the content edges first with "
            f"`magnet-dist content --data {dataset_dir}`"
        )
    checksum = f"{ds.checksum}+{content_sum}"
    out_dir = Path(out_dir)
    if _reusable(
        out_dir, {"checksum": checksum, "num_parts": num_parts, "method": method}, verbose
    ):
        return part_config_path(out_dir)
    # one build at a time per dataset folder (another one running: an error naming its PID)
    with dataset_lock(dataset_dir):
        t0 = time.perf_counter()
        users, items = ds.pairs(0)
        if content_sum is not None:
            src, dst, weight = read_content_edges(dataset_dir, ds.num_items)
        else:
            src = dst = weight = None
        features = {name: ds.features(name) for name in ds.modalities}
        load_s = time.perf_counter() - t0
        return partition_arrays(
            ds.num_users,
            ds.num_items,
            users,
            items,
            src,
            dst,
            weight,
            features,
            num_parts=num_parts,
            out_dir=out_dir,
            method=method,
            balance_edges=balance_edges,
            checksum=checksum,
            extra_meta={
                "dataset": str(dataset_dir.resolve()),
                "dataset_checksum": ds.checksum,
                "content_checksum": content_sum,
                "load_s": round(load_s, 3),
            },
            verbose=verbose,
        )


# ----------------------------------------------------------------------------------------------
# command line: magnet-dist partition


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset folder (manifest.json)")
    parser.add_argument("--parts", type=int, required=True, help="number of partitions")
    parser.add_argument(
        "--method",
        choices=["random", "metis"],
        default="metis",
        help="DGL partitioning: METIS (min edge cut) or random node assignment",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder; None means <data>/partitions-<parts>-<method>",
    )
    parser.add_argument(
        "--no-balance-edges",
        action="store_true",
        help="do not ask METIS to balance edges per part (it balances nodes only)",
    )
    parser.add_argument(
        "--allow-missing-content",
        action="store_true",
        help="partition without content edges (no item-item edges; LightGCN-only runs)",
    )


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    config = partition_dataset(
        args.data,
        args.parts,
        args.method,
        args.out,
        balance_edges=not args.no_balance_edges,
        allow_missing_content=args.allow_missing_content,
    )
    print(f"partition config: {config} ({time.perf_counter() - t0:.1f} s)")
    return 0
