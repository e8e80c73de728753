"""Quality benchmark: MAGNET, its ablations, LightGCN and BPR-MF; same budget, same seeds.

Every variant is a config override of the one model (``magnet_dist/config.py``); every run is
the single-process reference trainer (``trainer.mode=reference``) on the same prepared dataset
and split (``data.seed`` fixed), one run per (variant, seed) with ``train.seed`` set per seed.
Model selection / early stopping on validation Recall@20 (the trainer's rule); the table reports
the test metrics of the selected model, mean ± sample std over seeds.

Writes ``<out>/results.json`` and ``<out>/results.md`` after every run (so a killed benchmark
keeps its partial results), and each run's folder under ``<out>/<variant>/seed<seed>``. A rerun
with the same settings skips the runs already finished (a run folder whose config.yaml matches
and that has metrics.json; ``moe.*``/``routing.*`` are ignored for variants without the MoE head,
which never read them); a run folder left by different settings is started over. results.json
records a digest of the magnet_dist sources, and each row the digest its run was trained with.

    OMP_NUM_THREADS=1 python launch/bench_quality.py --config configs/quickstart.yaml \\
        --data /tmp/qbench/ml100k --seeds 3 --out runs/bench_quality
    python launch/bench_quality.py --quick --variants magnet,lightgcn --seeds 1
    python launch/bench_quality.py ... train.eval_every=2 train.patience=5  # passthrough

``--grid "train.lr=1e-3,5e-3 model.reg_weight=1e-4,1e-3 model.layers=1,2,3"`` tunes every variant
the same way (MMRec's protocol): each point of the grid (the product of the listed values) is
trained on the first seed, the point with the best *validation* Recall@20 is chosen per variant,
and that point is then trained on every seed; the table reports those runs. Points a variant
cannot tell apart (``model.layers`` for BPR-MF, which has no propagation; ``moe.*`` for the
baselines) are trained once. Grid runs live under ``<out>/<variant>/grid/<point>/seed<seed>``;
results.json and results.md record the grid, every point's validation score and the choice.

``--items FILE`` (as ``magnet-dist evaluate --items``; ``--original-ids`` for the source's ids)
also ranks each selected model among the listed items only, e.g. the ``cold_items.parquet`` of
``launch/thin_train.py --cold-items``: test ``on_items`` columns beside the ordinary ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> config overrides of the one model (applied after the passthrough overrides)
VARIANTS: dict[str, list[str]] = {
    "magnet": [],
    "no_content_view": ["model.content_view=false"],
    "no_moe": ["model.use_moe=false"],
    "free_experts": ["model.templates=false"],
    "single_stage": ["routing.two_stage=false"],
    # content view and MoE off; its score still averages behaviour and content channels
    "lightgcn": ["model.variant=lightgcn"],
    # the classic ID-only LightGCN (MMRec's tables): no content channels either
    "lightgcn_id": ["model.variant=lightgcn", "model.content_channels=false"],
    # BPR matrix factorisation: ID embeddings, no propagation, no content, no MoE
    "mf": ["model.variant=mf"],
}
# MAGNET is compared with each baseline that ran: the all-off model (multimodal dot score),
# the classic ID-only LightGCN and BPR-MF
BASELINES = ("lightgcn", "lightgcn_id", "mf")
METRICS = ["test.recall@20", "test.ndcg@20", "test.recall@10", "test.ndcg@10", "valid.recall@20"]
# with --items: the test metrics of ranking among the listed items only
ITEM_METRICS = ["test.on_items.recall@20", "test.on_items.ndcg@20"]
# --quick: a tiny budget for a smoke test (a few steps, the stage switch still happens)
QUICK = [
    "train.epochs=2",
    "train.eval_every=1",
    "train.patience=2",
    "train.max_steps_per_epoch=4",
    "routing.min_steps=2",
    "routing.window=2",
    "routing.max_steps=6",
    "routing.ramp_steps=2",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/quickstart.yaml)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed+0..n-1)")
    p.add_argument("--seed-base", type=int, default=None, help="first train.seed (default: config)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs for every run")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--data", default=None, help="prepared dataset folder (data.path)")
    p.add_argument("--out", default="runs/bench_quality", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    p.add_argument(
        "--grid",
        default=None,
        help='tuning grid, e.g. "train.lr=1e-3,5e-3 model.layers=1,2": every point on the first '
        "seed, the best on validation Recall@20 per variant, then that point on every seed",
    )
    p.add_argument(
        "--items",
        default=None,
        help="also rank among these items only (as magnet-dist evaluate --items), e.g. "
        "thin_train's cold_items.parquet",
    )
    p.add_argument(
        "--original-ids", action="store_true", help="--items holds the source's item ids"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides for every run"
    )
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit between options
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.variant_list = names
    args.item_ids = None  # main() resolves --items on the dataset
    try:
        args.grid_spec = parse_grid(args.grid) if args.grid else None
    except ValueError as err:
        p.error(str(err))
    return args


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
    """``"a.b=1,2 c.d=x"`` -> ``[("a.b", ["1", "2"]), ("c.d", ["x"])]`` (order kept)."""
    out: list[tuple[str, list[str]]] = []
    for item in spec.split():
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or "." not in key or not vals:
            raise ValueError(f"--grid entry {item!r} is not of the form section.key=v1,v2,...")
        if key in dict(out):
            raise ValueError(f"--grid names {key} twice")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--grid entry {item!r} repeats a value")
        out.append((key, vals))
    if not out:
        raise ValueError("--grid is empty")
    return out


def grid_points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the first key varying slowest."""
    from itertools import product

    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo, strict=True)) for combo in product(*(v for _, v in grid))]


