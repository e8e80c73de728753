"""Run a benchmark stage in a child process and measure it: wall time and the peak memory of
the child's whole process tree (RSS and PSS summed over the child, Ray's processes and workers,
DGL graph servers), sampled with psutil: RSS every 0.5 s, PSS every 5 s and at each new RSS peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from magnet_dist.bench import ROOT


def _pss_sum(procs) -> int:
    import psutil

    total = 0
    for p in procs:
        try:
            m = p.memory_full_info()
            total += getattr(m, "pss", m.rss)
        except psutil.Error:
            pass
    return total


def process_kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "RayTrainWorker" in text:
        return "trainers"
    if "magnet_dist.graph.servers" in text:
        return "graph_servers"
    return "other"


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every ``interval``."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self.peak_pss_bytes = 0  # proportional set size: shared pages split among their users
        self.samples = 0
        self.pss_interval = 5.0
        self._pss_at = float("-inf")
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sample
        self._kind: dict[int, str] = {}
        self._halt = threading.Event()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system, up to each process's last sample) per kind of process:
        training workers, graph servers, the rest (the stage process, Ray's own)."""
        out: dict[str, float] = {}
        for pid, sec in self._cpu.items():
            kind = self._kind.get(pid, "other")
            out[kind] = out.get(kind, 0.0) + sec
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total, n = 0, 0
        for p in procs:
            try:
                total += p.memory_info().rss
                n += 1
                self._kind[p.pid] = process_kind(p.cmdline())  # a Ray worker is renamed
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self.samples += 1
        now = time.monotonic()
        # PSS walks every page table (~0.2 CPU s per sample for a 1M-user training tree, a
        # quarter of a core at 2 samples/s, taken from the stage measured): read it every
        # ``pss_interval`` s, and whenever RSS climbs 2 % above its peak (where the peak is)
        if total > self.peak_bytes * 1.02 or now - self._pss_at >= self.pss_interval:
            self._pss_at = now
            self.peak_pss_bytes = max(self.peak_pss_bytes, _pss_sum(procs))
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, n

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def run_in_child(
    name: str, params: dict[str, Any], out: Path, log, func: str | None = None
) -> dict[str, Any]:
    """Run stage ``name`` (stage function ``func``, default ``name``) in a child process
    (``python -m magnet_dist.bench.scale --stage``), sampling its process tree."""
    result_path = out / "stages" / f"{name}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "magnet_dist.bench.scale",
        "--stage",
        func or name,
        "--stage-params",
        json.dumps(params),
        "--stage-result",
        str(result_path),
    ]
    log(f"[scale] stage {name} ...")
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    cpu = sampler.cpu_seconds()
    record: dict[str, Any] = {
        "stage": name,
        "status": "ok" if rc == 0 and result_path.is_file() else f"failed (exit {rc})",
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(sampler.peak_bytes / 2**30, 3),
        "peak_processes": sampler.peak_processes,
        "peak_pss_gb": round(sampler.peak_pss_bytes / 2**30, 3),
        # CPU seconds per kind of process, and cores used on average (CPU s / wall s)
        "cpu_s": cpu,
        "cores_used": round(sum(cpu.values()) / max(wall, 1e-9), 2),
        "throughput": None,
        "log": str(log_path),
    }
    if result_path.is_file():
        record.update(json.loads(result_path.read_text()))
    else:
        tail = log_path.read_text().splitlines()[-15:]
        record["error_tail"] = tail
        log("\n".join(tail))
    log(
        f"[scale] stage {name}: {record['status']}, {wall:.1f} s, "
        f"peak RSS {record['peak_rss_gb']:.2f} GB over {record['peak_processes']} processes"
    )
    return record


def exit_with_parent() -> None:
    """A stage process ends when the driver dies (e.g. killed by a test timeout)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(75)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
