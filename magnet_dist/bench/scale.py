"""Scaling benchmark: synthetic 1M users / 100k items / 20M interactions through the whole pipeline.

Stages (each in its own child process, so its memory is its own):

1. ``prepare``      synthetic dataset (128-d visual + 384-d text modality)
2. ``content``      item-item content edges (hnswlib), throughput in items/s
3. ``partition``    DGL partitions: ``--parts`` parts (METIS by default) for the multi-worker run,
                    and 1 part for the 1-worker run
4. ``train_wN``     the distributed trainer (Ray Train + DGL servers + DeepSpeed-MoE code path)
                    for a fixed number of steps, N in ``--workers``; throughput = training pairs/s
                    over the training steps only (``metrics.json: pairs_per_second``), in-loop
                    ranking off (``eval.in_loop=false``: at 1M users it would encode every user
                    and every item with full neighbourhoods on each worker)
5. ``profile``      one client, one partition, no Ray: the time of one training step split into
                    sampling, feature/embedding fetch, compute and communication
6. ``evaluate``     the trained (multi-worker) model: full-graph representations once, then
                    two-stage ranking (HNSW retrieval of N candidates by dot score + MoE re-rank) on
                    a user sample, the retrieval's recall against the exact dot-product top-N, and
                    exact full-ranking metrics (dot + MoE over every item) on a sub-sample, with the
                    two-stage numbers of the same users next to them

Every stage reports wall time, peak memory (RSS summed over the stage's whole process tree: the
stage process, Ray's processes and workers, DGL graph servers; sampled with psutil every 0.5 s;
shared memory pages mapped by several processes are counted once per process, so this is an
upper bound) and a throughput. Results go to ``<out>/results.json`` (after every stage) and a
markdown table ``<out>/results.md``; ``--docs`` also writes ``docs/benchmarks.md``.

The driver (:func:`main`) plans the stages (:func:`plan`) and runs each in a child process
(:mod:`magnet_dist.bench.procmon`); the stages are in :mod:`magnet_dist.bench.scale_stages`, the
tables in :mod:`magnet_dist.bench.scale_report`. Run as ``launch/scale.py``, ``magnet-dist bench
scale`` or ``python -m magnet_dist.bench.scale`` (the form each stage's child process uses).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magnet_dist.bench import ROOT
from magnet_dist.bench.procmon import exit_with_parent, run_in_child
from magnet_dist.bench.scale_report import machine, markdown, summarise, write_docs

SCHEMA_VERSION = 1
STAGES = ("prepare", "content", "partition", "train", "profile", "evaluate")
FULL = {"users": 1_000_000, "items": 100_000, "interactions": 20_000_000}
QUICK = {"users": 50_000, "items": 10_000, "interactions": 1_000_000}
# keys every stage record has (the test checks them)
STAGE_KEYS = ("stage", "status", "wall_s", "peak_rss_gb", "peak_processes", "throughput")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic-1m.yaml"))
    p.add_argument("--out", default="runs/scale-1m", help="output folder (data, runs, results)")
    p.add_argument("--data", default=None, help="dataset folder (default: <out>/data)")
    p.add_argument("--quick", action="store_true", help="50k users / 10k items / 1M interactions")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--interactions", type=int, default=None)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--workers", default="1,2", help="worker counts to train with")
    p.add_argument("--parts", type=int, default=2, help="partitions of the multi-worker run")
    p.add_argument("--partition-method", default="metis", choices=["metis", "random"])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (200; quick 20)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps (10; quick 3)")
    p.add_argument("--candidates", type=int, default=200, help="two-stage candidates N")
    p.add_argument("--two-stage-users", type=int, default=None, help="(20000; quick 2000)")
    p.add_argument("--exact-users", type=int, default=None, help="(500; quick 200)")
    p.add_argument("--skip", default="", help="comma list of stages to skip: " + ",".join(STAGES))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="skip prepare/content/partition where their output exists",
    )
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks.md")
    p.add_argument(
        "--sweep",
        default="",
        help="profile one worker at other fanouts@batch sizes too, each with optional config "
        "overrides (levers), e.g. '5,5@2048 10,10@8192 10@8192+train.history=true': pairs/s "
        "against sampled input nodes (the cost driver)",
    )
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-params", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    q = args.quick
    args.steps = args.steps or (20 if q else 200)
    args.profile_steps = args.profile_steps or (3 if q else 10)
    args.two_stage_users = args.two_stage_users or (2000 if q else 20000)
    args.exact_users = args.exact_users or (200 if q else 500)
    args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    args.sweep_list = parse_sweep(args.sweep)  # bad input fails before any stage runs
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip_set - set(STAGES)
    if unknown:
        p.error(f"unknown stages in --skip: {sorted(unknown)}")
    return args


def parse_sweep(text: str) -> list[tuple[list[int], int, list[str]]]:
    """'5,5@2048 10@8192+train.history=true' -> [([5, 5], 2048, []), ([10], 8192,
    ['train.history=true'])]: fanouts, batch and the entry's own config overrides (a lever)."""
    out = []
    for item in text.split():
        try:
            head, *levers = item.split("+")
            fan, batch = head.split("@")
            if any("=" not in lever for lever in levers):
                raise ValueError
            out.append(([int(f) for f in fan.split(",")], int(batch), levers))
        except ValueError:
            raise SystemExit(
                f"--sweep: expected FANOUTS@BATCH[+key=value...] like 5,5@2048 or "
                f"10@8192+train.history=true, got {item!r}"
            ) from None
    return out


