"""The per-worker training loop of the distributed trainer (runs inside Ray Train workers).

Each worker: starts the graph server of its partition (if it is the partition's first worker),
joins the DGL cluster as a client, trains on its split of the training edges with
neighbour-sampled blocks of both views, and reduces everything global (dense gradients, routing
statistics, ranking sums) with torch.distributed, so every worker takes the same decisions
(stage switch, early stopping) on the same step.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.errors import FAULT_ATTEMPT_ENV, FAULT_LOG_ENV, MagnetError, record_fault
from magnet_dist.eval.metrics import RankingSums
from magnet_dist.eval.scoring import SplitEvaluator, ranking_score_fn
from magnet_dist.model.magnet import LossOutput, MagnetModel, parameter_groups
from magnet_dist.model.schedule import ScheduleState, advance, trigger_signal
from magnet_dist.parallel.device import collective_device, collective_tensor, worker_device
from magnet_dist.train.batches import NegativeSampler, batch_rng
from magnet_dist.train.common import (
    SELECTION_METRIC,
    EarlyStopping,
    append_evaluation,
    epoch_routing,
    expert_table,
    finish_run,
    step_row,
    truncate_evaluations,
)
from magnet_dist.train.library_output import captured_output, quiet_ray_console
from magnet_dist.train.reference import select
from magnet_dist.train.run_folder import StepLog, write_config, write_json_atomic
from magnet_dist.train.worker_info import record_worker


@dataclass
class WorkerContext:
    rank: int
    world: int
    part: int
    num_parts: int


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
) -> LossOutput:
    """The loss of one batch on neighbour-sampled blocks (both views from one sampling pass).

    ``neg`` is ``[B, n_neg]``; ids are the dataset's 0-based ids. ``seed``: the neighbour
    sample is a pure function of it (see :func:`step_seed`). ``device``: the model's
    (:func:`~magnet_dist.parallel.device.worker_device`); sampling stays on the CPU, the blocks
    and the embedding rows move there (the rows' gradients, and so DGL's sparse optimizer
    step, follow them)."""
    n = users.numel()
    items = torch.cat([pos, neg.reshape(-1)])
    blocks = client.sample_blocks(users, items, fanouts, model.cfg.train.sample_rescale, seed=seed)
    if device is not None and device.type != "cpu":
        blocks = blocks.to(device)
    emb = client.input_embeddings(blocks, device=device)
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


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The random state of one training step of one worker (neighbour sampling, torch RNG):
    a pure function of (seed, epoch, batch, rank), so a run is reproducible and a resumed run
    draws what the uninterrupted one would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank, 13]).generate_state(1)[0])


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


def assert_same_schedule(state: ScheduleState) -> None:
    """Every worker must be in the same stage with the same switch step (cheap all-reduce)."""
    code = collective_tensor(
        [float(state.stage == "specialisation"), float(state.switch_step or -1)]
    )
    lo, hi = code.clone(), code.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"workers disagree on the routing stage: min {lo}, max {hi}")


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


def mean_over_workers(values: list[float]) -> list[float]:
    t = collective_tensor(values)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().tolist()


def server_bind_host(host: str, node_ip: str, interface: str | None = None) -> str:
    """The address a graph server binds, from ``trainer.host``: ``node`` = this node's Ray IP
    (the address of ``trainer.interface`` when that is set); anything else literally (loopback
    by default; ``0.0.0.0`` only when a config asks for it)."""
    if host != "node":
        return host
    if interface:
        return interface_ipv4(interface)
    return node_ip


def interface_ipv4(interface: str) -> str:
    """The IPv4 address of network interface ``interface`` (``trainer.interface``)."""
    import psutil

    addrs = psutil.net_if_addrs()
    for addr in addrs.get(interface, []):
        if addr.family == socket.AF_INET:
            return addr.address
    raise MagnetError(
        f"trainer.interface={interface!r} has no IPv4 address on {socket.gethostname()} "
        f"(interfaces: {', '.join(sorted(addrs))}); name one of them, or unset it"
    )


def check_colocation(entries: list[tuple], host: str) -> None:
    """Every worker maps its partition's node data from the local /dev/shm, so it must run on
    the node of that partition's graph server. ``entries``: every rank's ``(rank, part,
    node_ip, advertised, port, bind)``; the owner of a partition has a port."""
    owners = {e[1]: e for e in entries if e[4] is not None}
    for rank, part, node_ip, *_ in entries:
        server = owners[part]
        if node_ip != server[2]:
            raise MagnetError(
                f"rank {rank} runs on node {node_ip} but the graph server of its partition "
                f"{part} runs on node {server[2]} (rank {server[0]}): a partition's workers "
                "read its data through the server node's shared memory and must share its "
                "node. Fix the placement: train.placement_strategy STRICT_SPREAD with one "
                "worker per partition (train.workers == graph.partitions), or "
                "train.cpus_per_worker large enough that a node holds only the workers of one "
                "partition"
            )
    nodes = sorted({e[2] for e in entries})
    if len(nodes) > 1 and host not in ("node", "0.0.0.0") and is_loopback(host):
        raise MagnetError(
            f"trainer.host={host} (loopback) but the workers run on {len(nodes)} nodes "
            f"({', '.join(nodes)}): the graph servers would be unreachable from the other "
            "nodes; set trainer.host: node (binds each node's Ray IP)"
        )


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start_partition_server(
    cfg: Config, ctx: WorkerContext, part_config: Path, base_port: int, log_dir: Path | None = None
):
    """The first worker of each partition starts that partition's graph server on its own node;
    every worker then writes the same ip_config (addresses all-gathered), so the same code runs
    on one host and on many."""
    import ray

    from magnet_dist.graph.servers import free_base_port, start_servers, write_ip_config

    per_part = ctx.world // ctx.num_parts
    owner = ctx.rank % per_part == 0
    node_ip = ray.util.get_node_ip_address()
    bind = server_bind_host(cfg.trainer.host, node_ip, cfg.trainer.interface)
    # the address the clients dial: the bound one, or this node's when bound to every interface
    advertised = node_ip if bind == "0.0.0.0" else bind
    # base_port 0: every attempt (a restart after a failure, too) takes ports that are free
    # now on the owner's node, so a restarted group never races the dead group's sockets, and
    # its shared-memory names (tagged with the port) never meet the dead servers' segments
    port = (base_port + ctx.part if base_port else free_base_port(bind)) if owner else None
    entries: list[Any] = [None] * ctx.world
    dist.all_gather_object(entries, (ctx.rank, ctx.part, node_ip, advertised, port, bind))
    check_colocation(entries, cfg.trainer.host)
    addrs = {e[1]: (e[3], e[4]) for e in entries if e[4] is not None}
    if log_dir is not None:  # in the run folder: a killed worker leaves nothing in /tmp
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"magnet-worker{ctx.rank}-", dir=log_dir))
    ip_config = write_ip_config(workdir / "ip_config.txt", [addrs[p] for p in range(ctx.num_parts)])
    group = None
    if owner:
        # the log outlives the worker (a dead server's log is named in the run's error)
        log_root = Path(log_dir) if log_dir is not None else workdir
        group = start_servers(
            part_config,
            parts=[ctx.part],
            num_clients=ctx.world,
            ip_config=ip_config,
            log_dir=tempfile.mkdtemp(prefix=f"graph-server-p{ctx.part}-", dir=log_root),
            timeout_s=cfg.trainer.server_timeout_s,
            omp_threads=cfg.trainer.server_threads,
            bind_host=bind,
        )
    dist.barrier()
    return group, ip_config, workdir


def save_worker_checkpoint(
    directory: Path, ctx: WorkerContext, model, client, opts: dict, emb_opt, extra: dict, cfg
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
            "optimizer": opts["dense"].state_dict(),
            **extra,
        }
        save_checkpoint(directory / "dense.pt", cfg, payload)
        written.append(directory / "dense.pt")
    if model.moe is not None:
        written.append(save_expert_shard(model.moe, directory, optimizer=opts.get("expert")))
    written.append(client.save_embeddings(directory / "embeddings", ctx.rank, ctx.world))
    sparse = f"sparse-adam-rank{ctx.rank:03d}.pt"
    emb_opt.save(directory / sparse)  # DGL appends _<rank>
    written += sorted(directory.glob(f"{sparse}_*"))
    write_manifest(directory, [p for p in written if p is not None], ctx.rank, ctx.world)


def load_worker_checkpoint(directory: Path, ctx, model, client, opts, emb_opt, cfg) -> dict:
    """Restore this worker's state from a checkpoint folder, once every file of it is
    verified (sizes and sha256 of every worker's manifest)."""
    from magnet_dist.parallel.checkpoint import load_dense_state_dict, load_expert_shard
    from magnet_dist.train.checkpoint import load_checkpoint, verify_checkpoint_dir

    verify_checkpoint_dir(directory)
    ck = load_checkpoint(directory / "dense.pt", cfg, resume=True)
    load_dense_state_dict(model, ck["model"])
    opts["dense"].load_state_dict(ck["optimizer"])
    if model.moe is not None:
        load_expert_shard(model.moe, directory, optimizer=opts.get("expert"))
    client.load_embeddings(directory / "embeddings", ctx.rank, ctx.world)
    emb_opt.load(directory / f"sparse-adam-rank{ctx.rank:03d}.pt")
    dist.barrier()
    return ck


def export_best(run_dir: Path, cfg: Config, scorer, client, ctx: WorkerContext, epoch: int):
    """checkpoints/best.pt in the reference trainer's format (``scorer`` = the dense model with
    every expert, one embedding table users-then-items), so evaluate/recommend work for either
    trainer."""
    from magnet_dist.train.checkpoint import save_checkpoint

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


# in the run folder: why a worker had to end itself, one file per rank (rank<r>.log)
FAILURE_DIR = "failures"
SERVER_DIED_EXIT = 71
FAULT_SETTLE_S = 5.0
FAULT_HOOKS_ENABLE = "MAGNET_ENABLE_FAULT_HOOKS"
FAULT_HOOKS = tuple(
    f"MAGNET_FAULT_{hook}"
    for hook in ("KILL_AT_STEP", "KILL_IN_CHECKPOINT", "KILL_SERVER_AT_STEP", "MARKER")
)


def fault_hooks_from(env, warn: bool = True) -> dict[str, str]:
    """The fault hooks of ``env`` (with their enable) when ``MAGNET_ENABLE_FAULT_HOOKS=1``;
    otherwise none, with a warning if some are set (what the driver forwards to workers)."""
    hooks = {k: env[k] for k in FAULT_HOOKS if env.get(k)}
    if env.get(FAULT_HOOKS_ENABLE) == "1":
        return {**hooks, FAULT_HOOKS_ENABLE: "1"} if hooks else {}
    if hooks and warn:
        print(
            f"magnet_dist: warning: ignoring {', '.join(sorted(hooks))}: fault-injection test "
            f"hooks work only with {FAULT_HOOKS_ENABLE}=1 (tests set it; never in production)",
            file=sys.stderr,
            flush=True,
        )
    return {}


class FaultHooks:
    """Faults injected on purpose, for the fault-tolerance tests (no effect unless set).

    Honoured only with ``MAGNET_ENABLE_FAULT_HOOKS=1`` (which only the tests set), so a
    production environment cannot make a worker kill itself (:func:`fault_hooks_from`).
    Read from ``MAGNET_FAULT_*`` variables (the driver forwards its own to the workers); a
    value is ``STEP`` or ``STEP@WHO`` (WHO: a rank, or for the server hook a partition;
    default 0):

    - ``MAGNET_FAULT_KILL_AT_STEP``: that rank SIGKILLs itself right after training step STEP
      (before a checkpoint of that step);
    - ``MAGNET_FAULT_KILL_IN_CHECKPOINT``: that rank SIGKILLs itself while the checkpoint of
      step STEP is being written (its files are on disk, ``ray.train.report`` has not
      registered it);
    - ``MAGNET_FAULT_KILL_SERVER_AT_STEP``: the worker that started that partition's graph
      server SIGKILLs the server after step STEP, then waits for its server watcher.

    ``MAGNET_FAULT_MARKER=PATH``: a hook fires only if ``PATH.<hook>`` does not exist, and
    creates it first, so the restarted workers run on undisturbed.
    """

    def __init__(self, env: dict[str, str], rank: int, part: int) -> None:
        self.env = fault_hooks_from(env, warn=False)
        self.rank, self.part = rank, part

    def _due(self, hook: str, step: int, mine: int) -> bool:
        value = self.env.get(f"MAGNET_FAULT_{hook}")
        if not value:
            return False
        at, _, who = value.partition("@")
        if int(at) != step or int(who or 0) != mine:
            return False
        marker = self.env.get("MAGNET_FAULT_MARKER")
        if marker:
            try:
                os.close(os.open(f"{marker}.{hook.lower()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True

    def _kill_self(self, what: str) -> None:
        # Ray Train's controller collects reports by polling the workers (every 2 s); a report
        # still queued in a worker that dies is lost, and the group resumes from an older
        # checkpoint (still exact, but not the one a test means): let the last one land first
        time.sleep(FAULT_SETTLE_S)
        print(f"[fault] rank {self.rank}: SIGKILL to myself {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int, servers) -> None:
        if self._due("KILL_AT_STEP", step, self.rank):
            self._kill_self(f"after step {step}")
        if servers is not None and self._due("KILL_SERVER_AT_STEP", step, self.part):
            for pid in servers.pids.values():
                print(f"[fault] SIGKILL to graph server PID {pid} after step {step}", flush=True)
                os.kill(pid, signal.SIGKILL)
            # the server watcher ends this process within milliseconds; do not race it with
            # the next step's request to the dead server (DGL's sender aborts the process on
            # a failed send, before any cause is recorded: seen once in CI)
            time.sleep(FAULT_SETTLE_S)

    def in_checkpoint(self, step: int) -> None:
        if self._due("KILL_IN_CHECKPOINT", step, self.rank):
            self._kill_self(f"while writing the checkpoint of step {step}")


def _exit_on_server_death(part: int, code: int, message: str) -> None:
    """A graph server of this worker died mid-run: every client would block in DGL's RPC
    (a thread inside DGL's C++ cannot be interrupted), so end the worker now with the cause on
    record; Ray Train then fails the run, or restarts it from the last checkpoint
    (``train.max_failures``) with fresh servers."""
    text = f"magnet_dist: {message}"
    print(text, file=sys.stderr, flush=True)
    record_fault(text)
    os._exit(SERVER_DIED_EXIT)


def warn_if_ray_kills_servers() -> None:
    """Ray started by someone else (``ray.init`` before ``train_distributed``) without
    :data:`~magnet_dist.train.distributed.RAY_WORKER_ENV`: a teardown may then be reported as a
    dead graph server."""
    from magnet_dist.train.distributed import RAY_WORKER_ENV, ray_worker_env_as_seen

    seen = ray_worker_env_as_seen()
    if seen != RAY_WORKER_ENV:
        print(
            f"magnet_dist: warning: this worker runs with {seen} instead of {RAY_WORKER_ENV}: "
            "Ray kills the graph servers when it ends the worker, and a worker group torn down "
            "after another failure may record that as a dead graph server; start Ray with "
            f'runtime_env={{"env_vars": {RAY_WORKER_ENV}}}',
            file=sys.stderr,
            flush=True,
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
    device = worker_device(cfg.train.use_gpu)
    torch.manual_seed(cfg.train.seed)
    progress = bool(config.get("progress")) and rank == 0
    quiet_ray_console()  # Ray's INFO lines stay in its session logs
    os.environ[FAULT_LOG_ENV] = str(run_dir / FAILURE_DIR / f"rank{rank}.log")
    os.environ[FAULT_ATTEMPT_ENV] = str(config.get("attempt") or "")
    faults = FaultHooks({**os.environ, **config.get("faults", {})}, rank, ctx.part)

    # servers of this rank's previous worker group (a restart) that were SIGKILLed
    remove_dead_server_segments(run_dir, ranks=[rank])
    servers, ip_config, workdir = start_partition_server(
        cfg, ctx, Path(config["part_config"]), int(config["base_port"]), run_dir / "logs"
    )
    if servers is not None:
        warn_if_ray_kills_servers()
        servers.watch(_exit_on_server_death)
    record_worker(run_dir, rank, world, ctx.part, servers)
    # DGL's client prints (connect, exit) go to the run folder, not the terminal
    dgl_log = run_dir / "logs" / f"dgl-client-rank{rank}.log"
    with captured_output(dgl_log):
        client = connect(
            config["part_config"],
            ip_config,
            ctx.part,
            num_parts,
            timeout_s=cfg.trainer.server_timeout_s,
            client_ports=cfg.trainer.client_ports,
            client_ip=interface_ipv4(cfg.trainer.interface) if cfg.trainer.interface else None,
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
        model = MagnetModel(cfg, dict(ds.modalities), moe=moe).to(device)
        broadcast_parameters(model)
        client.init_embeddings(cfg.model.dim, init="xavier", seed=cfg.train.seed)
        emb_opt = client.sparse_optimizer(cfg.train.lr)
        dense_params, expert_params = split_parameters(model)
        expert_ids = {id(p) for p in expert_params}
        dense_groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in expert_ids]}
            for g in parameter_groups(model, cfg.moe.weight_decay)
        ]
        opts = {"dense": torch.optim.Adam(dense_groups, lr=cfg.train.lr)}
        if expert_params:
            opts["expert"] = torch.optim.Adam(
                expert_params, lr=cfg.train.lr, weight_decay=cfg.moe.weight_decay
            )

        tu, ti = ds.pairs(0)
        sampler = NegativeSampler(tu, ti, ds.num_items)
        users_local, items_local = client.train_edges(rank)
        evaluators = (
            {
                "valid": SplitEvaluator(
                    ds, 1, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk
                ),
                "test": SplitEvaluator(
                    ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk
                ),
            }
            if cfg.eval.in_loop
            else {}
        )
        stopper = EarlyStopping(cfg.train.patience)
        state, step, start_epoch, start_batch, best_metrics = ScheduleState(), 0, 0, 0, {}
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
            step, best_metrics = ck["step"], ck["best_metrics"]
            if ck.get("batch") is None:  # written after the epoch's evaluation
                start_epoch = ck["epoch"] + 1
            else:  # written inside the epoch: the epoch goes on at that batch
                start_epoch, start_batch = ck["epoch"], int(ck["batch"])
            if stopper.should_stop:
                start_epoch = cfg.train.epochs
            if rank == 0:
                message = f"resumed at epoch {start_epoch}, batch {start_batch}, step {step}"
                print(f"[distributed] {message}", flush=True)
                record_fault(message, kind="resume")
        # what an earlier attempt logged after this step goes (all of it when a restarted group
        # has no checkpoint yet: it starts again from step 0)
        log.resume_at(step)
        if rank == 0:
            truncate_evaluations(run_dir, step)

        checkpointed_at = time.monotonic()  # for train.checkpoint_every_minutes

        def report_checkpoint(metrics: dict, extra: dict, name: str) -> None:
            nonlocal checkpointed_at
            checkpointed_at = time.monotonic()
            log.flush()  # every step up to this one is in metrics.csv before it is registered
            with tempfile.TemporaryDirectory() as tmp:
                save_worker_checkpoint(Path(tmp), ctx, model, client, opts, emb_opt, extra, cfg)
                faults.in_checkpoint(step)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=name,
                )

        every_steps = cfg.train.checkpoint_every_steps
        t0, pairs, step_seconds = time.time(), 0, 0.0
        # every rank takes as many steps per epoch as the rank with the most local edges
        max_local = collective_tensor([len(users_local)], dtype=torch.int64)
        dist.all_reduce(max_local, op=dist.ReduceOp.MAX)
        last_routing = epoch_routing(run_dir, start_epoch - 1) if rank == 0 else None  # resumed
        for epoch in range(start_epoch, cfg.train.epochs):
            plan = plan_batches(
                len(users_local),
                int(max_local),
                cfg.train.batch_size,
                world,
                cfg.train.seed,
                epoch,
                rank,
                cfg.train.batch_per_worker,
            )
            if cfg.train.max_steps_per_epoch:
                plan = plan[: cfg.train.max_steps_per_epoch]
            last = epoch + 1 == cfg.train.epochs
            epoch_checkpoint = (epoch + 1) % cfg.train.checkpoint_every == 0 or last
            first = start_batch if epoch == start_epoch else 0
            bar = _bar(len(plan) - first, f"epoch {epoch}", progress)
            for b in range(first, len(plan)):
                idx = plan[b]
                t_step = time.perf_counter()
                u, p = users_local[idx], items_local[idx]
                neg = sampler.sample(
                    u.numpy(), cfg.train.n_neg, batch_rng(cfg.train.seed, epoch, b * world + rank)
                )
                seed = step_seed(cfg.train.seed, epoch, b, rank)
                torch.manual_seed(seed)
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
                    seed=seed,
                    device=device,
                )
                out.loss.backward()
                allreduce_gradients(model)
                for opt in opts.values():
                    opt.step()
                emb_opt.step()
                if out.stats is not None:
                    state = advance(state, trigger_signal(out.stats, cfg.routing), cfg.routing)
                    assert_same_schedule(state)
                step += 1
                pairs += len(idx) * world
                step_seconds += time.perf_counter() - t_step
                row = step_row(step, epoch, out, state)
                row["loss"], row["bpr"] = mean_over_workers([row["loss"], row["bpr"]])
                log.log(row)
                if bar is not None:
                    bar.update(1)
                faults.after_step(step, servers)
                end_of_epoch = b + 1 == len(plan)
                due = checkpoint_due(
                    step, every_steps, cfg.train.checkpoint_every_minutes, checkpointed_at
                )
                if due and not (end_of_epoch and epoch_checkpoint):
                    report_checkpoint(
                        {"epoch": epoch, "step": step},
                        {
                            "schedule": state.to_dict(),
                            "early_stopping": stopper.state_dict(),
                            "step": step,
                            "epoch": epoch,
                            "batch": b + 1,  # the next batch of this epoch's plan
                            "best_metrics": best_metrics,
                        },
                        f"step-{step:08d}",
                    )
            if bar is not None:
                bar.close()
            log.flush()
            last_routing = epoch_routing(run_dir, epoch) if rank == 0 else None  # metrics.csv
            metrics: dict[str, float] = {"epoch": epoch, "step": step}
            if not cfg.eval.in_loop:
                if last:  # no ranking in the loop: the final model is the exported one
                    stopper.best_epoch, stopper.best_info = epoch, last_routing
                    scorer = dense_eval_model(model, cfg, world)
                    export_best(run_dir, cfg, scorer, client, ctx, epoch)
            elif (epoch + 1) % cfg.train.eval_every == 0 or last:
                # one gather of the experts serves both the ranking and the export below
                scorer = dense_eval_model(model, cfg, world)
                evals = evaluate_sharded(scorer, client, ctx, evaluators)
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
                if stopper.update(epoch, evals[SELECTION_METRIC], last_routing):
                    best_metrics = evals  # test numbers of the epoch chosen on validation
                    export_best(run_dir, cfg, scorer, client, ctx, epoch)
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
                "batch": None,  # the epoch is complete, evaluation included
                "best_metrics": best_metrics,
            }
            if epoch_checkpoint or stopper.should_stop:
                report_checkpoint(metrics, extra, f"epoch-{epoch:05d}")
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
                "trigger_on": cfg.routing.trigger_on,
                "routing": {"final": last_routing, "best_epoch": stopper.best_info},
                "fusion_lambda": dict(
                    zip(model.modalities, model.encoder.fusion_weights.tolist(), strict=True)
                ),
                "trainer": "distributed",
                "workers": world,
                "partitions": num_parts,
                "ep_size": cfg.moe.ep_size,
            }
            finish_run(run_dir, final)
    except Exception as err:
        message = _dead_server_message(servers)
        if message is not None:  # the cause, rather than the RPC error it led to
            record_fault(message)
            raise MagnetError(message) from err
        raise
    finally:
        if servers is not None:
            servers.unwatch()  # from here on the servers exit on purpose
        if _dead_server_message(servers) is None:
            with captured_output(dgl_log):
                client.close()
        else:  # exit_client would wait for the dead server until the watchdog fires
            client.abandon()
        if servers is not None:
            servers.wait(cfg.trainer.server_timeout_s)
            servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def remove_dead_server_segments(run_dir: Path, ranks=None, wait_s: float = 0.0) -> list[str]:
    """Remove the /dev/shm segments of this host's graph servers recorded in
    ``<run_dir>/workers/`` (the last worker group) that are no longer running.

    A server cleans its segments when it exits on its own or sees its worker gone; a SIGKILLed
    server (the OOM killer, a fault test, Ray's own child kill where the job runs without
    ``RAY_WORKER_ENV``, Ray's process-group cleanup) leaves them behind. Called by each worker
    before it records a restarted group (``ranks``: its own rank) and by the driver after
    ``fit()``. ``wait_s``: how long to wait for recorded servers to exit first. Returns the
    tags removed."""
    import socket

    import psutil

    from magnet_dist.graph._dgl_patches import shm_tag
    from magnet_dist.graph.servers import _remove_shm_segments
    from magnet_dist.train.worker_info import read_workers

    try:
        workers = read_workers(run_dir)
    except (OSError, ValueError):
        return []
    here = socket.gethostname()
    servers = [
        s
        for w in workers
        if w.get("hostname") == here and (ranks is None or w.get("rank") in ranks)
        for s in w.get("graph_servers", [])
    ]

    def running(pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.status() != psutil.STATUS_ZOMBIE and any(
                "magnet_dist.graph.servers" in part for part in proc.cmdline()
            )
        except psutil.Error:
            return False

    deadline = time.monotonic() + wait_s
    while any(running(s["pid"]) for s in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        listening = {
            c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
    except psutil.Error:
        return []  # cannot tell whether a port has a new owner: leave everything
    removed = []
    for s in servers:
        if running(s["pid"]) or s["port"] in listening:
            continue
        tag = shm_tag(s["part"], s["port"])
        _remove_shm_segments(tag)
        removed.append(tag)
    return removed


def _dead_server_message(servers) -> str | None:
    if servers is None:
        return None
    for part, alive in servers.alive().items():
        if not alive:
            return (
                f"graph server of partition {part} exited with status "
                f"{servers.procs[part].returncode} during training; its log "
                f"{servers.logs.get(part)} ends with:\n{servers.log_tail(part)}"
            )
    return None


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
