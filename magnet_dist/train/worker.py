"""The per-worker training loop of the distributed trainer (runs inside Ray Train workers).

Each worker: starts the graph server of its partition (if it is the partition's first worker),
joins the DGL cluster as a client, trains on its split of the training edges with
neighbour-sampled blocks of both views, and reduces everything global (dense gradients, routing
statistics, ranking sums) with torch.distributed, so every worker takes the same decisions
(stage switch, early stopping) on the same step.

:func:`train_loop_per_worker` reads like Ray Train's examples; its pieces live in
``cluster.py`` (the graph cluster), ``step.py`` (one step), ``sharded_eval.py`` (evaluation and
export), ``worker_checkpoint.py`` (checkpoints, resume, reports) and ``worker_state.py``
(:class:`WorkerRun`, :class:`Progress`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.errors import FAILURE_DIR, FAULT_ATTEMPT_ENV, FAULT_LOG_ENV
from magnet_dist.eval.scoring import SplitEvaluator
from magnet_dist.model.magnet import MagnetModel, parameter_groups
from magnet_dist.parallel.device import collective_tensor, worker_device
from magnet_dist.train.batches import NegativeSampler
from magnet_dist.train.cluster import GraphCluster, WorkerContext, graph_cluster
from magnet_dist.train.common import epoch_routing, expert_table, finish_run, step_row
from magnet_dist.train.faults import FaultHooks
from magnet_dist.train.library_output import quiet_ray_console
from magnet_dist.train.run_folder import StepLog, write_config, write_json_atomic
from magnet_dist.train.sharded_eval import evaluate_epoch
from magnet_dist.train.step import epoch_plan, train_step
from magnet_dist.train.worker_checkpoint import (
    checkpoint_due,
    epoch_checkpoint_due,
    report,
    report_epoch,
    restore_progress,
)
from magnet_dist.train.worker_state import Optimizers, Progress, WorkerRun


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: set up, for each epoch: for each batch: step; evaluate; report."""
    cfg, ctx, device = worker_setup(config)
    run_dir = Path(config["run_dir"])
    part_config, base_port = config["part_config"], int(config["base_port"])
    with graph_cluster(cfg, ctx, run_dir, part_config, base_port) as cluster:
        run = build_worker_run(config, cfg, ctx, device, cluster)
        progress = restore_progress(run)
        for epoch in range(progress.epoch, cfg.train.epochs):
            run_epoch(run, progress, epoch)
            metrics = end_epoch(run, progress, epoch)
            report_epoch(run, progress, epoch, metrics)
            if progress.should_stop:
                break
        run.log.close()
        final_metrics(run, progress)


def worker_setup(config: dict[str, Any]) -> tuple[Config, WorkerContext, torch.device]:
    """This worker's config, place in the group and device; threads, seed, console and fault
    log set."""
    import ray.train

    from magnet_dist.graph.dist import part_for_rank

    cfg = Config.model_validate(config["cfg"])
    run_dir = Path(config["run_dir"])
    tc = ray.train.get_context()
    world, rank = tc.get_world_size(), tc.get_world_rank()
    num_parts = int(config["num_parts"])
    ctx = WorkerContext(rank, world, part_for_rank(rank, world, num_parts), num_parts)
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker)))
    device = worker_device(cfg.train.use_gpu)
    torch.manual_seed(cfg.train.seed)
    quiet_ray_console()  # Ray's INFO lines stay in its session logs
    os.environ[FAULT_LOG_ENV] = str(run_dir / FAILURE_DIR / f"rank{rank}.log")
    os.environ[FAULT_ATTEMPT_ENV] = str(config.get("attempt") or "")
    return cfg, ctx, device


def build_worker_run(
    config: dict[str, Any],
    cfg: Config,
    ctx: WorkerContext,
    device: torch.device,
    cluster: GraphCluster,
) -> WorkerRun:
    """Dataset, model (and its experts), optimizers, embeddings, this worker's training edges,
    evaluators and step log; rank 0 writes config.yaml and experts.json."""
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.reduce import broadcast_parameters, split_parameters
    from magnet_dist.train.history import history_for

    run_dir = Path(config["run_dir"])
    rank, world, client = ctx.rank, ctx.world, cluster.client
    faults = FaultHooks({**os.environ, **config.get("faults", {})}, rank, ctx.part)
    ds = load_dataset(cfg.data.path)
    if cfg.moe.ep_size > 1 and cfg.model.use_moe:
        from magnet_dist.parallel.groups import init_deepspeed_comm

        init_deepspeed_comm()
    moe = (
        build_moe(cfg, ["behaviour", *ds.modalities], rank, world, seed=cfg.train.seed)
        if cfg.model.use_moe
        else None
    )
    model = MagnetModel(cfg, dict(ds.modalities), moe=moe).to(device)
    broadcast_parameters(model)
    client.init_embeddings(cfg.model.dim, init="xavier", seed=cfg.train.seed)
    emb_opt = client.sparse_optimizer(cfg.train.lr, update=cfg.train.sparse_update)
    dense_params, expert_params = split_parameters(model)
    expert_ids = {id(p) for p in expert_params}
    dense_groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in expert_ids]}
        for g in parameter_groups(model, cfg.moe.weight_decay)
    ]
    optim = Optimizers(
        dense=torch.optim.Adam(dense_groups, lr=cfg.train.lr),
        expert=torch.optim.Adam(expert_params, lr=cfg.train.lr, weight_decay=cfg.moe.weight_decay)
        if expert_params
        else None,
        sparse=emb_opt,
    )
    tu, ti = ds.pairs(0)
    sampler = NegativeSampler(tu, ti, ds.num_items)
    users_local, items_local = client.train_edges(rank)
    evaluators = (
        {
            "valid": SplitEvaluator(ds, 1, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk),
            "test": SplitEvaluator(ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk),
        }
        if cfg.eval.in_loop
        else {}
    )
    # train.history (else None, None): rank 0 computes the table, the others receive it
    history, full_graph = history_for(cfg, ds, computes=rank == 0)
    log = StepLog(run_dir, enabled=rank == 0)
    if rank == 0:
        write_config(run_dir, cfg)
        if model.moe is not None:
            write_json_atomic(
                run_dir / "experts.json",
                expert_table(model, list(build_dense_moe_for_table(cfg, model))),
            )
    # every rank takes as many steps per epoch as the rank with the most local edges
    max_local = collective_tensor([len(users_local)], dtype=torch.int64)
    dist.all_reduce(max_local, op=dist.ReduceOp.MAX)
    return WorkerRun(
        cfg=cfg,
        ctx=ctx,
        run_dir=run_dir,
        device=device,
        client=client,
        servers=cluster.servers,
        model=model,
        optim=optim,
        sampler=sampler,
        users_local=users_local,
        items_local=items_local,
        max_local=int(max_local),
        evaluators=evaluators,
        log=log,
        faults=faults,
        show_progress=bool(config.get("progress")) and rank == 0,
        history=history,
        full_graph=full_graph,
    )


