"""Three Ray nodes on one host, training jobs submitted with ``ray job submit`` (one cluster
for every case, started once per module):

* the placement of configs/cluster.yaml, scaled to 2-CPU nodes (``STRICT_SPREAD``, a worker
  reserving all of a node's CPUs, ``trainer.host=node``), with ``train.storage_path`` a
  ``file://`` URI: one worker and one graph server per node, each server listening on its
  node's IP, checkpoints where the URI says;
* a placement that puts a partition's second worker on another node than the partition's
  server (2 workers, 1 partition, ``STRICT_SPREAD``) is refused with the co-location error.

Everything stays on loopback: the head node is 127.0.0.2, the others 127.0.0.3 and 127.0.0.4
(loopback addresses on Linux; Ray rewrites only 127.0.0.1/localhost to the machine's network
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
    # (a third node: the same with 127.0.0.4, its own ports and temp dir)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch/train.py \
        --config configs/quickstart.yaml trainer.mode=distributed train.workers=2 \
        train.placement_strategy=STRICT_SPREAD trainer.host=node data.path=$PWD/data/ml-100k
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
from contextlib import closing
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` jobs run with
NODE_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # the head first
HEAD_IP = NODE_IPS[0]
NODE_CPUS = 2  # Ray's logical CPUs per node (the pods of k8s/*.yaml have 8)
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
    if len(alive) >= int(sys.argv[3]) or time.monotonic() > deadline:
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


class NodeCluster:
    """A Ray head (``NODE_IPS[0]``, Jobs API on 127.0.0.1) and one node per further IP (node i
    with resource ``node<i>``), ``NODE_CPUS`` CPUs each, started with the venv's ``ray``
    under a temp root of their own."""

    def __init__(self, root: Path, ips: list[str]) -> None:
        self.root, self.ips = root, ips
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        gcs_port, dash_port, *self._head_ports = free_ports(9)
        self._ports = [self._head_ports] + [free_ports(6) for _ in ips[1:]]
        used = {gcs_port, dash_port, *(p for ports in self._ports for p in ports)}
        self._workers = []
        for _ in ips:
            lo, hi = free_port_range(40, used)
            used |= set(range(lo, hi + 1))
            self._workers.append((lo, hi))
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
            f"--num-cpus={NODE_CPUS}",
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
            *self._node_args(head_ports, self._workers[0]),
            timeout=START_TIMEOUT_S,
            log=self.root / "start-head.log",
        )
        for i, ip in enumerate(self.ips[1:], start=1):
            self.ray(
                "start",
                f"--address={self.gcs}",
                f"--node-ip-address={ip}",
                f'--resources={{"node{i}": 1}}',
                f"--temp-dir={self.root / f'node{i}'}",
                *self._node_args(self._ports[i], self._workers[i]),
                timeout=START_TIMEOUT_S,
                log=self.root / f"start-node{i}.log",
            )

    def alive_nodes(self) -> list[dict]:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                NODES_SCRIPT,
                self.gcs,
                str(NODES_TIMEOUT_S),
                str(len(self.ips)),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=NODES_TIMEOUT_S + 60,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("NODES ")]
        assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(line[0].removeprefix("NODES "))

    def submit(self, name: str, overrides: list[str]) -> tuple[bool, str]:
        """Run ``launch/train.py`` with ``overrides`` as a job; (succeeded, its output)."""
        submission_id = f"magnet-{name}-{secrets.token_hex(4)}"
        submit = self.ray(
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            "--working-dir=.",
            "--",
            "python",
            "launch/train.py",
            "--config",
            "configs/quickstart.yaml",
            *overrides,
            timeout=JOB_TIMEOUT_S,
            log=self.root / f"submit-{name}.log",
            check=False,
        )
        status = self.ray("job", "status", f"--address={self.dashboard}", submission_id, timeout=60)
        ok = "succeeded" in (status.stdout + status.stderr).lower()  # "Job '…' succeeded"
        logs = self.ray(
            "job", "logs", f"--address={self.dashboard}", submission_id, timeout=60, check=False
        )
        out = (
            f"{status.stdout[-1000:]}\n--- ray job submit (rc {submit.returncode}):\n"
            f"{submit.stdout[-3000:]}{submit.stderr[-3000:]}\n--- ray job logs:\n"
            f"{logs.stdout[-8000:]}"
        )
        return ok and submit.returncode == 0, out

    def stop(self) -> list[int]:
        return stop_test_processes(str(self.root), self.gcs)


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes, started once for every job of this module, stopped by PID."""
    t0 = time.monotonic()
    # Ray's Unix sockets live under the temp dir and must stay under 108 bytes: pytest's
    # tmp_path is too deep for <temp>/session_<date>_<pid>/sockets/plasma_store.
    root = Path(tempfile.mkdtemp(prefix="mgn-mn-", dir="/tmp"))
    nodes = NodeCluster(root, NODE_IPS)
    try:
        nodes.start()
        alive = nodes.alive_nodes()
        assert len(alive) == len(NODE_IPS), alive
        assert {n["ip"] for n in alive} == set(NODE_IPS), alive
        nodes.node_ids = {n["ip"]: n["id"] for n in alive}
        print(f"[multinode] cluster up in {time.monotonic() - t0:.1f} s")
        yield nodes
    finally:
        stopped = nodes.stop()
        left = cluster_processes(str(root), nodes.gcs)
        shutil.rmtree(root, ignore_errors=True)
    assert stopped, "found none of the cluster's processes to stop"
    assert not left, f"still running after stop: {[(p.pid, p.name()) for p in left.values()]}"


