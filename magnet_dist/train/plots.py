"""PNG plots of a run folder (matplotlib, headless): loss, validation Recall@20, routing
entropies (soft H_use/H_conf and the hard H_load) with the stage switch, expert usage per expert and per family, modality reliance.

Reads only files of the run folder (metrics.csv, evaluations.csv, experts.json), so it works the
same for reference and distributed runs and can be re-run on an old run.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FAMILY_COLOURS = {
    "dominant": "tab:blue",
    "balanced": "tab:orange",
    "complementary": "tab:green",
    "free": "tab:gray",
}


def expert_usage(steps: pd.DataFrame, num_experts: int, last_fraction: float = 0.25) -> np.ndarray:
    """Share of gate mass per expert over the last part of training (where routing settled)."""
    cols = [f"usage_{e}" for e in range(num_experts)]
    tail = steps.iloc[int(len(steps) * (1 - last_fraction)) :]
    mass = tail[cols].to_numpy(dtype=float).sum(0)
    return mass / max(mass.sum(), 1e-12)


def modality_reliance(usage: np.ndarray, experts: list[dict], modalities: list[str]) -> np.ndarray:
    """Template weight mass per modality, weighted by expert usage. Complementary experts count
    their gated pair as half each (the gate's average) plus delta on the rest."""
    total = np.zeros(len(modalities))
    for share, e in zip(usage, experts, strict=True):
        w = np.array(e["modality_mass"], dtype=float)
        total += share * w
    return total / max(total.sum(), 1e-12)


def make_plots(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = pd.read_csv(run_dir / "metrics.csv")
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps["step"], steps["loss"], label="total loss", lw=1)
    ax.plot(steps["step"], steps["bpr"], label="BPR loss", lw=1)
    ax.set(xlabel="training step", ylabel="loss (per pair)", title="Training loss")
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))

    evals_path = run_dir / "evaluations.csv"
    if evals_path.exists():
        evals = pd.read_csv(evals_path)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(evals["epoch"], evals["valid.recall@20"], marker="o", label="valid Recall@20")
        if "valid.ndcg@20" in evals:
            ax.plot(evals["epoch"], evals["valid.ndcg@20"], marker="s", label="valid NDCG@20")
        ax.set(xlabel="epoch", ylabel="metric value", title="Validation metrics per evaluation")
        ax.legend()
        written.append(_save(fig, out_dir / "valid_recall.png"))

    experts_path = run_dir / "experts.json"
    if "h_use" in steps and experts_path.exists():
        info = json.loads(experts_path.read_text())
        experts, modalities = info["experts"], info["modalities"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps["step"], steps["h_use"], label="H_use (utilisation entropy)", lw=1)
        ax.plot(steps["step"], steps["h_conf"], label="H_conf (per-token entropy)", lw=1)
        if "h_load" in steps:  # the hard Top-K assignments: the one that shows a collapse
            ax.plot(steps["step"], steps["h_load"], label="H_load (Top-K assignments)", lw=1.5)
        if "ema_trigger" in steps:
            ax.plot(steps["step"], steps["ema_trigger"], label="EMA the trigger watches", ls="--")
        elif "ema_h_use" in steps:  # runs from before routing.trigger_on
            ax.plot(steps["step"], steps["ema_h_use"], label="EMA of H_use", lw=1, ls="--")
        tau = _routing_setting(run_dir, "tau")
        if tau is not None:
            ax.axhline(tau, color="gray", lw=0.8, ls="-.", label=f"tau = {tau}")
        switch = steps.loc[steps["stage"] == 1, "step"]
        if len(switch):
            ax.axvline(
                switch.iloc[0], color="k", ls=":", label=f"stage switch (step {switch.iloc[0]})"
            )
        ax.set(
            xlabel="training step",
            ylabel="normalised entropy (0..1)",
            title="Routing entropies (coverage -> specialisation)",
            ylim=(0, 1.05),
        )
        ax.legend(loc="best", fontsize=8)
        written.append(_save(fig, out_dir / "routing_entropy.png"))

        usage = expert_usage(steps, len(experts))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
        colours = [FAMILY_COLOURS.get(e["family"], "tab:gray") for e in experts]
        ax1.bar(range(len(experts)), usage * 100, color=colours)
        ax1.set_xticks(
            range(len(experts)), [e["name"] for e in experts], rotation=60, ha="right", fontsize=7
        )
        ax1.set(ylabel="share of gate mass (%)", title="Expert usage (last 25% of steps)")
        families = list(dict.fromkeys(e["family"] for e in experts))
        fam_share = [usage[[e["family"] == f for e in experts]].sum() * 100 for f in families]
        ax2.bar(families, fam_share, color=[FAMILY_COLOURS.get(f, "tab:gray") for f in families])
        ax2.set(ylabel="share of gate mass (%)", title="Per family")
        ax2.tick_params(axis="x", labelrotation=30)
        written.append(_save(fig, out_dir / "expert_usage.png"))

        reliance = modality_reliance(usage, experts, modalities)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar(modalities, reliance * 100, color="tab:purple")
        ax.set(ylabel="template weight mass (%)", title="Modality reliance of the MoE head")
        written.append(_save(fig, out_dir / "modality_reliance.png"))
    return written


def _routing_setting(run_dir: Path, key: str):
    """``routing.<key>`` from the run's config.yaml, or None (no file, or an old layout)."""
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())["routing"][key]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
