"""The distributed trainer's driver (``trainer.mode=distributed``): partition the graph, find or
start a Ray cluster (embedded and loopback-only by default), and run ``TorchTrainer`` over
``train.workers`` workers (``train/worker.py``). Graph servers are started by the workers
themselves, next to them, and die with them.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from magnet_dist.config import Config
from magnet_dist.errors import MagnetError


def check_layout(cfg: Config) -> int:
    """Partitions and workers must fit: every partition needs >= 1 worker, equally many."""
    parts = cfg.graph.partitions or cfg.train.workers
    workers = cfg.train.workers
    if workers < parts or workers % parts:
        ok = [w for w in range(parts, 4 * parts + 1, parts)]
        raise MagnetError(
            f"train.workers={workers} does not fit graph.partitions={parts}: each partition needs "
            f"the same number of workers (>= 1); use train.workers in {ok} or "
            f"graph.partitions={workers}"
        )
    return parts


def ensure_partitions(cfg: Config, quiet: bool = False) -> Path:
    from magnet_dist.graph.partition import partition_dataset

    parts = check_layout(cfg)
    t0 = time.time()
    part_config = partition_dataset(
        cfg.data.path,
        parts,
        method=cfg.graph.partition_method,
        out_dir=cfg.graph.partition_dir,
        allow_missing_content=not cfg.model.content_view,
    )
    if not quiet:
        print(f"[distributed] partitions ready: {part_config} ({time.time() - t0:.1f} s)")
    return Path(part_config)


def keep_ray_on_loopback() -> None:
    """Ray otherwise rewrites 127.0.0.1 to the machine's network address, even for an embedded
    cluster (internal flag, read when ray is imported; re-check on Ray upgrades)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextmanager
def ray_cluster(cfg: Config):
    """Connect to ``trainer.ray_address`` / ``RAY_ADDRESS`` if given (``ray job submit`` sets
    it), else start an embedded single-node cluster bound to ``trainer.host`` (loopback)."""
    import ray

    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        keep_ray_on_loopback()
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = max(int(cfg.train.workers * cfg.train.cpus_per_worker) + 1, os.cpu_count() or 1)
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            _node_ip_address=cfg.trainer.host,
            log_to_driver=True,
            runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}},
        )
    try:
        yield
    finally:
        ray.shutdown()


def train_distributed(cfg: Config, progress: bool = True) -> dict[str, Any]:
    if not (cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")):
        keep_ray_on_loopback()  # before the first ray import
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from magnet_dist.graph.servers import free_base_port
    from magnet_dist.train.worker import train_loop_per_worker

    part_config = ensure_partitions(cfg, quiet=not progress)
    num_parts = check_layout(cfg)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = Path(cfg.train.storage_path or run_dir / "ray").resolve()
    base_port = cfg.trainer.server_port or free_base_port(cfg.trainer.host, count=num_parts)
    with ray_cluster(cfg):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "run_dir": str(run_dir),
                "part_config": str(part_config.resolve()),
                "num_parts": num_parts,
                "base_port": base_port,
                "progress": progress,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.train.workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                placement_strategy=cfg.train.placement_strategy,
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.train.run_name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise MagnetError(f"distributed run finished without writing {metrics_path}")
    return json.loads(metrics_path.read_text())
