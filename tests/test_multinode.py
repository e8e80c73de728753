"""Two Ray nodes on one host, a training job submitted with ``ray job submit``: one Ray Train
worker and one DGL graph server per node (``train.placement_strategy=STRICT_SPREAD``).

Everything stays on loopback: the head node is 127.0.0.2, the second node 127.0.0.3 (both are
loopback addresses on Linux; Ray rewrites only 127.0.0.1/localhost to the machine's network
address, and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which stops that, also makes ``ray start
--address`` refuse to add a node), the dashboard / Jobs API listens on 127.0.0.1. Every port
is chosen free, the Ray temp dirs are this test's own, token authentication stays on with a
token file of its own (``RAY_AUTH_TOKEN_PATH``, never ``~/.ray/auth_token``), and every process
the test started is stopped by PID at the end (never ``ray stop``, which stops every Ray
instance on the machine).

The same by hand (venv active, so `ray` and the job's `python` are the venv's; one host, so
each node gets its own IP, temp dir, agent port and worker ports)::

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/magnet_token  # file: 64 hex chars
    ray start --head --node-ip-address 127.0.0.2 --port 6380 --dashboard-host 127.0.0.1 \
        --dashboard-port 8265 --dashboard-agent-listen-port 52365 --min-worker-port 20000 \
        --max-worker-port 20999 --num-cpus 1 --temp-dir /tmp/ray-head
    ray start --address 127.0.0.2:6380 --node-ip-address 127.0.0.3 \
        --dashboard-agent-listen-port 52366 --min-worker-port 21000 --max-worker-port 21999 \
        --num-cpus 1 --resources '{"node2": 1}' --temp-dir /tmp/ray-node2
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch/train.py \
        --config configs/quickstart.yaml trainer.mode=distributed train.workers=2 \
        train.placement_strategy=STRICT_SPREAD data.path=$PWD/data/ml-100k
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, closing
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` jobs run with
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
MARK = "MAGNET_TEST_RAY_ROOT"  # in the environment of every process the test starts
START_TIMEOUT_S = 120
NODES_TIMEOUT_S = 60
JOB_TIMEOUT_S = 360
GRACE_S = 5

NODES_SCRIPT = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(1)
print("NODES " + json.dumps(
    [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
     for n in alive]))
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface now (Ray's gRPC servers bind to all)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(count: int, avoid: set[int]) -> tuple[int, int]:
    """``count`` consecutive free ports below the ephemeral range (for Ray's worker ports)."""
    starts = list(range(20000, 30000 - count, count))
    random.shuffle(starts)
    for lo in starts:
        ports = range(lo, lo + count)
        if not avoid.intersection(ports) and all(port_free(p) for p in ports):
            return lo, lo + count - 1
    raise RuntimeError(f"no {count} consecutive free ports in 20000-30000")


def cluster_processes(root: str, gcs: str) -> dict[int, psutil.Process]:
    """Every process of this test's cluster: marked by environment, or naming the temp root or
    the GCS address, and all their descendants (workers, agents, DGL servers, the job driver).
    Ray renames some processes (which can overwrite /proc/PID/environ), hence all three."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in mine:
            continue
        cmd = " ".join(proc.info.get("cmdline") or [])
        try:
            marked = proc.environ().get(MARK) == root
        except psutil.Error:
            marked = False
        if marked or root in cmd or gcs in cmd:
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                if child.pid not in mine:
                    found[child.pid] = child
        except psutil.Error:
            pass
    return found


def stop_test_processes(root: str, gcs: str) -> list[int]:
    """Terminate, then kill, every process of this test's cluster, by PID; returns the PIDs.
    (The raylet and GCS often ignore SIGTERM for longer than is worth waiting.)"""
    stopped: list[int] = []
    for _ in range(3):
        procs = list(cluster_processes(root, gcs).values())
        if not procs:
            break
        stopped += [p.pid for p in procs]
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
    return stopped


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)


def session_log_tails(root: Path) -> str:
    out = []
    for name in ["gcs_server.out", "raylet.out", "raylet.err", "dashboard.log"]:
        for path in sorted(root.glob(f"*/session_latest/logs/{name}")):
            out.append(tail(path, 20))
    for path in sorted(root.glob("*/session_latest/logs/job-driver-*.log")):
        out.append(tail(path, 60))
    return "\n".join(out)


class TwoNodeCluster:
    """A Ray head (127.0.0.2, Jobs API on 127.0.0.1) and a second node (127.0.0.3, resource
    ``node2``), 1 CPU each, started with the venv's ``ray`` under a temp root of their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        gcs_port, dash_port, *self._head_ports = free_ports(9)
        self._node2_ports = free_ports(6)
        used = {gcs_port, dash_port, *self._head_ports, *self._node2_ports}
        self._head_workers = free_port_range(40, used)
        self._node2_workers = free_port_range(
            40, used | set(range(self._head_workers[0], self._head_workers[1] + 1))
        )
        self.gcs = f"{HEAD_IP}:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dash_port}"
        drop = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"}
        # set to 0 by an embedded run earlier in this session: would make `ray start
        # --address` refuse to add a node
        drop.add("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",  # job entrypoint `python`
            VIRTUAL_ENV=str(BIN.parent),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
            **{MARK: str(root)},
        )

    def _node_args(self, ports: list[int], workers: tuple[int, int]) -> list[str]:
        nm, om, agent_http, agent_grpc, runtime_env, metrics = ports
        return [
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--min-worker-port={workers[0]}",
            f"--max-worker-port={workers[1]}",
            "--num-cpus=1",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]

    def ray(self, *args: str, timeout: float, log: Path | None = None, check: bool = True):
        try:
            proc = subprocess.run(
                [str(BIN / "ray"), *args],
                env=self.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            out = "".join(
                x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                for x in (err.stdout, err.stderr)
            )
            raise AssertionError(
                f"`ray {' '.join(args[:3])} ...` still running after {timeout:.0f} s:\n"
                f"{out[-4000:]}\n{session_log_tails(self.root)}"
            ) from None
        if log is not None:
            log.write_text(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`ray {' '.join(args[:3])} ...` failed ({proc.returncode}):\n"
                f"{(proc.stdout + proc.stderr)[-4000:]}\n{session_log_tails(self.root)}"
            )
        return proc

    def start(self) -> None:
        gcs_port = self.gcs.rsplit(":", 1)[1]
        dash_port = self.dashboard.rsplit(":", 1)[1]
        client_port, *head_ports = self._head_ports
        self.ray(
            "start",
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={self.root / 'head'}",
            *self._node_args(head_ports, self._head_workers),
            timeout=START_TIMEOUT_S,
            log=self.root / "start-head.log",
        )
        self.ray(
            "start",
            f"--address={self.gcs}",
            f"--node-ip-address={NODE2_IP}",
            '--resources={"node2": 1}',
            f"--temp-dir={self.root / 'node2'}",
            *self._node_args(self._node2_ports, self._node2_workers),
            timeout=START_TIMEOUT_S,
            log=self.root / "start-node2.log",
        )

    def alive_nodes(self) -> list[dict]:
        proc = subprocess.run(
            [sys.executable, "-c", NODES_SCRIPT, self.gcs, str(NODES_TIMEOUT_S)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=NODES_TIMEOUT_S + 60,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("NODES ")]
        assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(line[0].removeprefix("NODES "))

    def stop(self) -> list[int]:
        return stop_test_processes(str(self.root), self.gcs)


def test_job_on_two_nodes(tiny_dataset, tmp_path):
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    # Ray's Unix sockets live under the temp dir and must stay under 108 bytes: pytest's
    # tmp_path is too deep for <temp>/session_<date>_<pid>/sockets/plasma_store.
    root = Path(tempfile.mkdtemp(prefix="mgn-mn-", dir="/tmp"))
    cluster = TwoNodeCluster(root)
    run_dir = tmp_path / "run"
    submission_id = f"magnet-multinode-{secrets.token_hex(4)}"
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        stopped: list[int] = []
        cleanup.callback(lambda: stopped.extend(cluster.stop()))

        cluster.start()
        timings["start_s"] = time.monotonic() - t0
        nodes = cluster.alive_nodes()
        timings["nodes_s"] = time.monotonic() - t0
        assert len(nodes) == 2, nodes
        assert {n["ip"] for n in nodes} == {HEAD_IP, NODE2_IP}, nodes
        node2_id = next(n["id"] for n in nodes if "node2" in n["resources"])
        head_id = next(n["id"] for n in nodes if n["id"] != node2_id)

        # token authentication is on: the Jobs API refuses a request without the token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30)
        assert refused.value.code == 401

        overrides = [
            f"data.path={tiny_dataset}",
            f"graph.partition_dir={tmp_path / 'partitions'}",
            "graph.partition_method=random",
            f"train.run_dir={run_dir}",
            "trainer.mode=distributed",
            "train.workers=2",
            "train.placement_strategy=STRICT_SPREAD",
            "train.epochs=1",
            "train.batch_size=512",
            "train.max_steps_per_epoch=4",
            "model.dim=16",
        ]
        submit = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--submission-id={submission_id}",
            "--working-dir=.",
            "--",
            "python",
            "launch/train.py",
            "--config",
            "configs/quickstart.yaml",
            *overrides,
            timeout=JOB_TIMEOUT_S,
            log=root / "submit.log",
            check=False,
        )
        timings["job_s"] = time.monotonic() - t0
        status = cluster.ray(
            "job", "status", f"--address={cluster.dashboard}", submission_id, timeout=60
        )
        if "succeeded" not in (status.stdout + status.stderr).lower():  # "Job '…' succeeded"
            logs = cluster.ray(
                "job",
                "logs",
                f"--address={cluster.dashboard}",
                submission_id,
                timeout=60,
                check=False,
            )
            pytest.fail(
                f"job {submission_id} did not succeed:\n{status.stdout[-1000:]}\n"
                f"--- ray job submit (rc {submit.returncode}):\n{submit.stdout[-3000:]}"
                f"{submit.stderr[-3000:]}\n--- ray job logs:\n{logs.stdout[-6000:]}\n"
                f"{session_log_tails(root)}"
            )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

        metrics = json.loads((run_dir / "metrics.json").read_text())
        for key in [
            "valid.recall@20",
            "test.recall@10",
            "test.recall@20",
            "test.ndcg@10",
            "test.ndcg@20",
            "best_epoch",
        ]:
            assert key in metrics, metrics
        assert metrics["workers"] == 2 and metrics["partitions"] == 2, metrics

        from magnet_dist.train.distributed import RAY_WORKER_ENV
        from magnet_dist.train.worker_info import read_workers

        workers = read_workers(run_dir)
        assert [w["rank"] for w in workers] == [0, 1], workers
        # one worker on each node (STRICT_SPREAD), each with its partition's graph server
        assert {w["node_id"] for w in workers} == {head_id, node2_id}, (workers, nodes)
        assert {w["node_ip"] for w in workers} == {HEAD_IP, NODE2_IP}, workers
        servers = [s for w in workers for s in w["graph_servers"]]
        assert sorted(s["part"] for s in servers) == [0, 1], workers
        for w in workers:
            assert [s["host"] for s in w["graph_servers"]] == [w["node_ip"]], w
            # the job's runtime_env merged with ours: Ray leaves the graph servers to us
            assert w["ray_env"] == RAY_WORKER_ENV, w
        # the workers stopped their graph servers when the job ended
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(s["pid"]) for s in servers) and time.monotonic() < deadline:
            time.sleep(0.5)
        for s in servers:
            assert not _is_graph_server(s["pid"]), f"graph server {s} still running"
        timings["checks_s"] = time.monotonic() - t0
    timings["total_s"] = time.monotonic() - t0

    assert stopped, "found none of the cluster's processes to stop"
    left = cluster_processes(str(root), cluster.gcs)
    assert not left, f"still running after stop: {[(p.pid, p.name()) for p in left.values()]}"
    for w in workers:
        assert not psutil.pid_exists(w["pid"]) or not _is_ray_worker(w["pid"]), w
    print(f"[multinode] {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _is_graph_server(pid: int) -> bool:
    return "magnet_dist.graph.servers" in _cmdline(pid)


def _is_ray_worker(pid: int) -> bool:
    return "ray::" in _cmdline(pid) or "default_worker.py" in _cmdline(pid)
