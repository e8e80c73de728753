"""Time to quality: the validation metric against training wall-clock for several training
paths on the same dataset (issue 13: today's exact 2-hop path against the history path).

Each path trains with the distributed trainer (2 workers by default) for ``--snapshots`` epochs
of its own ``steps`` each, exporting every epoch's model (``eval.snapshot_every_epoch``) with the
training seconds so far (steps and history refreshes; no evaluation, checkpoint or start-up
time). Every snapshot is then evaluated on the validation split the way the scaling benchmark
evaluates at 1M: full-graph representations once, HNSW retrieval of ``--candidates`` items by
dot score and MoE re-ranking, on ``--users`` sampled validation users (the same users for every
snapshot). Each training and each evaluation runs in a child process
(:mod:`magnet_dist.bench.procmon`). Writes ``<out>/results.json``, ``results.md`` and
``time_to_quality.png``.

    python launch/bench_time_to_quality.py --data runs/scale-1m/data --out runs/ttq \\
        --path "today:40:" --path "history:100:train.history=true train.fanouts=[10] \\
        train.batch_size=8192"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from magnet_dist.bench import ROOT
from magnet_dist.bench.procmon import run_in_child
from magnet_dist.bench.scale_report import machine

METRIC = "valid.two_stage_sample.recall@20"


def parse_path(text: str) -> dict[str, Any]:
    """'NAME:STEPS:key=value key=value' -> {name, steps per snapshot, overrides}."""
    try:
        name, steps, overrides = text.split(":", 2)
        if not name or int(steps) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--path: expected NAME:STEPS:OVERRIDES like 'history:100:train.history=true "
            f"train.fanouts=[10]', got {text!r}"
        ) from None
    return {"name": name, "steps": int(steps), "overrides": overrides.split()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic-1m.yaml"))
    p.add_argument("--data", required=True, help="prepared dataset with content edges")
    p.add_argument(
        "--partitions",
        default=None,
        help="partition folder (default <data>/partitions-<workers>-metis)",
    )
    p.add_argument("--out", default="runs/time-to-quality")
    p.add_argument("--path", action="append", required=True, type=parse_path, dest="paths")
    p.add_argument("--snapshots", type=int, default=4, help="epochs (= snapshots) per path")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--users", type=int, default=5000, help="sampled validation users")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.snapshots < 1 or args.users < 1:
        p.error("--snapshots and --users must be >= 1")
    return args


def train_params(args: argparse.Namespace, path: dict[str, Any], out: Path) -> dict[str, Any]:
    data = Path(args.data).resolve()
    parts = Path(args.partitions) if args.partitions else data / f"partitions-{args.workers}-metis"
    return {
        "config": args.config,
        "overrides": [
            f"data.path={data}",
            f"train.workers={args.workers}",
            f"graph.partitions={args.workers}",
            f"graph.partition_dir={parts.resolve()}",
            f"train.epochs={args.snapshots}",
            f"train.max_steps_per_epoch={path['steps']}",
            "eval.in_loop=false",
            "eval.snapshot_every_epoch=true",
            f"train.run_dir={out / 'runs' / path['name']}",
            f"train.run_name=ttq-{path['name']}",
            "trainer.mode=distributed",
            *path["overrides"],
        ],
    }


def read_snapshots(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "snapshots.csv").open() as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "paths": [],
        "rows": [],
    }

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "results.md").write_text(markdown(results))

    for path in args.paths:
        run_dir = out / "runs" / path["name"]
        shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark run starts from scratch
        record = run_in_child(
            f"train_{path['name']}", train_params(args, path, out), out, print, "train"
        )
        results["paths"].append({**path, "train": record})
        save()
        if record["status"] != "ok":
            continue
        for snap in read_snapshots(run_dir):
            params = {
                "run_dir": str(run_dir),
                "checkpoint": f"checkpoints/{snap['checkpoint']}",
                "users": args.users,
                "candidates": args.candidates,
                "seed": args.seed,
            }
            name = f"eval_{path['name']}_{snap['epoch']}"
            ev = run_in_child(name, params, out, print, "snapshot_eval")
            results["rows"].append(
                {
                    "path": path["name"],
                    "epoch": int(snap["epoch"]),
                    "step": int(snap["step"]),
                    "train_seconds": float(snap["train_seconds"]),
                    "pairs": int(snap["pairs"]),
                    **(ev.get("metrics") or {}),
                    "eval_status": ev["status"],
                }
            )
            save()
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["summary"] = summarise(results["rows"], [p["name"] for p in args.paths])
    save()
    plot(results["rows"], out / "time_to_quality.png")
    print(markdown(results))
    return results


def summarise(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The first path's final metric ("today's"), and when each path first reaches it."""
    if not names or not rows:
        return {}
    first = [r for r in rows if r["path"] == names[0] and METRIC in r]
    if not first:
        return {}
    target = first[-1][METRIC]
    out: dict[str, Any] = {"target_path": names[0], "target": target, "reached": {}}
    for name in names:
        hit = [r for r in rows if r["path"] == name and r.get(METRIC, -1) >= target]
        out["reached"][name] = hit[0]["train_seconds"] if hit else None
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| path | overrides | epoch | step | pairs | train s | valid R@20 (two-stage, sample) "
        "| valid N@20 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    overrides = {p["name"]: " ".join(p["overrides"]) or "-" for p in results["paths"]}
    for r in results["rows"]:
        lines.append(
            f"| {r['path']} | {overrides.get(r['path'], '')} | {r['epoch']} | {r['step']} "
            f"| {r['pairs']:,} | {r['train_seconds']:.0f} | {r.get(METRIC, float('nan')):.4f} "
            f"| {r.get(METRIC.replace('recall', 'ndcg'), float('nan')):.4f} |"
        )
    s = results.get("summary") or {}
    if s:
        lines += ["", f"Target: {s['target_path']}'s final {METRIC} = {s['target']:.4f}.", ""]
        for name, sec in s["reached"].items():
            when = f"after {sec:.0f} training seconds" if sec is not None else "not reached"
            lines.append(f"- {name}: {when}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["path"] for r in rows):
        pts = [(0.0, None)] + [
            (r["train_seconds"], r.get(METRIC)) for r in rows if r["path"] == name
        ]
        pts = [(x, y) for x, y in pts if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel("training wall-clock (s; steps + history refreshes)")
    ax.set_ylabel("valid Recall@20 (two-stage, sampled users)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("DGLBACKEND", "pytorch")
    main()