def run_epoch(run: WorkerRun, progress: Progress, epoch: int) -> None:
    """The steps of ``epoch`` from ``progress.batch`` on (a resumed epoch goes on there): per
    step the log row, the fault hooks, and a mid-epoch checkpoint when one is due."""
    cfg = run.cfg
    plan = epoch_plan(run, epoch)
    first = progress.batch or 0
    progress.epoch = epoch
    # the epoch's own checkpoint comes after its evaluation (end_epoch)
    epoch_checkpoint = epoch_checkpoint_due(cfg, epoch)
    bar = _bar(len(plan) - first, f"epoch {epoch}", run.show_progress)
    for b in range(first, len(plan)):
        result = train_step(run, progress, epoch, b, plan[b])
        progress.batch = b + 1  # the next batch of this epoch's plan
        row = step_row(progress.step, epoch, result.out, progress.schedule)
        row["loss"], row["bpr"] = result.mean_loss, result.mean_bpr
        run.log.log(row)
        if bar is not None:
            bar.update(1)
        run.faults.after_step(progress.step, run.servers)
        end_of_epoch = b + 1 == len(plan)
        due = checkpoint_due(
            progress.step,
            cfg.train.checkpoint_every_steps,
            cfg.train.checkpoint_every_minutes,
            progress.checkpointed_at,
        )
        if due and not (end_of_epoch and epoch_checkpoint):
            report(
                run, progress, {"epoch": epoch, "step": progress.step}, f"step-{progress.step:08d}"
            )
    if bar is not None:
        bar.close()
    run.log.flush()
    progress.batch = None  # the epoch's steps are done; its evaluation follows


def end_epoch(run: WorkerRun, progress: Progress, epoch: int) -> dict[str, float]:
    """The epoch's routing (rank 0, from metrics.csv), evaluation, selection and export;
    returns the metrics to report."""
    progress.routing = epoch_routing(run.run_dir, epoch) if run.ctx.rank == 0 else None
    evals = evaluate_epoch(run, progress, epoch)
    return {"epoch": epoch, "step": progress.step, **evals}


def final_metrics(run: WorkerRun, progress: Progress) -> None:
    """Rank 0 writes metrics.json (the test numbers of the epoch chosen on validation, the
    routing, the throughput) and the plots."""
    wall = time.time() - progress.t0
    step_parts = [None] * run.ctx.world  # every rank's, so imbalance and waiting show
    clock = progress.clock
    dist.all_gather_object(step_parts, {"wall": clock.means(), "cpu": clock.means(cpu=True)})
    if run.ctx.rank != 0:
        return
    cfg, state, stopper = run.cfg, progress.schedule, progress.stopper
    final = {
        **progress.best_metrics,
        "best_epoch": stopper.best_epoch,
        "steps": progress.step,
        "train_seconds": wall,
        # training steps only (sampling, compute, communication); no eval/checkpoints
        "pairs_per_second": progress.pairs / max(progress.step_seconds, 1e-9),
        **history_metrics(run, progress),
        # per rank: mean wall and CPU seconds per step of each part (a collective's wall time
        # includes waiting for the slowest rank)
        "step_parts": step_parts,
        "stage": state.stage,
        "switch_step": state.switch_step,
        "switch_forced": state.forced,
        "trigger_on": cfg.routing.trigger_on,
        "routing": {"final": progress.routing, "best_epoch": stopper.best_info},
        "fusion_lambda": dict(
            zip(run.model.modalities, run.model.encoder.fusion_weights.tolist(), strict=True)
        ),
        "trainer": "distributed",
        "workers": run.ctx.world,
        "partitions": run.ctx.num_parts,
        "ep_size": cfg.moe.ep_size,
    }
    finish_run(run.run_dir, final)


def history_metrics(run: WorkerRun, progress: Progress) -> dict[str, Any]:
    """The history mode's refreshes and their cost, and the throughput with them counted."""
    h = run.history
    if h is None:
        return {}
    return {
        "history_refreshes": h.refreshes,
        "history_refresh_seconds": h.seconds,
        "pairs_per_second_with_refresh": progress.pairs
        / max(progress.step_seconds + run.history_seconds, 1e-9),
    }


def build_dense_moe_for_table(cfg: Config, model: MagnetModel):
    """The global expert list (names/families) for experts.json, whatever the sharding."""
    from magnet_dist.model.magnet import build_dense_moe

    return build_dense_moe(cfg, model.modalities).experts


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)