@dataclass
class Stage:
    """One entry of the plan: stage function ``func`` (default ``name``) run on ``params`` in a
    child process. ``params`` may be a function of the records so far (``None``: not run, and
    ``skip_note`` says why); ``None`` itself makes an entry that is only ever carried."""

    name: str
    params: dict[str, Any] | Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None
    func: str | None = None
    # with --reuse, when this file exists the stage is not run, and (``carry``) the record of
    # the invocation that made it is carried over (it keeps that invocation's measurement)
    reuse: Path | None = None
    carry: bool = True
    fresh: Path | None = None  # removed before the stage runs (a run folder would be resumed)
    skip_note: str = ""


def record_file(stage: Stage) -> Path:
    """Where a reusable stage's record is kept, beside the output it describes: a later
    ``--reuse`` carries it from there when results.json no longer has it (an invocation that
    did not plan the stage rewrote results.json without it)."""
    assert stage.reuse is not None
    return stage.reuse.with_name(f".scale-record-{stage.name}.json")


def carried_record(stage: Stage, previous: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The record a reused stage carries: the last results.json's, else the one kept beside
    the stage's output (None: neither exists; the stage's row is then missing)."""
    if stage.name in previous:
        return {**previous[stage.name], "reused": True}
    file = record_file(stage)
    if file.is_file():
        return {**json.loads(file.read_text()), "reused": True}
    return None


def part_dir(args: argparse.Namespace, data: Path, n: int) -> Path:
    method = args.partition_method if n > 1 else "random"
    return data / f"partitions-{n}-{method}"


def plan(args: argparse.Namespace, out: Path, data: Path, base: list[str]) -> list[Stage]:
    """The stages of this invocation, in order (``--skip``, ``--reuse``, ``--workers``,
    ``--sweep``)."""
    skip = args.skip_set
    manifest, edges = data / "manifest.json", data / "content_edges.parquet"
    stages = [Stage("prepare", None, reuse=manifest), Stage("content", None, reuse=edges)]
    if "prepare" not in skip:
        prepare = {
            "data": str(data),
            "users": args.users,
            "items": args.items,
            "interactions": args.interactions,
            "seed": args.seed,
        }
        stages.append(Stage("prepare", prepare, reuse=manifest, carry=False))
    if "content" not in skip:
        content = {"data": str(data), "config": args.config, "overrides": base}
        stages.append(Stage("content", content, reuse=edges, carry=False))
    part_counts = sorted({min(w, args.parts) if w > 1 else 1 for w in args.worker_list})
    if "profile" not in skip:
        part_counts = sorted(set(part_counts) | {1})
    for n in part_counts:  # with --skip partition, only carried (as prepare and content are)
        method = args.partition_method if n > 1 else "random"
        folder = part_dir(args, data, n)
        params = {"data": str(data), "parts": n, "method": method, "out_dir": str(folder)}
        stages.append(
            Stage(
                f"partition_{n}",
                None if "partition" in skip else params,
                "partition",
                reuse=folder / "magnet_partition.json",
            )
        )
    if "train" not in skip:
        for w in args.worker_list:
            parts = min(w, args.parts) if w > 1 else 1
            run_dir = out / "runs" / f"w{w}"
            overrides = base + [
                f"train.workers={w}",
                f"graph.partitions={parts}",
                f"graph.partition_dir={part_dir(args, data, parts)}",
                f"graph.partition_method={args.partition_method if parts > 1 else 'random'}",
                "train.epochs=1",
                f"train.max_steps_per_epoch={args.steps}",
                "eval.in_loop=false",
                f"train.run_dir={run_dir}",
                f"train.run_name=scale-w{w}",
                "trainer.mode=distributed",
            ]
            params = {"config": args.config, "overrides": overrides}
            # a benchmark run starts from scratch (an existing run folder would be resumed)
            stages.append(Stage(f"train_w{w}", params, "train", fresh=run_dir))
    profile = {
        "config": args.config,
        "overrides": base,
        "part_config": str(part_dir(args, data, 1) / "magnet.json"),
        "steps": args.profile_steps,
        "warmup": 2,
    }
    if "profile" not in skip:
        stages.append(Stage("profile", profile))
    for fanouts, batch, levers in args.sweep_list:
        overrides = [
            *base,
            f"train.fanouts={json.dumps(fanouts)}",
            f"train.batch_size={batch}",
            *levers,
        ]
        name = "_".join([f"sweep_{'-'.join(map(str, fanouts))}_b{batch}", *levers])
        stages.append(Stage(name, {**profile, "overrides": overrides, "levers": levers}, "profile"))
    if "evaluate" not in skip:
        stages.append(Stage("evaluate", evaluate_params(args, out), skip_note="no trained run"))
    return stages


def evaluate_params(
    args: argparse.Namespace, out: Path
) -> Callable[[list[dict[str, Any]]], dict[str, Any] | None]:
    """The evaluate stage's parameters, once the training stages have run: the run of the most
    workers that trained, else the last run folder with a best checkpoint."""

    def params(records: list[dict[str, Any]]) -> dict[str, Any] | None:
        trained = [
            int(r["stage"].removeprefix("train_w"))
            for r in records
            if r["stage"].startswith("train_w") and r["status"] == "ok"
        ]
        run_dir = out / "runs" / f"w{max(trained)}" if trained else None
        if run_dir is None:
            existing = sorted((out / "runs").glob("w*/checkpoints/best.pt"))
            run_dir = existing[-1].parent.parent if existing else None
        if run_dir is None:
            return None
        return {
            "run_dir": str(run_dir),
            "two_stage_users": args.two_stage_users,
            "exact_users": args.exact_users,
            "candidates": args.candidates,
            "seed": 0,
        }

    return params


def run_stage_here(args: argparse.Namespace) -> dict[str, Any]:
    """The child side of :func:`~magnet_dist.bench.procmon.run_in_child`: one stage, its result
    written to ``--stage-result``."""
    from magnet_dist.bench.scale_stages import STAGE_FUNCS

    os.environ.setdefault("DGLBACKEND", "pytorch")
    exit_with_parent()
    result = STAGE_FUNCS[args.stage](json.loads(args.stage_params))
    Path(args.stage_result).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.stage:
        return run_stage_here(args)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else out / "data"

    def log(msg: str) -> None:
        print(msg, flush=True)

    base = [
        f"data.path={data}",
        f"data.synthetic_users={args.users}",
        f"data.synthetic_items={args.items}",
        f"data.synthetic_interactions={args.interactions}",
        f"graph.partition_method={args.partition_method}",
        *args.overrides,
    ]
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": shlex.join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else shlex.join(["launch/scale.py", *argv]),
        "machine": machine(),
        "size": {"users": args.users, "items": args.items, "interactions": args.interactions},
        "settings": {
            "config": args.config,
            "overrides": base,
            "steps": args.steps,
            "workers": args.worker_list,
            "parts": args.parts,
            "partition_method": args.partition_method,
            "candidates": args.candidates,
            "two_stage_users": args.two_stage_users,
            "exact_users": args.exact_users,
            "quick": args.quick,
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished_at": None,
        "stages": [],
    }

    def save() -> None:
        results["summary"] = summarise(results)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        md = markdown(results)
        (out / "results.md").write_text(md)
        if args.docs:
            write_docs(md)

    def add(record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("load_average", [round(x, 2) for x in os.getloadavg()])
        results["stages"].append(record)
        save()
        return record

    previous: dict[str, dict[str, Any]] = {}
    if args.reuse and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        previous = {r["stage"]: r for r in old.get("stages", []) if r.get("status") == "ok"}

    for stage in plan(args, out, data, base):
        if args.reuse and stage.reuse is not None and stage.reuse.is_file():
            record = carried_record(stage, previous) if stage.carry else None
            if record is not None:
                add(record)
            continue
        params = stage.params(results["stages"]) if callable(stage.params) else stage.params
        if params is None:
            if stage.skip_note:
                log(f"[scale] {stage.name} skipped: {stage.skip_note}")
            continue
        if stage.fresh is not None:
            shutil.rmtree(stage.fresh, ignore_errors=True)
        record = add(run_in_child(stage.name, params, out, log, stage.func))
        if stage.reuse is not None and record.get("status") == "ok":
            record_file(stage).write_text(json.dumps(record, indent=2, default=str) + "\n")
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
