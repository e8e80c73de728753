"""Checkpoints of the distributed trainer: each worker saves and restores only its shard, a
restarted worker group resumes its :class:`~magnet_dist.train.worker_state.Progress`, and
every report to Ray Train (with a checkpoint when one is due) goes through :func:`report`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.errors import record_fault
from magnet_dist.parallel.device import collective_tensor
from magnet_dist.train.cluster import WorkerContext
from magnet_dist.train.common import EarlyStopping, epoch_routing, truncate_evaluations
from magnet_dist.train.worker_state import Optimizers, Progress, WorkerRun


def checkpoint_due(step: int, every_steps: int, every_minutes: float, since: float) -> bool:
    """Whether a mid-epoch checkpoint is due after ``step``: every ``every_steps`` steps, or
    once ``every_minutes`` of wall clock have passed since ``since`` (``time.monotonic()`` of
    the last checkpoint). Rank 0's clock decides and is broadcast, so every rank reports on
    the same step (one tiny collective per step, only with ``every_minutes``)."""
    due = bool(every_steps) and step % every_steps == 0
    if every_minutes:
        late = collective_tensor([float(time.monotonic() - since >= 60.0 * every_minutes)])
        dist.broadcast(late, src=0)
        due = due or bool(late.item())
    return due


def epoch_checkpoint_due(cfg: Config, epoch: int) -> bool:
    """Whether ``epoch`` ends with a checkpoint: every ``train.checkpoint_every`` epochs and
    after the last."""
    return (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs


def restore_progress(run: WorkerRun) -> Progress:
    """The loop state to start from: that of Ray Train's latest checkpoint (a restarted worker
    group), else a fresh one. What an earlier attempt logged after its step goes."""
    import ray.train

    progress = Progress(EarlyStopping(run.cfg.train.patience))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ck_dir:
            ck = load_worker_checkpoint(
                Path(ck_dir), run.ctx, run.model, run.client, run.optim, run.cfg
            )
        progress.load_state_dict(ck, run.cfg.train.epochs)
        if run.ctx.rank == 0:
            message = (
                f"resumed at epoch {progress.epoch}, batch {progress.batch}, step {progress.step}"
            )
            print(f"[distributed] {message}", flush=True)
            record_fault(message, kind="resume")
    # what an earlier attempt logged after this step goes (all of it when a restarted group
    # has no checkpoint yet: it starts again from step 0)
    run.log.resume_at(progress.step)
    if run.ctx.rank == 0:
        truncate_evaluations(run.run_dir, progress.step)
    progress.checkpointed_at = time.monotonic()  # for train.checkpoint_every_minutes
    progress.t0 = time.time()
    if run.ctx.rank == 0:  # resumed: the routing of the last completed epoch
        progress.routing = epoch_routing(run.run_dir, progress.epoch - 1)
    return progress


def report(run: WorkerRun, progress: Progress, metrics: dict, name: str | None = None) -> None:
    """Report ``metrics`` to Ray Train; with ``name``, together with a checkpoint of every
    worker's shard and ``progress.state_dict()`` (folder ``name`` in Ray's storage)."""
    import ray.train

    if name is None:
        ray.train.report(metrics)
        return
    progress.checkpointed_at = time.monotonic()
    run.log.flush()  # every step up to this one is in metrics.csv before it is registered
    with tempfile.TemporaryDirectory() as tmp:
        save_worker_checkpoint(
            Path(tmp), run.ctx, run.model, run.client, run.optim, progress.state_dict(), run.cfg
        )
        run.faults.in_checkpoint(progress.step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
        )


def report_epoch(run: WorkerRun, progress: Progress, epoch: int, metrics: dict) -> None:
    """The end-of-epoch report: with a checkpoint when one is due or training stops."""
    due = epoch_checkpoint_due(run.cfg, epoch) or progress.should_stop
    report(run, progress, metrics, f"epoch-{epoch:05d}" if due else None)


def save_worker_checkpoint(
    directory: Path,
    ctx: WorkerContext,
    model,
    client,
    optim: Optimizers,
    extra: dict[str, Any],
    cfg,
) -> None:
    """Each worker writes only its shard: rank 0 the dense state; every rank its experts, its
    embedding rows and their sparse Adam state, then (last) its manifest of what it wrote."""
    from magnet_dist.parallel.checkpoint import dense_state_dict, save_expert_shard
    from magnet_dist.train.checkpoint import save_checkpoint, write_manifest

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if ctx.rank == 0:
        payload = {
            "model": dense_state_dict(model),
            "optimizer": optim.dense.state_dict(),
            **extra,
        }
        save_checkpoint(directory / "dense.pt", cfg, payload)
        written.append(directory / "dense.pt")
    if model.moe is not None:
        written.append(save_expert_shard(model.moe, directory, optimizer=optim.expert))
    written.append(client.save_embeddings(directory / "embeddings", ctx.rank, ctx.world))
    sparse = f"sparse-adam-rank{ctx.rank:03d}.pt"
    optim.sparse.save(directory / sparse)  # DGL appends _<rank>
    written += sorted(directory.glob(f"{sparse}_*"))
    write_manifest(directory, [p for p in written if p is not None], ctx.rank, ctx.world)


def load_worker_checkpoint(
    directory: Path, ctx: WorkerContext, model, client, optim: Optimizers, cfg
) -> dict:
    """Restore this worker's state from a checkpoint folder, once every file of it is
    verified (sizes and sha256 of every worker's manifest)."""
    from magnet_dist.parallel.checkpoint import load_dense_state_dict, load_expert_shard
    from magnet_dist.train.checkpoint import load_checkpoint, verify_checkpoint_dir

    verify_checkpoint_dir(directory)
    ck = load_checkpoint(directory / "dense.pt", cfg, resume=True)
    load_dense_state_dict(model, ck["model"])
    optim.dense.load_state_dict(ck["optimizer"])
    if model.moe is not None:
        load_expert_shard(model.moe, directory, optimizer=optim.expert)
    client.load_embeddings(directory / "embeddings", ctx.rank, ctx.world)
    optim.sparse.load(directory / f"sparse-adam-rank{ctx.rank:03d}.pt")
    dist.barrier()
    return ck
