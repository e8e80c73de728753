"""Pieces both trainers call from their loops: the per-step log row, the expert table for
plots, early stopping on validation Recall@20, and the end-of-run files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from magnet_dist.model.magnet import LossOutput, MagnetModel
from magnet_dist.model.schedule import SPECIALISATION, ScheduleState
from magnet_dist.train.plots import make_plots
from magnet_dist.train.run_folder import write_json_atomic

SELECTION_METRIC = "valid.recall@20"


def step_row(step: int, epoch: int, out: LossOutput, state: ScheduleState) -> dict[str, Any]:
    """One metrics.csv row: losses, routing entropies (soft H_conf/H_use and the hard-assignment
    H_load), the EMA the trigger watches, stage, and per-expert load/usage."""
    row: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "loss": float(out.loss),
        "bpr": float(out.bpr),
        "reg": float(out.reg),
        "route": float(out.route),
    }
    s = out.stats
    if s is not None:
        tokens = float(s.tokens)
        row.update(
            h_conf=float(s.h_conf()),
            h_use=float(s.h_use()),
            h_load=float(s.h_load()),
            l_aux=float(s.l_aux()),
            ema_trigger=float(state.ema) if state.ema is not None else float("nan"),
            stage=int(state.stage == SPECIALISATION),
            tokens=tokens,
            dropped=float(s.dropped),
            dropped_fraction=float(s.dropped) / max(tokens * s.top_k, 1.0),
        )
        row.update({f"load_{e}": float(v) for e, v in enumerate(s.load.tolist())})
        row.update({f"usage_{e}": float(v) for e, v in enumerate(s.gate_mass.tolist())})
    return row


def expert_table(model: MagnetModel, experts: list | None = None) -> dict[str, Any]:
    """experts.json: name, family and modality mass of every expert (global order)."""
    experts = experts if experts is not None else list(getattr(model.moe, "experts", []))
    rows = []
    for e in experts:
        t = e.template
        if t.family == "free":
            mass = [1.0 / len(model.modalities)] * len(model.modalities)
        elif t.family == "complementary":
            mass = [t.delta * w for w in t.weights]
            for m in t.pair:
                mass[m] += (1 - t.delta) / 2
        else:
            mass = list(t.weights)
        rows.append({"name": t.name, "family": t.family, "modality_mass": mass})
    return {"modalities": model.modalities, "experts": rows}


def epoch_routing(run_dir: Path, epoch: int) -> dict[str, Any] | None:
    """Routing summary of one epoch from metrics.csv (so a resumed run, whose rows are
    continuous, gets the same summary): ``load_share`` per expert (the assignments each expert
    processed, summed over the epoch's steps and normalised; without a capacity factor these are
    the Top-K assignment shares), their normalised entropy ``h_load``, and
    ``zero_load_experts``. None without MoE rows for that epoch."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return None
    with path.open() as f:
        reader = csv.DictReader(f)
        cols = [c for c in reader.fieldnames or [] if c.startswith("load_")]
        cols.sort(key=lambda c: int(c.split("_")[1]))
        rows = [r for r in reader if r.get("epoch") == str(epoch) and cols and r[cols[0]]]
    if not rows:
        return None
    load = np.array([[float(r[c]) for c in cols] for r in rows]).sum(0)
    if load.sum() == 0:
        return None
    share = load / load.sum()
    nz = share[share > 0]
    h = float(-(nz * np.log(nz)).sum() / np.log(len(share))) if len(share) > 1 else 0.0
    return {
        "epoch": epoch,
        "h_load": h,
        "load_share": [float(v) for v in share],
        "zero_load_experts": int((load == 0).sum()),
        "steps": len(rows),
    }


class EarlyStopping:
    """Model selection on validation Recall@20 only (never test)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: float = -np.inf
        self.best_epoch: int = -1
        self.bad_evals = 0
        self.best_info: dict[str, Any] | None = None  # e.g. the routing summary of best_epoch

    def update(self, epoch: int, value: float, info: dict[str, Any] | None = None) -> bool:
        """Record an evaluation (``info``: kept with it if it is the best); True if best so far."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_evals = value, epoch, 0
            self.best_info = info
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_evals": self.bad_evals,
            "best_info": self.best_info,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_evals = d["best"], d["best_epoch"], d["bad_evals"]
        self.best_info = d.get("best_info")  # checkpoints written before it existed lack it


def finish_run(run_dir: Path, metrics: dict[str, Any], plots: bool = True) -> dict[str, Any]:
    """Write metrics.json and the plots; returns the metrics."""
    write_json_atomic(Path(run_dir) / "metrics.json", metrics)
    if plots:
        make_plots(run_dir)
    return metrics


def append_evaluation(run_dir: Path, row: dict[str, Any]) -> None:
    path = Path(run_dir) / "evaluations.csv"
    new = not path.exists()
    keys = list(row)
    with path.open("a") as f:
        if new:
            f.write(",".join(keys) + "\n")
        f.write(",".join(str(row[k]) for k in keys) + "\n")


def print_metrics(metrics: dict[str, Any]) -> None:
    keys = [k for k in metrics if k.startswith(("valid.", "test."))] + ["best_epoch"]
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))


def truncate_evaluations(run_dir: Path, step: int) -> None:
    """Drop evaluations.csv rows after ``step`` (a resumed run evaluates those again; step 0:
    a fresh start or a restart before the first checkpoint, every row goes)."""
    path = Path(run_dir) / "evaluations.csv"
    if step == 0:
        path.unlink(missing_ok=True)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if not lines:
        return
    header, rows = lines[0], lines[1:]
    col = header.split(",").index("step") if "step" in header.split(",") else None
    if col is None:
        return
    kept = []
    for line in rows:
        fields = line.split(",")
        if (
            len(fields) == len(header.split(","))
            and fields[col].isdigit()
            and int(fields[col]) <= step
        ):
            kept.append(line)
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("\n".join([header, *kept]) + "\n")
    tmp.replace(path)
