"""Helpers shared by the distributed end-to-end tests (test_distributed, test_faults)."""

from __future__ import annotations

from pathlib import Path

import psutil

from magnet_dist.config import load_config


def tiny_distributed_config(data: Path, run: Path, *extra: str):
    """2 Ray workers on ``data`` (the tiny dataset) for 2 epochs, with a routing schedule short
    enough that the stage switch happens; ``extra`` overrides come last."""
    return load_config(
        overrides=[
            f"data.path={data}",
            f"train.run_dir={run}",
            "trainer.mode=distributed",
            "train.workers=2",
            "train.epochs=2",
            "train.batch_size=512",
            "model.dim=16",
            "routing.min_steps=4",
            "routing.window=2",
            "routing.max_steps=12",
            "routing.ramp_steps=4",
            "graph.partition_method=random",
            *extra,
        ]
    )


def graph_server_pids(data: Path) -> set[int]:
    """magnet_dist graph servers running now for partitions under ``data`` (other jobs on the
    machine may run servers of their own)."""
    out = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "magnet_dist.graph.servers" in cmd and "--serve" in cmd and "--part-config" in cmd:
            if cmd[cmd.index("--part-config") + 1].startswith(str(data)):
                out.add(proc.pid)
    return out
