"""Evaluation of the distributed trainer: every worker ranks its share of users against all
items (sums merged exactly), the model chosen on validation is exported, and when."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.eval.metrics import RankingSums
from magnet_dist.eval.scoring import ranking_score_fn
from magnet_dist.model.magnet import MagnetModel
from magnet_dist.parallel.device import collective_device
from magnet_dist.train.cluster import WorkerContext
from magnet_dist.train.common import SELECTION_METRIC, append_evaluation
from magnet_dist.train.worker_state import Progress, WorkerRun


def evaluation_due(cfg: Config, epoch: int) -> bool:
    """Whether ``epoch`` ends with a ranking evaluation: every ``train.eval_every`` epochs and
    after the last (with ``eval.in_loop``)."""
    last = epoch + 1 == cfg.train.epochs
    return cfg.eval.in_loop and ((epoch + 1) % cfg.train.eval_every == 0 or last)


def evaluate_epoch(run: WorkerRun, progress: Progress, epoch: int) -> dict[str, float]:
    """The end-of-epoch evaluation: rank (when due), select on validation, export the chosen
    model. Without ``eval.in_loop`` the final model is the exported one. Returns the ranking
    metrics (empty when none ran)."""
    cfg, ctx = run.cfg, run.ctx
    if not cfg.eval.in_loop:
        last = epoch + 1 == cfg.train.epochs
        if last or cfg.eval.snapshot_every_epoch:
            scorer = dense_eval_model(run.model, cfg, ctx.world)
        if cfg.eval.snapshot_every_epoch:
            export_best(run.run_dir, cfg, scorer, run.client, ctx, epoch, f"epoch-{epoch}.pt")
            if ctx.rank == 0:
                record_snapshot(run, progress, epoch)
        if last:  # no ranking in the loop: the final model is exported
            progress.stopper.best_epoch, progress.stopper.best_info = epoch, progress.routing
            export_best(run.run_dir, cfg, scorer, run.client, ctx, epoch)
        return {}
    if not evaluation_due(cfg, epoch):
        return {}
    # one gather of the experts serves both the ranking and the export below
    scorer = dense_eval_model(run.model, cfg, ctx.world)
    evals = evaluate_sharded(scorer, run.client, ctx, run.evaluators)
    if ctx.rank == 0:
        append_evaluation(
            run.run_dir,
            {
                "epoch": epoch,
                "step": progress.step,
                **{k: v for k, v in evals.items() if k.startswith("valid.")},
            },
        )
    if progress.stopper.update(epoch, evals[SELECTION_METRIC], progress.routing):
        progress.best_metrics = evals  # test numbers of the epoch chosen on validation
        export_best(run.run_dir, cfg, scorer, run.client, ctx, epoch)
    if ctx.rank == 0:
        print(
            f"[distributed] epoch {epoch} step {progress.step} valid recall@20 {evals[SELECTION_METRIC]:.4f} stage {progress.schedule.stage}",
            flush=True,
        )
    return evals


def gather_items(item_reps: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """All workers' item shards, concatenated in rank order (shards are contiguous ranges)."""
    out = {}
    for m, h in item_reps.items():
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, h)
        out[m] = torch.cat(parts)
    return out


def dense_eval_model(model: MagnetModel, cfg: Config, world: int) -> MagnetModel:
    """A single-process copy for scoring: with expert parallelism, every rank gathers all
    experts (they are small) so ranking needs no collective per score call."""
    if model.moe is None or not hasattr(model.moe, "local_experts"):
        # ranking runs on the CPU (DGL's full-neighbourhood blocks are CPU tensors)
        return model if _on_cpu(model) else copy.deepcopy(model).cpu().eval()
    from magnet_dist.parallel.checkpoint import dense_state_dict, expert_shard_state

    dense = MagnetModel(cfg, model.content_dims)
    dense.load_state_dict({k: v.cpu() for k, v in dense_state_dict(model).items()}, strict=False)
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, expert_shard_state(model.moe))
    for shard_state in shards:
        for gid, sd in shard_state["experts"].items():
            dense.moe.experts[int(gid)].load_state_dict({k: v.cpu() for k, v in sd.items()})
    dense.eval()
    return dense


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def evaluate_sharded(scorer, client, ctx: WorkerContext, evaluators: dict) -> dict[str, float]:
    """Each worker ranks its share of users against all items with ``scorer`` (the model from
    ``dense_eval_model``); sums are merged exactly."""
    from magnet_dist.graph.dist import shard

    my_users = shard(client.num_users, ctx.rank, ctx.world)
    my_items = shard(client.num_items, ctx.rank, ctx.world)
    user_reps, item_reps = client.full_representations(scorer, users=my_users, items=my_items)
    item_reps = gather_items(item_reps, ctx.world)
    first = int(my_users[0]) if my_users.numel() else 0
    offset_reps = {m: torch.zeros(first, h.shape[1]) for m, h in user_reps.items()}
    user_reps = {m: torch.cat([offset_reps[m], h]) for m, h in user_reps.items()}
    score_fn = ranking_score_fn(scorer, user_reps, item_reps)
    metrics: dict[str, float] = {}
    lo, hi = first, first + my_users.numel()
    for prefix, ev in evaluators.items():
        users = ev.users[(ev.users >= lo) & (ev.users < hi)]
        sums = ev.sums(score_fn, users=users) if users.size else RankingSums.empty(ev.ks)
        flat = sums.to_tensor().to(collective_device())
        dist.all_reduce(flat)
        metrics.update(RankingSums.from_tensor(flat.cpu(), ev.ks).metrics(prefix))
    return metrics


def record_snapshot(run: WorkerRun, progress: Progress, epoch: int) -> None:
    """One row of snapshots.csv: the exported epoch, its step, and the training seconds and
    pairs so far in this attempt (steps and history refreshes; no evaluation or checkpoints)."""
    import csv

    seconds = progress.step_seconds + run.history_seconds
    path = run.run_dir / "snapshots.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["epoch", "step", "train_seconds", "pairs", "checkpoint"])
        w.writerow([epoch, progress.step, f"{seconds:.3f}", progress.pairs, f"epoch-{epoch}.pt"])


def export_best(
    run_dir: Path,
    cfg: Config,
    scorer,
    client,
    ctx: WorkerContext,
    epoch: int,
    name: str = "best.pt",
):
    """checkpoints/<name> (best.pt) in the reference trainer's format (``scorer`` = the dense
    model with every expert, one embedding table users-then-items), so evaluate/recommend work
    for either trainer."""
    from magnet_dist.train.checkpoint import save_checkpoint

    if ctx.rank != 0:
        return
    users = client.embeddings("user", torch.arange(client.num_users))
    items = client.embeddings("item", torch.arange(client.num_items))
    save_checkpoint(
        run_dir / "checkpoints" / name,
        cfg,
        {
            "model": scorer.state_dict(),
            "embeddings": {"weight": torch.cat([users, items])},
            "epoch": epoch,
        },
    )
