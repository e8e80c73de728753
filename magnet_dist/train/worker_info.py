"""Where each distributed worker ran: ``<run_dir>/workers/rank<r>.json``.

One small JSON per Ray Train worker (written again by a restarted worker group), saying which
Ray node, host and process the rank ran in, its partition, and the DGL graph server(s) it
started (the first worker of each partition starts its partition's server on its own node).
Useful to check placement (``train.placement_strategy``) and to find a stray process by PID.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from magnet_dist.train.ray_env import ray_worker_env_as_seen
from magnet_dist.train.run_folder import write_json_atomic

WORKERS_DIR = "workers"


def record_worker(run_dir: Path, rank: int, world: int, part: int, servers=None) -> Path:
    """Write this worker's ``workers/rank<rank>.json``; ``servers`` is the ``ServerGroup`` it
    started, if any. Call inside a Ray worker (after ``ray.train`` set up the context)."""
    import ray

    rc = ray.get_runtime_context()
    graph_servers: list[dict[str, Any]] = []
    if servers is not None:
        for p, pid in sorted(servers.pids.items()):
            addr = servers.addresses[p]
            graph_servers.append(
                {
                    "part": p,
                    "pid": pid,
                    "host": addr.host,  # the address the clients dial (ip_config)
                    "port": addr.port,
                    "listening": listening_addresses(pid),  # what the server bound
                }
            )
    info = {
        "rank": rank,
        "world": world,
        "part": part,
        "node_id": rc.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "graph_servers": graph_servers,
        # the Ray settings the job asked for, as this worker got them (merged runtime_env)
        "ray_env": ray_worker_env_as_seen(),
        "time": time.time(),
    }
    path = Path(run_dir) / WORKERS_DIR / f"rank{rank}.json"
    write_json_atomic(path, info)
    return path


def listening_addresses(pid: int) -> list[str]:
    """``host:port`` of every TCP socket process ``pid`` listens on (read with psutil)."""
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN)


def read_workers(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``workers/rank<r>.json`` of a run folder, by rank."""
    files = sorted((Path(run_dir) / WORKERS_DIR).glob("rank*.json"))
    rows = [json.loads(f.read_text()) for f in files]
    return sorted(rows, key=lambda r: r["rank"])
