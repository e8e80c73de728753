"""Parity benchmark: the single-process reference vs the distributed trainer with 1 and 2
workers, same config, same epochs, several seeds.

Each run is ``launch/train.py`` in its own process (a distributed run starts its own embedded
Ray cluster and DGL servers). Reports test Recall@20 / NDCG@20 (mean ± std over seeds), the
relative gap of each mode to the reference mean, and training throughput (pairs/s over training
steps only) with the 2-worker / 1-worker ratio. Writes ``<out>/results.json`` and
``<out>/results.md`` after every run.

    python launch/bench_parity.py --config configs/quickstart.yaml --seeds 3 --epochs 10 \\
        --data data/ml-100k --out runs/bench_parity
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "reference": ["trainer.mode=reference"],
    "1 worker": ["trainer.mode=distributed", "train.workers=1", "graph.partitions=1"],
    "2 workers": ["trainer.mode=distributed", "train.workers=2", "graph.partitions=2"],
}
KEYS = ["test.recall@20", "test.ndcg@20", "test.recall@10", "test.ndcg@10", "pairs_per_second"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--data", default=None, help="prepared dataset folder (data.path)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {list(MODES)}")
    p.add_argument("--out", default="runs/bench_parity")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def run_one(args, mode: str, seed: int, out: Path) -> dict:
    run_dir = (out / mode.replace(" ", "_") / f"seed{seed}").resolve()
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    overrides = [
        *args.overrides,
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        f"train.run_name=parity-{mode.replace(' ', '_')}-{seed}",
        *MODES[mode],
    ]
    if args.data:
        overrides.append(f"data.path={Path(args.data).resolve()}")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", args.config, "--quiet"]
    t0 = time.time()
    log = out / "logs" / f"{mode.replace(' ', '_')}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.run(
            cmd + overrides, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
        ).returncode
    if rc != 0:
        raise SystemExit(f"{mode} seed {seed} failed (exit {rc}); see {log}")
    m = json.loads(metrics_path.read_text())
    print(
        f"  {mode:10s} seed {seed}: test recall@20 {m['test.recall@20']:.4f}, "
        f"{m['pairs_per_second']:.0f} pairs/s, {time.time() - t0:.0f} s",
        flush=True,
    )
    return m


def summarise(results: dict[str, list[dict]]) -> dict:
    summary = {}
    for mode, runs in results.items():
        s = {}
        for key in KEYS:
            vals = [r[key] for r in runs]
            s[key] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals,
            }
        summary[mode] = s
    ref = summary.get("reference", {}).get("test.recall@20", {}).get("mean")
    for s in summary.values():
        if ref:
            s["recall20_rel_gap_to_reference"] = s["test.recall@20"]["mean"] / ref - 1
    one, two = summary.get("1 worker"), summary.get("2 workers")
    if one and two:
        summary["speedup_2_vs_1"] = (
            two["pairs_per_second"]["mean"] / one["pairs_per_second"]["mean"]
        )
    return summary


def markdown(summary: dict, args) -> str:
    lines = [
        f"Parity: {args.seeds} seeds, {args.epochs} epochs, config {args.config} "
        f"({os.cpu_count()} cores, {platform.machine()})",
        "",
        "| mode | test Recall@20 | test NDCG@20 | gap to reference (R@20) | pairs/s |",
        "|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        if not isinstance(s, dict):
            continue
        gap = s.get("recall20_rel_gap_to_reference")
        lines.append(
            f"| {mode} | {s['test.recall@20']['mean']:.4f} ± {s['test.recall@20']['std']:.4f} "
            f"| {s['test.ndcg@20']['mean']:.4f} ± {s['test.ndcg@20']['std']:.4f} "
            f"| {'' if gap is None else f'{gap * 100:+.1f}%'} "
            f"| {s['pairs_per_second']['mean']:.0f} |"
        )
    if "speedup_2_vs_1" in summary:
        lines += ["", f"2 workers / 1 worker throughput: {summary['speedup_2_vs_1']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in range(args.seeds):
        for mode in modes:
            results[mode].append(run_one(args, mode, 2024 + seed, out))
            summary = summarise({m: r for m, r in results.items() if r})
            (out / "results.json").write_text(
                json.dumps({"summary": summary, "args": vars(args)}, indent=2)
            )
            (out / "results.md").write_text(markdown(summary, args))
    print(markdown(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