def point_name(point: dict[str, str]) -> str:
    """A folder name for a grid point: ``train.lr=0.001+model.layers=2`` (safe characters)."""
    import re

    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "+".join(f"{k}={v}" for k, v in point.items()))


def select_point(scores: list[float]) -> int:
    """Index of the best validation score; a tie goes to the earlier point (grid order), and a
    NaN (a run without a validation score) never wins."""
    best = None
    for i, v in enumerate(scores):
        if not math.isnan(v) and (best is None or v > scores[best]):
            best = i
    if best is None:
        raise ValueError("no grid point has a validation score")
    return best


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Budget and data for every run; the passthrough overrides come last (they win)."""
    out = ["trainer.mode=reference"]
    if args.data:
        out.append(f"data.path={args.data}")
    if args.quick:
        out += QUICK
    if args.epochs is not None:
        out.append(f"train.epochs={args.epochs}")
    return out + list(args.overrides)


def run_config(args, variant: str, seed: int, point: dict[str, str] | None = None):
    """The run's config: common overrides, the grid point's, then the variant's (so a grid
    never changes what a variant is)."""
    from magnet_dist.config import load_config

    folder = Path(args.out) / variant
    if point:
        folder = folder / "grid" / point_name(point)
    run_dir = folder / f"seed{seed}"
    overrides = [
        *common_overrides(args),
        *(f"{k}={v}" for k, v in (point or {}).items()),
        *fanouts_for_layers(args, point),
        *VARIANTS[variant],
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        f"train.run_name=bench_quality-{variant}-seed{seed}",
    ]
    return load_config(args.config, overrides)


def fanouts_for_layers(args, point: dict[str, str] | None) -> list[str]:
    """A grid point that sets ``model.layers`` (and not ``train.fanouts``) gets one fanout per
    layer, the configured first fanout repeated: the config requires the two to agree (the
    reference trainer propagates over the full graph and never samples)."""
    if not point or "model.layers" not in point or "train.fanouts" in point:
        return []
    from magnet_dist.config import load_config

    base = load_config(args.config, [*common_overrides(args), "train.run_dir=unused"])
    if base.train.history:  # one sampled hop whatever the depth
        return []
    fanout = base.train.fanouts[0] if base.train.fanouts else 10
    return [f"train.fanouts=[{','.join([str(fanout)] * int(point['model.layers']))}]"]


def epochs_run(run_dir: Path) -> int | None:
    """The last evaluated epoch + 1 (the loop evaluates on its final epoch, early stop or not)."""
    path = run_dir / "evaluations.csv"
    if not path.exists():
        return None
    lines = path.read_text().strip().splitlines()
    if len(lines) < 2:
        return None
    header = lines[0].split(",")
    return int(lines[-1].split(",")[header.index("epoch")]) + 1


def routing_summary(run_dir: Path) -> dict[str, Any]:
    """Expert usage (gate-mass share) over the last quarter of training, and final entropies."""
    path = run_dir / "metrics.csv"
    experts_path = run_dir / "experts.json"
    if not path.exists() or not experts_path.exists():
        return {}
    import pandas as pd

    from magnet_dist.train.plots import expert_usage, modality_reliance

    steps = pd.read_csv(path)
    table = json.loads(experts_path.read_text())
    experts = table["experts"]
    if "usage_0" not in steps:
        return {}
    usage = expert_usage(steps, len(experts))
    tail = steps.iloc[int(len(steps) * 0.75) :]
    reliance = modality_reliance(usage, experts, table["modalities"])
    return {
        "expert_usage": {
            e["name"]: round(float(u), 4) for e, u in zip(experts, usage, strict=True)
        },
        "modality_reliance": {
            m: round(float(r), 4) for m, r in zip(table["modalities"], reliance, strict=True)
        },
        "h_use_last": float(tail["h_use"].mean()),
        # the hard Top-K usage: the soft entropies stay ~1 through a collapse (docs/routing.md)
        "h_load_last": float(tail["h_load"].mean()) if "h_load" in tail else float("nan"),
        "h_conf_last": float(tail["h_conf"].mean()),
        "route_loss_last": float(tail["route"].mean()),
        "bpr_last": float(tail["bpr"].mean()),
    }


def _effective(tree: dict[str, Any]) -> dict[str, Any]:
    """The settings that can change a run: without the MoE head, ``moe.*`` and ``routing.*``
    are unused, so they are left out of the comparison."""
    tree = dict(tree)
    model = tree.get("model") or {}
    if model.get("variant") == "lightgcn" or model.get("use_moe") is False:
        tree.pop("moe", None)
        tree.pop("routing", None)
    return tree


def settings_key(cfg) -> str:
    """The effective settings of a run without its folder and name: two grid points with the
    same key train the same model (the variant ignores the keys that differ)."""
    tree = _effective(cfg.model_dump(mode="json"))
    train = dict(tree.get("train") or {})
    train.pop("run_dir", None)
    train.pop("run_name", None)
    tree["train"] = train
    return json.dumps(tree, sort_keys=True)


def same_settings(run_dir: Path, cfg) -> bool:
    """True if ``run_dir`` is absent or was written under the same effective settings. The old
    config.yaml is re-read through the current schema, so keys added since (at their defaults)
    still match, and a config the current code rejects does not."""
    import yaml
    from pydantic import ValidationError

    from magnet_dist.config import Config

    old = run_dir / "config.yaml"
    if not old.exists():
        return True
    try:
        old_cfg = Config.model_validate(_effective(yaml.safe_load(old.read_text()) or {}))
    except (ValidationError, yaml.YAMLError, TypeError):
        return False
    return _effective(old_cfg.model_dump(mode="json")) == _effective(cfg.model_dump(mode="json"))


def code_digest() -> str:
    """sha256 (16 hex) of the magnet_dist sources, to tell which code produced a run."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "magnet_dist"
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_one(args, variant: str, seed: int, point: dict[str, str] | None = None) -> dict[str, Any]:
    from magnet_dist.errors import MagnetError
    from magnet_dist.train.reference import train_reference
    from magnet_dist.train.run_folder import write_json_atomic

    cfg = run_config(args, variant, seed, point)
    run_dir = cfg.run_dir
    if not same_settings(run_dir, cfg):
        # left by other settings (or older code): neither its metrics nor its checkpoint count
        shutil.rmtree(run_dir)
    done = run_dir / "metrics.json"
    reused = done.exists()
    t0 = time.time()
    if reused:
        metrics = json.loads(done.read_text())
    else:
        try:
            metrics = train_reference(cfg, progress=args.progress)
        except MagnetError as err:
            if not (run_dir / "checkpoints").exists() or "checkpoint" not in str(err):
                raise
            print(f"[bench] cannot resume {run_dir} ({err}); starting it over", flush=True)
            shutil.rmtree(run_dir)
            t0 = time.time()
            metrics = train_reference(cfg, progress=args.progress)
    wall = time.time() - t0
    info_path = run_dir / "bench_run.json"
    if reused:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    else:
        info = {"wall_seconds": wall, "code": args.code, "finished_at": time.time()}
        write_json_atomic(info_path, info)
    row = {
        "variant": variant,
        "seed": seed,
        "point": dict(point or {}),
        "run_dir": str(run_dir),
        **{k: float(metrics[k]) for k in METRICS if k in metrics},
        "best_epoch": int(metrics["best_epoch"]) + 1,  # 1-based, like epochs_run
        "epochs_run": epochs_run(run_dir),
        "epochs_budget": cfg.train.epochs,
        "steps": metrics.get("steps"),
        "train_seconds": float(metrics["train_seconds"]),
        "wall_seconds": info.get("wall_seconds"),
        "reused": reused,
        "code": info.get("code"),
        "switch_step": metrics.get("switch_step"),
        "switch_forced": metrics.get("switch_forced"),
        "fusion_lambda": metrics.get("fusion_lambda"),
    }
    if cfg.model.use_moe:
        row.update(routing_summary(run_dir))
    if args.item_ids is not None:
        row.update(on_items_metrics(run_dir, args.item_ids))
    return row


