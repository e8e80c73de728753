"""One training step of a distributed worker (the twin of ``reference.train_step``), and the
pieces it is made of: the batch plan, the per-step seed, the sampled loss, the collectives."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from magnet_dist.model.magnet import LossOutput, MagnetModel
from magnet_dist.model.schedule import ScheduleState, advance, trigger_signal
from magnet_dist.parallel.device import collective_tensor
from magnet_dist.train.batches import batch_rng
from magnet_dist.train.history import History, refresh_from_client
from magnet_dist.train.reference import select
from magnet_dist.train.step_clock import StepClock, maybe_part
from magnet_dist.train.worker_state import Progress, WorkerRun


def sampled_loss(
    model: MagnetModel,
    client,
    users: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    fanouts: list[int],
    state: ScheduleState,
    reduce_stats=None,
    seed: int | None = None,
    device: torch.device | None = None,
    history: History | None = None,
    clock: StepClock | None = None,
) -> LossOutput:
    """The loss of one batch on neighbour-sampled blocks (both views from one sampling pass).

    ``neg`` is ``[B, n_neg]``; ids are the dataset's 0-based ids. ``seed``: the neighbour
    sample is a pure function of it (see :func:`step_seed`). ``device``: the model's
    (:func:`~magnet_dist.parallel.device.worker_device`); sampling stays on the CPU, the blocks
    and the embedding rows move there (the rows' gradients, and so DGL's sparse optimizer
    step, follow them). ``history``: ``fanouts`` is one hop, and the deeper layers of the
    output nodes come from this table (train/history.py). ``clock``: the parts are timed
    (sampling, history rows, embedding fetch; the rest counts as the forward)."""
    n = users.numel()
    items = torch.cat([pos, neg.reshape(-1)])
    with maybe_part(clock, "sampling"):
        blocks = client.sample_blocks(
            users, items, fanouts, model.cfg.train.sample_rescale, seed=seed
        )
    deep = None
    if history is not None:
        with maybe_part(clock, "history_rows"):
            deep = history.rows(
                client.to_orig_ids("user", blocks.output_users),
                client.to_orig_ids("item", blocks.output_items),
            )
    if device is not None and device.type != "cpu":
        blocks = blocks.to(device)
        deep = {v: t.to(device) for v, t in deep.items()} if deep is not None else None
    with maybe_part(clock, "embedding_fetch"):
        emb = client.input_embeddings(blocks, device=device)
    reps = model.encode(
        blocks.hops, emb, blocks.features, blocks.is_item_in, blocks.is_item_out, deep
    )
    user_out = blocks.user_rows
    pos_out, neg_out = blocks.item_rows[:n], blocks.item_rows[n:]
    ego = emb[blocks.output_in_input[torch.cat([user_out, pos_out, neg_out])]]
    return model.loss(
        select(reps, user_out),
        select(reps, pos_out),
        select(reps, neg_out),
        ego,
        state,
        reduce_stats=reduce_stats,
    )


def plan_batches(
    num_local: int,
    max_local: int,
    batch_size: int,
    world: int,
    seed: int,
    epoch: int,
    rank: int,
    per_worker_batch: bool = False,
):
    """This worker's batches for one epoch: every local edge exactly once, in
    ``ceil(max_local / per-worker batch)`` steps (the same on every rank: the collectives need
    it; ``max_local`` = the most local edges of any rank); global batch ~ ``batch_size`` (or
    ``world * batch_size`` with ``per_worker_batch``)."""
    per_worker = batch_size if per_worker_batch else max(1, batch_size // world)
    steps = max(1, -(-max_local // per_worker))
    order = np.random.default_rng([seed, epoch, rank]).permutation(num_local)
    return np.array_split(order, steps)


def epoch_plan(run: WorkerRun, epoch: int) -> list[np.ndarray]:
    """:func:`plan_batches` for this worker and epoch, cut to ``train.max_steps_per_epoch``."""
    cfg = run.cfg
    plan = plan_batches(
        len(run.users_local),
        run.max_local,
        cfg.train.batch_size,
        run.ctx.world,
        cfg.train.seed,
        epoch,
        run.ctx.rank,
        cfg.train.batch_per_worker,
    )
    if cfg.train.max_steps_per_epoch:
        plan = plan[: cfg.train.max_steps_per_epoch]
    return plan


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The random state of one training step of one worker (neighbour sampling, torch RNG):
    a pure function of (seed, epoch, batch, rank), so a run is reproducible and a resumed run
    draws what the uninterrupted one would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank, 13]).generate_state(1)[0])


def train_step(run: WorkerRun, progress: Progress, epoch: int, b: int, idx) -> StepResult:
    """Batch ``b`` (local edge indices ``idx``) of ``epoch``: seed, negatives, loss, backward,
    gradient all-reduce, optimizer steps, routing-schedule advance (checked to agree on every
    rank, in the same collective that averages the loss). Counts the step, its pairs, its
    seconds and their parts (``progress.clock``) in ``progress``."""
    from magnet_dist.parallel.reduce import allreduce_gradients, stats_all_reduce

    cfg, world, rank = run.cfg, run.ctx.world, run.ctx.rank
    if run.history is not None and run.history.due(progress.step, b == 0):
        refresh_history(run, progress.step)
    clock = progress.clock
    t_step = time.perf_counter()
    with clock.part("negatives"):
        u, p = run.users_local[idx], run.items_local[idx]
        neg = run.sampler.sample(
            u.numpy(), cfg.train.n_neg, batch_rng(cfg.train.seed, epoch, b * world + rank)
        )
    seed = step_seed(cfg.train.seed, epoch, b, rank)
    torch.manual_seed(seed)
    run.optim.zero_grad()
    with clock.part("forward"):
        out = sampled_loss(
            run.model,
            run.client,
            u,
            p,
            torch.from_numpy(neg),
            cfg.train.fanouts,
            progress.schedule,
            clock.timed("routing_stats_allreduce", stats_all_reduce())
            if run.model.moe is not None
            else None,
            seed=seed,
            device=run.device,
            history=run.history,
            clock=clock,
        )
    with clock.part("backward"):
        out.loss.backward()
    with clock.part("dense_allreduce"):
        allreduce_gradients(run.model)
    with clock.part("dense_optimizer"):
        run.optim.step_dense()
    with clock.part("sparse_optimizer"):
        run.optim.sparse.step()
    if out.stats is not None:
        progress.schedule = advance(
            progress.schedule, trigger_signal(out.stats, cfg.routing), cfg.routing
        )
    with clock.part("step_sync"):
        loss, bpr = sync_step([float(out.loss), float(out.bpr)], progress.schedule)
    progress.step += 1
    progress.pairs += len(idx) * world
    progress.step_seconds += time.perf_counter() - t_step
    clock.steps += 1
    return StepResult(out, loss, bpr)


@dataclass
class StepResult:
    """A step's loss terms and routing statistics on this rank, and the world-mean loss and
    BPR term (what the step log shows)."""

    out: LossOutput
    mean_loss: float
    mean_bpr: float


def refresh_history(run: WorkerRun, step: int) -> None:
    """Recompute the history table on rank 0 and broadcast it: after a barrier, so every
    rank's sparse embedding updates are in the rows it reads."""
    dist.barrier()
    if run.ctx.rank == 0:
        refresh_from_client(run.history, run.model, run.full_graph, run.client, step, run.device)
    run.history.share(step, run.model.encoder, source=0)
    if run.ctx.rank == 0 and run.show_progress:
        print(f"[history] refreshed before step {step} in {run.history.seconds:.1f} s so far")


def sync_step(values: list[float], state: ScheduleState) -> list[float]:
    """The world mean of ``values`` and a check that every worker is in the same routing stage
    with the same switch step, in one collective (an all-gather: each rank sees every rank's
    row), so a step ends with one synchronisation, not three."""
    mine = collective_tensor(
        [*values, float(state.stage == "specialisation"), float(state.switch_step or -1)]
    )
    world = dist.get_world_size()
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine)
    table = torch.stack(rows)
    stages = table[:, len(values) :]
    if not bool((stages == stages[0]).all()):
        raise RuntimeError(
            "workers disagree on the routing stage: (specialisation, switch step) per rank "
            f"{stages.cpu().tolist()}"
        )
    return table[:, : len(values)].mean(0).cpu().tolist()
