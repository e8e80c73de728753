"""DGL distributed graph on one host: real servers, real client processes (no mocks)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from magnet_dist.errors import MagnetError
from magnet_dist.graph.partition import partition_arrays
from magnet_dist.graph.servers import free_base_port, start_servers

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("graph_dist_worker.py")
_spec = importlib.util.spec_from_file_location("graph_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

CLIENT_TIMEOUT_S = 90


def partition(data, parts: int, out: Path) -> Path:
    train = data["split"] == 0
    return partition_arrays(
        data["num_users"],
        data["num_items"],
        data["users"][train],
        data["items"][train],
        data["content_src"],
        data["content_dst"],
        data["content_weight"],
        {"t": data["feat_t"], "v": data["feat_v"]},
        num_parts=parts,
        out_dir=out,
        method="random",
        checksum="test",
        verbose=False,
    )


@pytest.fixture(scope="module")
def graph_data(tmp_path_factory):
    data = worker.make_graph_data()
    path = tmp_path_factory.mktemp("graph") / "data.npz"
    np.savez(path, **data)
    return data, path


def run_cluster(tmp_path: Path, graph_data, parts: int) -> list[dict]:
    """Partition, start the servers, run one client process per partition, collect results."""
    data, data_path = graph_data
    part_config = partition(data, parts, tmp_path / f"parts{parts}")
    port = free_base_port(count=parts)
    servers = start_servers(
        part_config,
        "127.0.0.1",
        port,
        num_clients=parts,
        log_dir=tmp_path / "logs",
        timeout_s=60,
        share_graph=True,
    )
    with servers:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(data_path),
                    str(part_config),
                    str(servers.ip_config),
                    str(p),
                    str(parts),
                    str(tmp_path / f"out{p}.npz"),
                    str(tmp_path / "torch_init"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
            for p in range(parts)
        ]
        logs = []
        try:
            for proc in procs:
                logs.append(proc.communicate(timeout=CLIENT_TIMEOUT_S)[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for p, proc in enumerate(procs):
            assert proc.returncode == 0, f"client {p} failed:\n{logs[p][-3000:]}"
        # (c) the clients' exit_client shuts the servers down by themselves
        assert servers.wait(timeout_s=30), servers.alive()
    pids = list(servers.pids.values())
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )
    return [dict(np.load(tmp_path / f"out{p}.npz")) for p in range(parts)]


def check_results(data, results: list[dict]) -> None:
    train = data["split"] == 0
    for r in results:
        # (a) fanout -1 sampled hops through MagnetModel.encode == full_graph_hop
        assert r["sampled_max_err"] < 1e-5
        assert r["full_reps_max_err"] < 1e-5
        assert r["max_in_edges"] <= 2
        # own partition sampled in process from the shared graph, the same sample as the servers'
        assert r["shared_graph"] and r["same_sample"] and r["seed_changes_sample"]
    # (b) every training edge is seen by exactly one worker, nothing else is
    seen = sorted(
        (int(u), int(i))
        for r in results
        for u, i in zip(r["train_users"], r["train_items"], strict=True)
    )
    expected = sorted(
        zip(data["users"][train].tolist(), data["items"][train].tolist(), strict=True)
    )
    assert seen == expected
    sizes = [len(r["train_users"]) for r in results]
    assert max(sizes) - min(sizes) <= 1
    # one SparseAdam step: touched rows moved by about -lr in every dim, the rest did not move
    parts = len(results)
    touched_users = sorted({u for p in range(parts) for u in (p, 10 + p)})
    touched_items = sorted({2 * p + 1 for p in range(parts)})
    for r in results:
        for delta, touched in ((r["user_delta"], touched_users), (r["item_delta"], touched_items)):
            mask = np.zeros(len(delta), dtype=bool)
            mask[touched] = True
            np.testing.assert_allclose(delta[mask], -0.1, atol=1e-3)
            assert np.abs(delta[~mask]).max() == 0.0
    # the in-place update of the worker's own rows is DGL's SparseAdam update, to float rounding
    assert all(r["update_max_err"] < 1e-6 for r in results)
    # embedding checkpoints: disjoint shards covering every user; reloading restores rows
    shard_users = np.concatenate([r["shard_users"] for r in results])
    np.testing.assert_array_equal(np.sort(shard_users), np.arange(data["num_users"]))
    assert all(r["reload_err"] == 0.0 for r in results)


def test_one_partition_matches_full_graph_and_covers_train_edges(tmp_path, graph_data):
    check_results(graph_data[0], run_cluster(tmp_path, graph_data, parts=1))


def test_two_partitions_on_one_host_split_train_edges_and_match_full_graph(tmp_path, graph_data):
    results = run_cluster(tmp_path, graph_data, parts=2)
    check_results(graph_data[0], results)
    assert all(len(r["train_users"]) > 0 for r in results)


def test_port_in_use_is_a_clear_error(tmp_path, graph_data):
    data, _ = graph_data
    part_config = partition(data, 2, tmp_path / "parts")
    port = free_base_port(count=2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as check_port_free binds: an earlier test's connection in TIME_WAIT on port + 1
        # (free for a server) must not fail this bind (CI saw EADDRINUSE here once)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port + 1))
        sock.listen(1)
        with pytest.raises(MagnetError, match=f"port {port + 1} on 127.0.0.1 is already in use"):
            start_servers(part_config, "127.0.0.1", port, log_dir=tmp_path / "logs")
    assert not list((tmp_path / "logs").glob("server-*.log"))  # nothing was started


def test_servers_that_do_not_listen_in_time_are_killed(tmp_path, graph_data):
    data, _ = graph_data
    part_config = partition(data, 2, tmp_path / "parts")
    port = free_base_port(count=2)
    with pytest.raises(MagnetError, match=r"did not listen on 127\.0\.0\.1:\d+ within") as err:
        start_servers(part_config, "127.0.0.1", port, log_dir=tmp_path / "logs", timeout_s=0.01)
    assert "server-0.log" in str(err.value)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        assert not ("magnet_dist.graph.servers" in cmd and str(part_config) in cmd), cmd


def test_stop_ends_servers_nobody_connected_to(tmp_path, graph_data):
    data, _ = graph_data
    part_config = partition(data, 1, tmp_path / "parts")
    servers = start_servers(
        part_config, "127.0.0.1", free_base_port(), log_dir=tmp_path / "logs", timeout_s=60
    )
    pid = servers.pids[0]
    assert servers.alive() == {0: True}
    servers.stop()
    assert servers.alive() == {0: False}
    assert not psutil.pid_exists(pid)


def test_server_binds_the_asked_address_with_its_threads(tmp_path, graph_data):
    """``bind_host`` is what the server listens on (0.0.0.0 only when asked; the ip_config the
    clients read keeps the address they dial), ``omp_threads`` its OpenMP/torch threads."""
    from magnet_dist.graph.servers import read_ip_config
    from magnet_dist.train.worker_info import listening_addresses

    data, _ = graph_data
    part_config = partition(data, 1, tmp_path / "parts")
    port = free_base_port()
    with start_servers(
        part_config,
        "127.0.0.1",
        port,
        log_dir=tmp_path / "logs",
        timeout_s=60,
        omp_threads=3,
        bind_host="0.0.0.0",
    ) as servers:
        pid = servers.pids[0]
        assert listening_addresses(pid) == [f"0.0.0.0:{port}"]
        assert psutil.Process(pid).environ()["OMP_NUM_THREADS"] == "3"
        assert [(a.host, a.port) for a in read_ip_config(servers.ip_config)] == [
            ("127.0.0.1", port)
        ]
    with start_servers(
        part_config, "127.0.0.1", port, log_dir=tmp_path / "logs2", timeout_s=60
    ) as servers:
        assert listening_addresses(servers.pids[0]) == [f"127.0.0.1:{port}"]


def test_watch_reports_a_dead_server_and_not_a_stopped_one(tmp_path, graph_data):
    """The watcher names a server that dies (its status and log) and stays silent when the
    servers are stopped on purpose."""
    import signal
    import threading

    data, _ = graph_data
    part_config = partition(data, 2, tmp_path / "parts")
    servers = start_servers(
        part_config, "127.0.0.1", free_base_port(count=2), log_dir=tmp_path / "logs", timeout_s=60
    )
    calls, fired = [], threading.Event()

    def on_exit(part, code, message):
        calls.append((part, code, message))
        fired.set()

    try:
        threads = servers.watch(on_exit)
        os.kill(servers.pids[1], signal.SIGKILL)
        assert fired.wait(30), "the watcher did not report the killed server"
        ((part, code, message),) = calls
        assert (part, code) == (1, -signal.SIGKILL)
        assert "graph server of partition 1" in message and "exited with status -9" in message
        assert str(servers.logs[1]) in message and "serving" in message  # the log's tail
    finally:
        servers.stop()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(calls) == 1, calls  # stopping server 0 on purpose is not reported


CONNECT_ONLY = """
import sys
from magnet_dist.errors import MagnetError
from magnet_dist.graph.dist import connect
try:
    connect(sys.argv[1], sys.argv[2], 0, timeout_s=float(sys.argv[3]))