def listed_items(args, data_path) -> Any:
    """Internal ids of ``--items`` on the benchmark's dataset (None without it)."""
    if args.items is None:
        return None
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.eval.recommend import read_item_list

    return read_item_list(args.items, load_dataset(data_path), args.original_ids)


def on_items_metrics(run_dir: Path, items) -> dict[str, float]:
    """Test metrics of the run's selected model ranked among ``items`` only."""
    from magnet_dist.eval.model_io import load_run
    from magnet_dist.eval.run import evaluate_run

    metrics = evaluate_run(load_run(run_dir, quiet=True), ["test"], "exact", items=items)
    return {k: float(metrics[k]) for k in ITEM_METRICS}


def tune_variant(
    args, variant: str, seed: int, points: list[dict[str, str]], tuned: dict, on_row=None
) -> dict:
    """Train every distinct grid point of ``variant`` on ``seed`` and choose on validation
    Recall@20. Fills ``tuned`` as it goes (``points``: one entry per grid point, a point the
    variant cannot tell from an earlier one says ``same_as``; then ``chosen``, the index,
    ``chosen_point`` and ``distinct``, the number of points trained)."""
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        key = settings_key(run_config(args, variant, seed, point))
        if key in seen:
            tuned["points"].append({"point": point, "same_as": seen[key]})
            continue
        seen[key] = i
        print(f"[bench] {variant} grid {i + 1}/{len(points)} {point_name(point)} ...", flush=True)
        row = run_one(args, variant, seed, point)
        entry = {"point": point, "run_dir": row["run_dir"]}
        for k in [
            "valid.recall@20",
            "test.recall@20",
            "test.ndcg@20",
            "best_epoch",
            "epochs_run",
            "wall_seconds",
        ]:
            entry[k] = row.get(k)
        tuned["points"].append(entry)
        if on_row is not None:
            on_row(row, i)
    scores = [float(e.get("valid.recall@20", math.nan)) for e in tuned["points"]]
    tuned["chosen"] = select_point(scores)
    tuned["chosen_point"] = points[tuned["chosen"]]
    tuned["distinct"] = len(seen)
    return tuned


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        s: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for key in [*METRICS, *ITEM_METRICS, "best_epoch", "epochs_run", "train_seconds"]:
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            if not vals and key in ITEM_METRICS:
                continue
            mean, std = mean_std(vals)
            s[key] = {"mean": mean, "std": std}
        out[v] = s
    return out


