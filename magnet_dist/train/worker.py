"""The per-worker training loop of the distributed trainer (runs inside Ray Train workers).

Each worker: starts the graph server of its partition (if it is the partition's first worker),
joins the DGL cluster as a client, trains on its split of the training edges with
neighbour-sampled blocks of both views, and reduces everything global (dense gradients, routing
statistics, ranking sums) with torch.distributed, so every worker takes the same decisions
(stage switch, early stopping) on the same step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.eval.metrics import RankingSums
from magnet_dist.eval.scoring import SplitEvaluator, ranking_score_fn
from magnet_dist.model.magnet import LossOutput, MagnetModel
from magnet_dist.model.schedule import ScheduleState, advance
from magnet_dist.train.batches import NegativeSampler, batch_rng
from magnet_dist.train.common import (
    SELECTION_METRIC,
    EarlyStopping,
    append_evaluation,
    expert_table,
    finish_run,
    step_row,
)
from magnet_dist.train.run_folder import StepLog, write_config, write_json_atomic


@dataclass
class WorkerContext:
    rank: int
    world: int
    part: int
    num_parts: int


def select(reps: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {m: v[rows] for m, v in reps.items()}


def sampled_loss(
    model: MagnetModel,
    client,
    users: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    fanouts: list[int],
    state: ScheduleState,
    reduce_stats=None,
) -> LossOutput:
    """The loss of one batch on neighbour-sampled blocks (both views from one sampling pass).

    ``neg`` is ``[B, n_neg]``; ids are the dataset's 0-based ids."""
    n = users.numel()
    items = torch.cat([pos, neg.reshape(-1)])
    blocks = client.sample_blocks(users, items, fanouts, model.cfg.train.sample_rescale)
    emb = client.input_embeddings(blocks)
    reps = model.encode(blocks.hops, emb, blocks.features, blocks.is_item_in, blocks.is_item_out)
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