def job_overrides(tiny_dataset: Path, tmp_path: Path, run_dir: Path) -> list[str]:
    return [
        f"data.path={tiny_dataset}",
        f"graph.partition_dir={tmp_path / 'partitions'}",
        "graph.partition_method=random",
        f"train.run_dir={run_dir}",
        "trainer.mode=distributed",
        "trainer.host=node",  # as configs/cluster.yaml: servers bind each node's Ray IP
        "train.epochs=1",
        "train.batch_size=512",
        "train.max_steps_per_epoch=4",
        "model.dim=16",
    ]


def test_token_auth_guards_the_jobs_api(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401


def test_cluster_placement_spreads_workers_over_nodes(cluster, tiny_dataset, tmp_path):
    """configs/cluster.yaml's placement, scaled: one worker (all of a node's CPUs) and its
    partition's graph server per node; Ray Train's storage given as a file:// URI."""
    from magnet_dist.config import load_config
    from magnet_dist.train.distributed import RAY_WORKER_ENV
    from magnet_dist.train.worker_info import read_workers

    shipped = load_config(ROOT / "configs" / "cluster.yaml").train
    assert shipped.placement_strategy == "STRICT_SPREAD"
    run_dir, storage = tmp_path / "run", tmp_path / "ray results"
    workers = len(NODE_IPS)
    ok, out = cluster.submit(
        "spread",
        job_overrides(tiny_dataset, tmp_path, run_dir)
        + [
            f"train.workers={workers}",
            f"train.placement_strategy={shipped.placement_strategy}",
            f"train.cpus_per_worker={NODE_CPUS}",  # > half a node: never two on one node
            f"train.storage_path=file://{str(storage).replace(' ', '%20')}",
            "train.run_name=spread",
        ],
    )
    assert ok, f"job did not succeed:\n{out}\n{session_log_tails(cluster.root)}"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ["valid.recall@20", "test.recall@20", "test.ndcg@20", "best_epoch"]:
        assert key in metrics, metrics
    assert metrics["workers"] == workers and metrics["partitions"] == workers, metrics
    # the checkpoints are where the URI points (not under <cwd>/file:/...)
    assert list((storage / "spread").glob("epoch-*/dense.pt")), list(storage.rglob("*"))[:20]

    rows = read_workers(run_dir)
    assert [w["rank"] for w in rows] == list(range(workers)), rows
    assert sorted(w["node_ip"] for w in rows) == sorted(NODE_IPS), rows  # one per node
    assert {w["node_id"] for w in rows} == set(cluster.node_ids.values()), rows
    servers = [s for w in rows for s in w["graph_servers"]]
    assert sorted(s["part"] for s in servers) == list(range(workers)), rows
    for w in rows:
        # each server on its worker's node, listening on that node's IP only (not 0.0.0.0)
        assert [s["host"] for s in w["graph_servers"]] == [w["node_ip"]], w
        for s in w["graph_servers"]:
            assert s["listening"] == [f"{w['node_ip']}:{s['port']}"], w
        # the job's runtime_env merged with ours: Ray leaves the graph servers to us
        assert w["ray_env"] == RAY_WORKER_ENV, w
    # the workers stopped their graph servers when the job ended
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(s["pid"]) for s in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    for s in servers:
        assert not _is_graph_server(s["pid"]), f"graph server {s} still running"
    for w in rows:
        assert not psutil.pid_exists(w["pid"]) or not _is_ray_worker(w["pid"]), w


def test_worker_away_from_its_partition_server_is_refused(cluster, tiny_dataset, tmp_path):
    """Two workers of one partition forced onto two nodes: the second would read the
    partition's data from a /dev/shm it does not share; the run fails at start-up, naming
    the rank, the nodes and the fix."""
    run_dir = tmp_path / "run"
    ok, out = cluster.submit(
        "colocation",
        job_overrides(tiny_dataset, tmp_path, run_dir)
        + [
            "train.workers=2",
            "graph.partitions=1",
            "train.placement_strategy=STRICT_SPREAD",
            "train.run_name=colocation",
        ],
    )
    assert not ok, f"a worker away from its partition's server was accepted:\n{out}"
    assert "rank 1 runs on node 127.0.0." in out, out
    assert "graph server of its partition 0 runs on node 127.0.0." in out, out
    assert "train.placement_strategy" in out, out
    assert not (run_dir / "metrics.json").exists()


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _is_graph_server(pid: int) -> bool:
    return "magnet_dist.graph.servers" in _cmdline(pid)


def _is_ray_worker(pid: int) -> bool:
    return "ray::" in _cmdline(pid) or "default_worker.py" in _cmdline(pid)
