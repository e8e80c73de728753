"""The DGL graph cluster of a worker group: each partition's graph server (started by the
partition's first worker, on its node), every worker's client, and their teardown.

:func:`graph_cluster` owns all of it with one ``with``: whatever started is stopped on the
way out, a failed ``connect`` included, and a graph server that died is named as the cause.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from magnet_dist.config import Config
from magnet_dist.errors import MagnetError, record_fault
from magnet_dist.train.library_output import captured_output
from magnet_dist.train.ray_env import RAY_WORKER_ENV, ray_worker_env_as_seen
from magnet_dist.train.worker_info import read_workers, record_worker


@dataclass
class WorkerContext:
    rank: int
    world: int
    part: int
    num_parts: int


@dataclass
class GraphCluster:
    """What :func:`graph_cluster` started: this worker's client, and the server group of its
    partition when this worker owns it (else ``None``)."""

    client: Any
    servers: Any


@contextmanager
def graph_cluster(
    cfg: Config, ctx: WorkerContext, run_dir: Path, part_config: str, base_port: int
) -> Iterator[GraphCluster]:
    """Start this worker's share of the cluster and connect its client; on exit unwatch,
    close (or abandon, when a server died) the client, stop the servers, remove the workdir;
    an error caused by a dead graph server is raised as that cause."""
    from magnet_dist.graph.dist import connect

    # servers of this rank's previous worker group (a restart) that were SIGKILLed
    remove_dead_server_segments(run_dir, ranks=[ctx.rank])
    servers, ip_config, workdir = start_partition_server(
        cfg, ctx, Path(part_config), base_port, run_dir / "logs"
    )
    client = None
    # DGL's client prints (connect, exit) go to the run folder, not the terminal
    dgl_log = run_dir / "logs" / f"dgl-client-rank{ctx.rank}.log"
    try:
        if servers is not None:
            warn_if_ray_kills_servers()
            servers.watch(_exit_on_server_death)
        record_worker(run_dir, ctx.rank, ctx.world, ctx.part, servers)
        with captured_output(dgl_log):
            client = connect(
                part_config,
                ip_config,
                ctx.part,
                ctx.num_parts,
                timeout_s=cfg.trainer.server_timeout_s,
                client_ports=cfg.trainer.client_ports,
                client_ip=interface_ipv4(cfg.trainer.interface) if cfg.trainer.interface else None,
                shared_graph=cfg.train.shares_graph,
            )
        yield GraphCluster(client, servers)
    except Exception as err:
        message = _dead_server_message(servers)
        if message is not None:  # the cause, rather than the RPC error it led to
            record_fault(message)
            raise MagnetError(message) from err
        raise
    finally:
        if servers is not None:
            servers.unwatch()  # from here on the servers exit on purpose
        if client is not None and _dead_server_message(servers) is None:
            with captured_output(dgl_log):
                client.close()
        elif client is not None:  # exit_client would wait for the dead server (watchdog)
            client.abandon()
        if servers is not None:
            servers.wait(cfg.trainer.server_timeout_s)
            servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


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
            share_graph=cfg.train.shares_graph,
        )
    dist.barrier()
    return group, ip_config, workdir


SERVER_DIED_EXIT = 71


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
    :data:`~magnet_dist.train.ray_env.RAY_WORKER_ENV`: a teardown may then be reported as a
    dead graph server."""
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


def remove_dead_server_segments(run_dir: Path, ranks=None, wait_s: float = 0.0) -> list[str]:
    """Remove the /dev/shm segments of this host's graph servers recorded in
    ``<run_dir>/workers/`` (the last worker group) that are no longer running.

    A server cleans its segments when it exits on its own or sees its worker gone; a SIGKILLed
    server (the OOM killer, a fault test, Ray's own child kill where the job runs without
    ``RAY_WORKER_ENV``, Ray's process-group cleanup) leaves them behind. Called by each worker
    before it records a restarted group (``ranks``: its own rank) and by the driver after
    ``fit()``. ``wait_s``: how long to wait for recorded servers to exit first. Returns the
    tags removed."""
    import psutil

    from magnet_dist.graph._dgl_patches import shm_tag
    from magnet_dist.graph.servers import _remove_shm_segments

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