def epoch_plan(num_local: int, batch_size: int, world: int, seed: int, epoch: int, rank: int):
    """This worker's batches for one epoch: the same number of steps on every worker (the
    collectives need it), every local edge exactly once, global batch ~ ``batch_size``."""
    counts = torch.tensor([num_local], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    per_worker = max(1, batch_size // world)
    steps = max(1, -(-int(counts) // per_worker))
    order = np.random.default_rng([seed, epoch, rank]).permutation(num_local)
    return np.array_split(order, steps)


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
        return model
    from magnet_dist.parallel.checkpoint import dense_state_dict, expert_shard_state

    dense = MagnetModel(cfg, model.content_dims)
    dense.load_state_dict(dense_state_dict(model), strict=False)
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, expert_shard_state(model.moe))
    for shard_state in shards:
        for gid, sd in shard_state["experts"].items():
            dense.moe.experts[int(gid)].load_state_dict(sd)
    dense.eval()
    return dense


def evaluate_sharded(model, cfg, client, ctx: WorkerContext, evaluators: dict) -> dict[str, float]:
    """Each worker ranks its share of users against all items; sums are merged exactly."""
    from magnet_dist.graph.dist import shard

    scorer = dense_eval_model(model, cfg, ctx.world)
    my_users = shard(client.num_users, ctx.rank, ctx.world)
    my_items = shard(client.num_items, ctx.rank, ctx.world)
    user_reps, item_reps = client.full_representations(model, users=my_users, items=my_items)
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
        flat = sums.to_tensor()
        dist.all_reduce(flat)
        metrics.update(RankingSums.from_tensor(flat, ev.ks).metrics(prefix))
    return metrics


def assert_same_schedule(state: ScheduleState) -> None:
    """Every worker must be in the same stage with the same switch step (cheap all-reduce)."""
    code = torch.tensor(
        [float(state.stage == "specialisation"), float(state.switch_step or -1)],
        dtype=torch.float64,
    )
    lo, hi = code.clone(), code.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"workers disagree on the routing stage: min {lo}, max {hi}")


def mean_over_workers(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def start_partition_server(cfg: Config, ctx: WorkerContext, part_config: Path, base_port: int):
    """The first worker of each partition starts that partition's graph server on its own node;
    every worker then writes the same ip_config (addresses all-gathered), so the same code runs
    on one host and on many."""
    import ray

    from magnet_dist.graph.servers import start_servers, write_ip_config

    per_part = ctx.world // ctx.num_parts
    owner = ctx.rank % per_part == 0
    ip = ray.util.get_node_ip_address()
    entries: list[Any] = [None] * ctx.world
    dist.all_gather_object(entries, (ctx.part, ip) if owner else None)
    hosts = {part: host for part, host in (e for e in entries if e is not None)}
    workdir = Path(tempfile.mkdtemp(prefix=f"magnet-worker{ctx.rank}-"))
    ip_config = write_ip_config(
        workdir / "ip_config.txt", [(hosts[p], base_port + p) for p in range(ctx.num_parts)]
    )
    group = None
    if owner:
        group = start_servers(
            part_config,
            parts=[ctx.part],
            num_clients=ctx.world,
            ip_config=ip_config,
            log_dir=workdir,
            timeout_s=cfg.trainer.server_timeout_s,
        )
    dist.barrier()
    return group, ip_config, workdir


def save_worker_checkpoint(
    directory: Path, ctx: WorkerContext, model, client, opts: dict, emb_opt, extra: dict, cfg
) -> None:
    """Each worker writes only its shard: rank 0 the dense state; every rank its experts, its
    embedding rows and their sparse Adam state."""
    from magnet_dist.parallel.checkpoint import dense_state_dict, save_expert_shard
    from magnet_dist.train.checkpoint import save_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        payload = {
            "model": dense_state_dict(model),
            "optimizer": opts["dense"].state_dict(),
            **extra,
        }
        save_checkpoint(directory / "dense.pt", cfg, payload)
    if model.moe is not None:
        save_expert_shard(model.moe, directory, optimizer=opts.get("expert"))
    client.save_embeddings(directory / "embeddings", ctx.rank, ctx.world)
    emb_opt.save(directory / f"sparse-adam-rank{ctx.rank:03d}.pt")


def load_worker_checkpoint(directory: Path, ctx, model, client, opts, emb_opt, cfg) -> dict:
    from magnet_dist.parallel.checkpoint import load_dense_state_dict, load_expert_shard
    from magnet_dist.train.checkpoint import load_checkpoint

    ck = load_checkpoint(directory / "dense.pt", cfg)
    load_dense_state_dict(model, ck["model"])
    opts["dense"].load_state_dict(ck["optimizer"])
    if model.moe is not None:
        load_expert_shard(model.moe, directory, optimizer=opts.get("expert"))
    client.load_embeddings(directory / "embeddings", ctx.rank, ctx.world)
    emb_opt.load(directory / f"sparse-adam-rank{ctx.rank:03d}.pt")
    dist.barrier()
    return ck


def export_best(run_dir: Path, cfg: Config, model, client, ctx: WorkerContext, epoch: int):
    """checkpoints/best.pt in the reference trainer's format (dense model with every expert,
    one embedding table users-then-items), so evaluate/recommend work for either trainer."""
    from magnet_dist.train.checkpoint import save_checkpoint

    scorer = dense_eval_model(model, cfg, ctx.world)
    if ctx.rank != 0:
        return
    users = client.embeddings("user", torch.arange(client.num_users))
    items = client.embeddings("item", torch.arange(client.num_items))
    save_checkpoint(
        run_dir / "checkpoints" / "best.pt",
        cfg,
        {
            "model": scorer.state_dict(),
            "embeddings": {"weight": torch.cat([users, items])},
            "epoch": epoch,
        },
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: set up, for each epoch: for each batch: step; evaluate; report."""
    import ray.train

    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.graph.dist import connect, part_for_rank
    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.reduce import (
        allreduce_gradients,
        broadcast_parameters,
        split_parameters,
        stats_all_reduce,
    )

    cfg = Config.model_validate(config["cfg"])
    run_dir = Path(config["run_dir"])
    tc = ray.train.get_context()
    world, rank = tc.get_world_size(), tc.get_world_rank()
    num_parts = int(config["num_parts"])
    ctx = WorkerContext(rank, world, part_for_rank(rank, world, num_parts), num_parts)
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    progress = bool(config.get("progress")) and rank == 0

    servers, ip_config, workdir = start_partition_server(
        cfg, ctx, Path(config["part_config"]), int(config["base_port"])
    )
    client = connect(
        config["part_config"],
        ip_config,
        ctx.part,
        num_parts,
        timeout_s=cfg.trainer.server_timeout_s,
    )
    try:
        ds = load_dataset(cfg.data.path)
        if cfg.moe.ep_size > 1 and cfg.model.use_moe:
            from magnet_dist.parallel.groups import init_deepspeed_comm

            init_deepspeed_comm()
        moe = (
            build_moe(cfg, ["behaviour", *ds.modalities], rank, world, seed=cfg.train.seed)
            if cfg.model.use_moe
            else None
        )
        model = MagnetModel(cfg, dict(ds.modalities), moe=moe)
        broadcast_parameters(model)
        client.init_embeddings(cfg.model.dim, init="xavier", seed=cfg.train.seed)
        emb_opt = client.sparse_optimizer(cfg.train.lr)
        dense_params, expert_params = split_parameters(model)
        opts = {"dense": torch.optim.Adam(dense_params, lr=cfg.train.lr)}
        if expert_params:
            opts["expert"] = torch.optim.Adam(expert_params, lr=cfg.train.lr)

        tu, ti = ds.pairs(0)
        sampler = NegativeSampler(tu, ti, ds.num_items)
        users_local, items_local = client.train_edges(rank)
        evaluators = {
            "valid": SplitEvaluator(ds, 1, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk),
            "test": SplitEvaluator(ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk),
        }
        stopper = EarlyStopping(cfg.train.patience)
        state, step, start_epoch, best_metrics = ScheduleState(), 0, 0, {}
        log = StepLog(run_dir, enabled=rank == 0)
        if rank == 0:
            write_config(run_dir, cfg)
            if model.moe is not None:
                write_json_atomic(
                    run_dir / "experts.json",
                    expert_table(model, list(build_dense_moe_for_table(cfg, model))),
                )
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as ck_dir:
                ck = load_worker_checkpoint(Path(ck_dir), ctx, model, client, opts, emb_opt, cfg)
            state = ScheduleState.from_dict(ck["schedule"])
            stopper.load_state_dict(ck["early_stopping"])
            step, start_epoch, best_metrics = ck["step"], ck["epoch"] + 1, ck["best_metrics"]
            log.resume_at(step)
            if rank == 0:
                print(f"[distributed] resumed at epoch {start_epoch}, step {step}")

        t0, pairs, step_seconds = time.time(), 0, 0.0
        for epoch in range(start_epoch, cfg.train.epochs):
            plan = epoch_plan(
                len(users_local), cfg.train.batch_size, world, cfg.train.seed, epoch, rank
            )
            if cfg.train.max_steps_per_epoch:
                plan = plan[: cfg.train.max_steps_per_epoch]
            bar = _bar(len(plan), f"epoch {epoch}", progress)
            for b, idx in enumerate(plan):
                t_step = time.perf_counter()
                u, p = users_local[idx], items_local[idx]
                neg = sampler.sample(
                    u.numpy(), cfg.train.n_neg, batch_rng(cfg.train.seed, epoch, b * world + rank)
                )
                for opt in opts.values():
                    opt.zero_grad(set_to_none=True)
                out = sampled_loss(
                    model,
                    client,
                    u,
                    p,
                    torch.from_numpy(neg),
                    cfg.train.fanouts,
                    state,
                    stats_all_reduce() if model.moe is not None else None,
                )
                out.loss.backward()
                allreduce_gradients(model)
                for opt in opts.values():
                    opt.step()
                emb_opt.step()
                if out.stats is not None:
                    state = advance(state, float(out.stats.h_use()), cfg.routing)
                    assert_same_schedule(state)
                step += 1
                pairs += len(idx) * world
                step_seconds += time.perf_counter() - t_step
                row = step_row(step, epoch, out, state)
                row["loss"], row["bpr"] = mean_over_workers([row["loss"], row["bpr"]])
                log.log(row)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            log.flush()
            metrics: dict[str, float] = {"epoch": epoch, "step": step}
            last = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.train.eval_every == 0 or last:
                evals = evaluate_sharded(model, cfg, client, ctx, evaluators)
                metrics.update(evals)
                if rank == 0:
                    append_evaluation(
                        run_dir,
                        {
                            "epoch": epoch,
                            "step": step,
                            **{k: v for k, v in evals.items() if k.startswith("valid.")},
                        },
                    )
                if stopper.update(epoch, evals[SELECTION_METRIC]):
                    best_metrics = evals  # test numbers of the epoch chosen on validation
                    export_best(run_dir, cfg, model, client, ctx, epoch)
                if rank == 0:
                    print(
                        f"[distributed] epoch {epoch} step {step} valid recall@20 {evals[SELECTION_METRIC]:.4f} stage {state.stage}",
                        flush=True,
                    )
            extra = {
                "schedule": state.to_dict(),
                "early_stopping": stopper.state_dict(),
                "step": step,
                "epoch": epoch,
                "best_metrics": best_metrics,
            }
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or last or stopper.should_stop:
                with tempfile.TemporaryDirectory() as tmp:
                    save_worker_checkpoint(Path(tmp), ctx, model, client, opts, emb_opt, extra, cfg)
                    ray.train.report(
                        metrics,
                        checkpoint=ray.train.Checkpoint.from_directory(tmp),
                        checkpoint_dir_name=f"epoch-{epoch:05d}",
                    )
            else:
                ray.train.report(metrics)
            if stopper.should_stop:
                break
        log.close()
        wall = time.time() - t0
        if rank == 0:
            final = {
                **best_metrics,
                "best_epoch": stopper.best_epoch,
                "steps": step,
                "train_seconds": wall,
                # training steps only (sampling, compute, communication); no eval/checkpoints
                "pairs_per_second": pairs / max(step_seconds, 1e-9),
                "stage": state.stage,
                "switch_step": state.switch_step,
                "switch_forced": state.forced,
                "fusion_lambda": dict(
                    zip(model.modalities, model.encoder.fusion_weights.tolist(), strict=True)
                ),
                "trainer": "distributed",
                "workers": world,
                "partitions": num_parts,
                "ep_size": cfg.moe.ep_size,
            }
            finish_run(run_dir, final)
    finally:
        client.close()
        if servers is not None:
            servers.wait(cfg.trainer.server_timeout_s)
            servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def build_dense_moe_for_table(cfg: Config, model: MagnetModel):
    """The global expert list (names/families) for experts.json, whatever the sharding."""
    from magnet_dist.model.magnet import build_dense_moe

    return build_dense_moe(cfg, model.modalities).experts


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)


os.environ.setdefault("DGLBACKEND", "pytorch")