except MagnetError as err:
    print("MagnetError:", err)
    sys.exit(3)
print("connected")
"""


def run_connect_only(part_config, ip_config, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONNECT_ONLY, str(part_config), str(ip_config), str(timeout_s)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_client_without_servers_gets_a_clear_error(tmp_path, graph_data):
    from magnet_dist.graph.servers import write_ip_config

    part_config = partition(graph_data[0], 1, tmp_path / "parts")
    ip_config = write_ip_config(tmp_path / "ip.txt", [("127.0.0.1", free_base_port())])
    res = run_connect_only(part_config, ip_config, timeout_s=3)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "could not connect to the graph servers listed in" in res.stdout


def test_client_waiting_for_missing_peers_is_ended_by_the_watchdog(tmp_path, graph_data):
    from magnet_dist.graph.dist import WATCHDOG_EXIT

    part_config = partition(graph_data[0], 1, tmp_path / "parts")
    port = free_base_port()
    # the server waits for 2 clients; only one comes, so its handshake never completes
    with start_servers(part_config, "127.0.0.1", port, num_clients=2, log_dir=tmp_path / "logs"):
        res = run_connect_only(part_config, tmp_path / "logs" / "ip_config.txt", timeout_s=3)
    assert res.returncode == WATCHDOG_EXIT, res.stdout + res.stderr
    assert "timed out after 13 s waiting for the graph servers" in res.stderr


CONNECT_AND_WAIT = """
import sys, time
from magnet_dist.graph.dist import connect
connect(sys.argv[1], sys.argv[2], 0, timeout_s=60)
print("connected", flush=True)
time.sleep(120)
"""


def test_client_keeps_the_process_signal_handlers(tmp_path, graph_data):
    """DGL's client replaces SIGTERM's handler with one that calls exit() inside the handler (and
    says "User pressed Ctrl+C"); Ray ends a worker with SIGTERM, which then aborted or segfaulted
    finished workers. A magnet_dist client keeps the process's handler: SIGTERM ends it as it
    would any Python process."""
    import signal

    part_config = partition(graph_data[0], 1, tmp_path / "parts")
    with start_servers(part_config, "127.0.0.1", free_base_port(), log_dir=tmp_path / "logs"):
        proc = subprocess.Popen(
            [sys.executable, "-c", CONNECT_AND_WAIT, str(part_config)]
            + [str(tmp_path / "logs" / "ip_config.txt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if line.startswith("connected"):
                    break
            assert seen and seen[-1].startswith("connected"), "".join(seen)
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0]
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out)
    assert "User pressed Ctrl+C" not in out, out


START_AND_DIE = """
import os, sys
from magnet_dist.graph.servers import start_servers
group = start_servers(sys.argv[1], "127.0.0.1", int(sys.argv[2]), log_dir=sys.argv[3])
print(group.pids[0], flush=True)
os._exit(9)  # no atexit, no stop(): like a driver killed by a signal
"""


def test_servers_end_when_the_process_that_started_them_dies(tmp_path, graph_data):
    part_config = partition(graph_data[0], 1, tmp_path / "parts")
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            START_AND_DIE,
            str(part_config),
            str(free_base_port()),
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    pid = int(res.stdout.split()[-1])
    try:
        psutil.Process(pid).wait(timeout=15)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(pid)
    assert "parent process" in (tmp_path / "logs" / "server-0.log").read_text()


@pytest.mark.parametrize("ray_kills_children", [False, True], ids=["job-env", "ray-default"])
def test_ray_ending_a_worker_leaves_its_graph_server_to_us(
    tmp_path, graph_data, ray_kills_children
):
    """Ray's core worker SIGKILLs its children while it ends itself, its threads still running:
    the server watcher of a worker that Ray tears down (after another worker failed) can then
    record a dead graph server that was only the teardown (found in CI). With the job's
    ``RAY_WORKER_ENV`` Ray leaves the server alone: the watcher stays silent and the server
    exits on its own once its parent is gone (its log says so). ``ray-default`` documents Ray's
    behaviour without it (the server is killed before it can notice its parent's death)."""
    import ray

    from magnet_dist.config import load_config
    from magnet_dist.graph._dgl_patches import shm_tag
    from magnet_dist.graph.servers import _remove_shm_segments
    from magnet_dist.train.distributed import RAY_WORKER_ENV, ray_cluster

    part_config = partition(graph_data[0], 1, tmp_path / "parts")
    reported = tmp_path / "reported"
    env = {k: "1" for k in RAY_WORKER_ENV} if ray_kills_children else {}

    @ray.remote(num_cpus=0, runtime_env={"env_vars": env})
    class ServerOwner:
        def start(self) -> tuple[int, int]:
            # the port is picked once Ray's own processes hold theirs (one picked before the
            # cluster started was once taken by the raylet)
            port = free_base_port()
            self.servers = start_servers(part_config, "127.0.0.1", port, log_dir=tmp_path / "logs")
            self.servers.watch(lambda part, code, message: reported.write_text(message))
            return self.servers.pids[0], port

    with ray_cluster(load_config(overrides=["train.workers=1"])):
        owner = ServerOwner.remote()
        pid, port = ray.get(owner.start.remote(), timeout=120)
        ray.kill(owner)
        try:
            psutil.Process(pid).wait(timeout=20)
        except psutil.NoSuchProcess:
            pass
    left = sorted(p.name for p in Path("/dev/shm").glob(f"*{shm_tag(0, port)}"))
    _remove_shm_segments(shm_tag(0, port))  # a SIGKILLed server's (ray-default) stay behind
    assert not psutil.pid_exists(pid), "the graph server outlived its worker"
    ended_itself = "parent process" in (tmp_path / "logs" / "server-0.log").read_text()
    assert ended_itself != ray_kills_children
    if not ray_kills_children:
        assert not reported.exists(), reported.read_text()
        assert left == [], left  # the server removed its shared memory itself