def comparisons(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """MAGNET vs each baseline that ran (name -> :func:`comparison`)."""
    return {
        b: comparison(rows, summary, b) for b in BASELINES if "magnet" in summary and b in summary
    }


def comparison(
    rows: list[dict[str, Any]], summary: dict[str, Any], baseline: str
) -> dict[str, Any]:
    """MAGNET vs ``baseline`` on test Recall@20 / NDCG@20: gain of the means, the seed spread
    (max of the two sample stds), and the paired per-seed gains."""
    out: dict[str, Any] = {
        "criterion": f"mean(magnet) - mean({baseline}) > max(std(magnet), std({baseline}))"
    }
    by_seed = {(r["variant"], r["seed"]): r for r in rows}
    seeds = [s for s in summary["magnet"]["seeds"] if (baseline, s) in by_seed]
    n_a, n_b = len(summary["magnet"]["seeds"]), len(summary[baseline]["seeds"])
    for key in ["test.recall@20", "test.ndcg@20"]:
        a, b = summary["magnet"][key], summary[baseline][key]
        gain = a["mean"] - b["mean"]
        spread = max(a["std"], b["std"])
        paired = [by_seed[("magnet", s)][key] - by_seed[(baseline, s)][key] for s in seeds]
        pm, ps = mean_std(paired)
        out[key] = {
            "gain": gain,
            "relative_gain": gain / b["mean"] if b["mean"] else math.nan,
            "spread": spread,
            # no verdict from one seed a side: there is no spread to beat
            "beats": bool(gain > spread) if min(len(paired), n_a, n_b) >= 2 else None,
            "paired_gains": paired,
            "paired_gain_mean": pm,
            "paired_gain_std": ps,
        }
    verdicts = [out[k]["beats"] for k in ["test.recall@20", "test.ndcg@20"]]
    out["beats_both"] = None if None in verdicts else all(verdicts)
    return out


def _pm(s: dict[str, float], digits: int = 4) -> str:
    if s is None or math.isnan(s["mean"]):
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summary, rows = result["summary"], result["rows"]
    budget = result["budget"]
    lines = [
        f"Dataset `{result['data_path']}`, {budget['epochs']} epochs max, eval every "
        f"{budget['eval_every']}, patience {budget['patience']}, seeds "
        f"{result['seeds']} (train.seed; split seed {result['data_seed']} fixed). "
        "Test metrics of the model selected on valid Recall@20, mean ± std over seeds.",
        "",
        "| variant | Recall@20 | NDCG@20 | Recall@10 | NDCG@10 | epochs (best / run) | "
        "wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        ep = f"{s['best_epoch']['mean']:.1f} / {s['epochs_run']['mean']:.1f}"
        walls = [r["wall_seconds"] for r in rows if r["variant"] == v and r["wall_seconds"]]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "-"
        n = len(s["seeds"])
        name = v if n == len(result["seeds"]) else f"{v} ({n} seeds)"
        lines.append(
            f"| {name} | {_pm(s['test.recall@20'])} | {_pm(s['test.ndcg@20'])} | "
            f"{_pm(s['test.recall@10'])} | {_pm(s['test.ndcg@10'])} | {ep} | {wall} |"
        )
    if result.get("comparisons"):
        lines.append("")
    for baseline, cmp_ in (result.get("comparisons") or {}).items():
        for key in ["test.recall@20", "test.ndcg@20"]:
            c = cmp_[key]
            lines.append(
                f"- MAGNET vs {baseline} {key}: gain {c['gain']:+.4f} "
                f"({100 * c['relative_gain']:+.1f}%), seed spread {c['spread']:.4f}, paired "
                f"gain {c['paired_gain_mean']:+.4f} ± {c['paired_gain_std']:.4f} -> "
                + (
                    "no verdict (needs >= 2 seeds a side)"
                    if c["beats"] is None
                    else f"{'beats' if c['beats'] else 'does NOT beat'} the baseline by more "
                    "than the spread"
                )
            )
    best = best_baseline(summary)
    if best is not None:
        lines.append(
            f"- best baseline by mean test Recall@20: {best[0]}; MAGNET / {best[0]} = "
            f"{best[1]:.3f} on Recall@20, {best[2]:.3f} on NDCG@20 (goal >= 1.03)"
        )
    items = result.get("items")
    if items:
        lines += [
            "",
            f"Ranked among the {items['count']} items of `--items {items['file']}` only (test "
            "users with one of them; training items masked):",
            "",
            "| variant | Recall@20 | NDCG@20 |",
            "|---|---|---|",
        ]
        for v, s in summary.items():
            if ITEM_METRICS[0] in s:
                lines.append(f"| {v} | {_pm(s[ITEM_METRICS[0]])} | {_pm(s[ITEM_METRICS[1]])} |")
    lines += grid_markdown(result.get("grid"))
    diag = [
        r
        for r in rows
        if r.get("switch_step") is not None or any((r.get("fusion_lambda") or {}).values())
    ]
    if diag:
        lines += [
            "",
            "| run | switch step (forced) | fusion λ | H_use / H_conf / H_load (last 25%) |",
            "|---|---|---|---|",
        ]
        for r in diag:
            lam = r.get("fusion_lambda") or {}
            lam_s = ", ".join(f"{m[:4]} {x:.2f}" for m, x in lam.items()) or "-"
            sw = r.get("switch_step")
            sw_s = "-" if sw is None else f"{sw}{' (forced)' if r.get('switch_forced') else ''}"
            ent = (
                f"{r['h_use_last']:.3f} / {r['h_conf_last']:.3f} / {r.get('h_load_last', math.nan):.3f}"
                if "h_use_last" in r
                else "-"
            )
            lines.append(f"| {r['variant']} s{r['seed']} | {sw_s} | {lam_s} | {ent} |")
    return "\n".join(lines) + "\n"


def best_baseline(summary: dict[str, Any]) -> tuple[str, float, float] | None:
    """(the baseline with the best mean test Recall@20, MAGNET's R@20 ratio, N@20 ratio)."""
    ran = [b for b in BASELINES if b in summary]
    if "magnet" not in summary or not ran:
        return None
    b = max(ran, key=lambda v: summary[v]["test.recall@20"]["mean"])
    ratio = [
        summary["magnet"][k]["mean"] / summary[b][k]["mean"]
        for k in ["test.recall@20", "test.ndcg@20"]
    ]
    return b, ratio[0], ratio[1]


def grid_markdown(grid: dict[str, Any] | None) -> list[str]:
    """The tuning grid: every point's validation Recall@20 (first seed) and the choice."""
    if not grid:
        return []
    spec = " ".join(f"{k}={','.join(v)}" for k, v in grid["spec"])
    lines = [
        "",
        f"Grid `{spec}` (first seed; chosen on valid Recall@20):",
        "",
        "| variant | point | valid R@20 | test R@20 | epochs (best / run) |",
        "|---|---|---|---|---|",
    ]
    for variant, tuned in grid["variants"].items():
        for i, e in enumerate(tuned["points"]):
            name = " ".join(f"{k.split('.')[-1]}={v}" for k, v in e["point"].items())
            if i == tuned.get("chosen"):
                name = f"**{name}** (chosen)"
            if "same_as" in e:
                lines.append(f"| {variant} | {name} | same run as point {e['same_as'] + 1} | | |")
                continue
            lines.append(
                f"| {variant} | {name} | {e['valid.recall@20']:.4f} | "
                f"{e['test.recall@20']:.4f} | {e['best_epoch']} / {e['epochs_run']} |"
            )
    return lines


def write_results(out: Path, result: dict[str, Any]) -> None:
    from magnet_dist.train.run_folder import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", result)
    tmp = out / "results.md.tmp"
    tmp.write_text(markdown(result))
    os.replace(tmp, out / "results.md")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.code = code_digest()
    from magnet_dist.config import load_config
    from magnet_dist.train.pipeline import ensure_stages

    # The dataset and content edges once, before any run (content edges as MAGNET needs them).
    base = load_config(args.config, [*common_overrides(args), "train.run_dir=unused"])
    ensure_stages(base, quiet=True)
    args.item_ids = listed_items(args, base.data.path)
    seed0 = args.seed_base if args.seed_base is not None else base.train.seed
    seeds = [seed0 + i for i in range(args.seeds)]
    out = Path(args.out)
    content_report = Path(base.data.path) / "content_edges.json"
    result: dict[str, Any] = {
        "config": args.config,
        "data_path": str(base.data.path),
        "data_seed": base.data.seed,
        "seeds": seeds,
        "variants": args.variant_list,
        "variant_overrides": {v: VARIANTS[v] for v in args.variant_list},
        "common_overrides": common_overrides(args),
        "budget": {
            "epochs": base.train.epochs,
            "eval_every": base.train.eval_every,
            "patience": base.train.patience,
            "max_steps_per_epoch": base.train.max_steps_per_epoch,
        },
        "content_edges": json.loads(content_report.read_text())
        if content_report.exists()
        else None,
        "code": args.code,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "items": None
        if args.item_ids is None
        else {"file": args.items, "count": len(args.item_ids), "original_ids": args.original_ids},
        "rows": [],
        "summary": {},
        "comparisons": {},
        "finished": False,
    }
    t_start = time.time()

    def announce(row: dict[str, Any], what: str) -> None:
        result["elapsed_seconds"] = time.time() - t_start
        write_results(out, result)
        wall = "reused" if row["reused"] else f"{row['wall_seconds']:.0f} s"
        if row["reused"] and row["code"] not in (None, args.code):
            wall += ", older code"
        print(
            f"[bench] {what} done ({wall}): "
            f"test R@20 {row['test.recall@20']:.4f} N@20 {row['test.ndcg@20']:.4f} "
            f"valid R@20 {row['valid.recall@20']:.4f} best epoch {row['best_epoch']}/"
            f"{row['epochs_run']} switch {row['switch_step']} "
            f"[elapsed {result['elapsed_seconds'] / 60:.1f} min]",
            flush=True,
        )

    def record(row: dict[str, Any], what: str) -> None:
        result["rows"].append(row)
        result["summary"] = summarise(result["rows"], args.variant_list)
        result["comparisons"] = comparisons(result["rows"], result["summary"])
        announce(row, what)

    if args.grid_spec is None:
        plan = [(v, s) for s in seeds for v in args.variant_list]  # seed-major: early picture
        for n, (variant, seed) in enumerate(plan, 1):
            print(f"[bench] {n}/{len(plan)} {variant} seed={seed} ...", flush=True)
            record(run_one(args, variant, seed), f"{n}/{len(plan)} {variant} seed={seed}")
    else:
        points = grid_points(args.grid_spec)
        result["grid"] = {"spec": [[k, v] for k, v in args.grid_spec], "variants": {}}
        for variant in args.variant_list:  # variant-major: a finished variant is complete
            tuned = result["grid"]["variants"][variant] = {"points": []}

            def on_row(row: dict[str, Any], i: int, variant: str = variant) -> None:
                announce(row, f"{variant} grid {i + 1}/{len(points)} {point_name(points[i])}")

            tune_variant(args, variant, seeds[0], points, tuned, on_row)
            chosen = tuned["chosen_point"]
            for seed in seeds:
                print(f"[bench] {variant} seed={seed} at {point_name(chosen)} ...", flush=True)
                record(run_one(args, variant, seed, chosen), f"{variant} seed={seed}")
    result["finished"] = True
    result["elapsed_seconds"] = time.time() - t_start
    write_results(out, result)
    print(markdown(result))
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    return result


if __name__ == "__main__":
    from magnet_dist.cli import report_errors

    sys.exit(report_errors(main))
