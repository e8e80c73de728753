"""DGL graph servers started by magnet_dist itself (no ssh launcher): one subprocess per partition.

Each partition ``p`` is served by one ``DistGraphServer`` (``num_servers=1`` per "machine";
DGL's machine id = the partition id = the line of the ip_config). On one host every partition
needs its own port, so the single-host ip_config lists ``host base_port+p`` for partition p.
For several nodes, write one ip_config naming every partition's host and port
(:func:`write_ip_config`), put it on shared storage, and call :func:`start_servers` on each node
with the partitions that node serves; the clients of partition p must run on p's node (they read
p's node data through shared memory).

Servers wait until ``num_clients`` clients (all trainers of the job, all partitions together)
have connected; the first client's ``exit_client`` shuts them all down. :class:`ServerGroup`
stops whatever is still running by PID (terminate, then kill) on ``stop()``, on leaving its
``with`` block, and at interpreter exit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from magnet_dist.errors import MagnetError

READY_POLL_S = 0.2
PARENT_POLL_S = 1.0
GRAPH_FORMAT = "csc,coo"  # "csc" alone crashes the server on edge loading (DESIGN.md)


@dataclass
class ServerAddress:
    part: int
    host: str
    port: int


def write_ip_config(path: str | Path, addresses: list[tuple[str, int]]) -> Path:
    """Write DGL's ip_config: line p = ``host port`` of partition p's server."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{host} {int(port)}\n" for host, port in addresses))
    return path


def read_ip_config(path: str | Path) -> list[ServerAddress]:
    """Partition p's server address from line p of an ip_config written by magnet_dist."""
    out = []
    for p, line in enumerate(x for x in Path(path).read_text().splitlines() if x.strip()):
        fields = line.split()
        if len(fields) != 2:
            raise MagnetError(
                f"{path}: line {p + 1} must be 'host port' (one server per partition), got {line!r}"
            )
        out.append(ServerAddress(p, fields[0], int(fields[1])))
    return out


def num_partitions(part_config: str | Path) -> int:
    path = Path(part_config)
    if not path.is_file():
        raise MagnetError(
            f"partition config {path} does not exist; create it with `magnet-dist partition`"
        )
    return int(json.loads(path.read_text())["num_parts"])


def check_port_free(host: str, port: int) -> None:
    """Raise MagnetError if ``host:port`` cannot be bound (another process listens there).

    SO_REUSEADDR, as the DGL server's own socket: connections of a server that was just
    killed linger in TIME_WAIT on its port for a minute, which must not count as "in use"
    when a restarted worker group starts a server on the same fixed port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise MagnetError(
            f"port {port} on {host} is already in use ({err.strerror}); a DGL graph server needs "
            f"it: stop the process holding it or choose another trainer.server_port"
            f"{_holder(port)}"
        ) from None
    finally:
        sock.close()


def free_base_port(host: str = "127.0.0.1", count: int = 1, tries: int = 50) -> int:
    """A port p such that p .. p+count-1 are free now (for tests; racy by nature)."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            base = sock.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                check_port_free(host, port)
        except MagnetError:
            continue
        return base
    raise MagnetError(f"found no {count} consecutive free ports on {host}")


def _holder(port: int) -> str:
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    return f" (held by PID {conn.pid}: {psutil.Process(conn.pid).name()})"
    except Exception:  # noqa: BLE001 - best effort, permissions vary
        pass
    return ""


@dataclass
class ServerGroup:
    """The graph servers this process started (possibly a subset of all partitions)."""

    part_config: Path
    ip_config: Path
    num_clients: int
    addresses: list[ServerAddress]
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)
    start_s: float = 0.0
    _stop_watch: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def pids(self) -> dict[int, int]:
        return {p: proc.pid for p, proc in self.procs.items()}

    def alive(self) -> dict[int, bool]:
        return {p: proc.poll() is None for p, proc in self.procs.items()}

    def wait(self, timeout_s: float = 30.0) -> bool:
        """Wait for the servers to exit on their own (after the clients' exit); True if all did."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def watch(self, on_exit) -> list[threading.Thread]:
        """Call ``on_exit(part, returncode, message)`` from a daemon thread as soon as one of
        these servers exits before :meth:`unwatch` / :meth:`stop` (a server that dies
        mid-run: its clients would otherwise block in DGL's RPC until a watchdog fires, or
        abort on DGL's failed-send check without a word). One thread per server, blocked in
        ``wait()`` rather than polling, so the cause is recorded before the worker's next
        request to the dead server can abort the process. ``message`` names the partition,
        the address, the exit status and the log."""

        def wait_for(part: int, proc: subprocess.Popen) -> None:
            code = proc.wait()
            if self._stop_watch.is_set():
                return
            addr = self.addresses[part]
            on_exit(
                part,
                code,
                f"graph server of partition {part} (PID {proc.pid}, {addr.host}:"
                f"{addr.port}) exited with status {code} while training was running; "
                f"its log {self.logs.get(part)} ends with:\n{self.log_tail(part)}",
            )

        threads = [
            threading.Thread(
                target=wait_for, args=(part, proc), daemon=True, name=f"magnet-server-watch-{part}"
            )
            for part, proc in self.procs.items()
        ]
        for thread in threads:
            thread.start()
        return threads

    def unwatch(self) -> None:
        """End :meth:`watch` (before the servers are expected to exit, e.g. ``exit_client``)."""
        self._stop_watch.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate (then kill) every server still running, by PID, and reap it."""
        self.unwatch()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for part in self.procs:
            _remove_shm_segments(self._tag(part))
        atexit.unregister(self.stop)

    def _tag(self, part: int) -> str:
        from magnet_dist.graph._dgl_patches import shm_tag

        return shm_tag(part, self.addresses[part].port)

    def log_tail(self, part: int, lines: int = 20) -> str:
        path = self.logs.get(part)
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _remove_shm_segments(tag: str) -> None:
    """Remove the /dev/shm segments of one partition's server (left behind if it was killed)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    # KV-store segments end with the tag, the shared graph's start with it (_dgl_patches)
    for path in [*shm.glob(f"*{tag}"), *shm.glob(f"{tag}-*")]:
        try:
            path.unlink()
        except OSError:
            pass


def start_servers(
    part_config: str | Path,
    host: str = "127.0.0.1",
    base_port: int = 30050,
    parts: list[int] | None = None,
    *,
    num_clients: int | None = None,
    ip_config: str | Path | None = None,
    log_dir: str | Path | None = None,
    timeout_s: float = 120.0,
    omp_threads: int = 1,
    bind_host: str | None = None,
    share_graph: bool = False,
) -> ServerGroup:
    """Start the graph servers of ``parts`` (default: all) and wait until they listen.

    ``num_clients``: trainers that will connect, all partitions together (default: one per
    partition). ``ip_config``: an existing file naming every partition's server (multi-node);
    default: write ``<log_dir>/ip_config.txt`` with ``host base_port+p`` for every partition.
    ``bind_host``: the address the servers bind when it is not the one the clients dial
    (``0.0.0.0``); DGL's server binds its own line of the ip_config, so the servers get a copy
    with that line changed. ``omp_threads``: OpenMP / torch threads of each server (sampling).
    ``share_graph``: each server also puts its partition's graph structure in /dev/shm, for
    clients that sample their own partition in process (``connect(shared_graph=True)``).
    Raises MagnetError (after stopping what it started) if a port is taken, a server exits, or
    a server does not listen within ``timeout_s``.
    """
    part_config = Path(part_config).resolve()
    n_parts = num_partitions(part_config)
    parts = list(range(n_parts)) if parts is None else [int(p) for p in parts]
    bad = [p for p in parts if not 0 <= p < n_parts]
    if bad:
        raise MagnetError(f"partitions {bad} do not exist: {part_config} has {n_parts} parts")
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="magnet-dgl-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if ip_config is None:
        ip_config = write_ip_config(
            log_dir / "ip_config.txt", [(host, base_port + p) for p in range(n_parts)]
        )
    ip_config = Path(ip_config).resolve()
    addresses = read_ip_config(ip_config)
    if len(addresses) != n_parts:
        raise MagnetError(
            f"{ip_config} lists {len(addresses)} servers but {part_config} has {n_parts} "
            "partitions: it needs one 'host port' line per partition"
        )
    group = ServerGroup(
        part_config, ip_config, int(num_clients or n_parts), addresses, start_s=time.monotonic()
    )
    server_ip_config = ip_config
    if bind_host is not None and any(addresses[p].host != bind_host for p in parts):
        server_ip_config = write_ip_config(
            log_dir / "server_ip_config.txt",
            [(bind_host if a.part in parts else a.host, a.port) for a in addresses],
        )
    for p in parts:
        check_port_free(bind_host or addresses[p].host, addresses[p].port)
    atexit.register(group.stop)
    try:
        for p in parts:
            group.logs[p] = log_dir / f"server-{p}.log"
            with open(group.logs[p], "w") as log:
                group.procs[p] = subprocess.Popen(
                    [sys.executable, "-m", "magnet_dist.graph.servers", "--serve"]
                    + ["--part-config", str(part_config), "--ip-config", str(server_ip_config)]
                    + ["--part", str(p), "--num-clients", str(group.num_clients)]
                    + ["--parent-pid", str(os.getpid())]
                    + (["--share-graph"] if share_graph else []),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "OMP_NUM_THREADS": str(int(omp_threads))},
                    start_new_session=True,
                )
        _wait_listening(group, parts, timeout_s)
    except BaseException:
        group.stop()
        raise
    group.start_s = time.monotonic() - group.start_s
    return group


def _wait_listening(group: ServerGroup, parts: list[int], timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    pending = set(parts)
    while pending:
        for p in sorted(pending):
            proc = group.procs[p]
            addr = group.addresses[p]
            if proc.poll() is not None:
                raise MagnetError(
                    f"graph server of partition {p} ({addr.host}:{addr.port}) exited with status "
                    f"{proc.returncode} before listening; its log {group.logs[p]} ends with:\n"
                    f"{group.log_tail(p)}"
                )
            try:
                conns = psutil.Process(proc.pid).net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                conns = []
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == addr.port for c in conns):
                pending.discard(p)
        if not pending:
            return
        if time.monotonic() > deadline:
            p = min(pending)
            raise MagnetError(
                f"graph server of partition {p} did not listen on "
                f"{group.addresses[p].host}:{group.addresses[p].port} within {timeout_s:.0f} s "
                f"(trainer.server_timeout_s); see its log {group.logs[p]}:\n{group.log_tail(p)}"
            )
        time.sleep(READY_POLL_S)


# ----------------------------------------------------------------------------------------------
# the server process itself


def serve(
    part_config: str,
    ip_config: str,
    part: int,
    num_clients: int,
    parent_pid: int | None = None,
    share_graph: bool = False,
) -> None:
    """Run partition ``part``'s DistGraphServer until a client shuts it down (blocking).

    With ``parent_pid``, the server also ends when that process is gone (a killed driver leaves
    no orphan servers behind). ``share_graph``: see :func:`start_servers`."""
    addresses = read_ip_config(ip_config)
    os.environ.update(
        {
            "DGL_DIST_MODE": "distributed",
            "DGL_ROLE": "server",
            "DGL_SERVER_ID": str(part),
            "DGL_NUM_SERVER": "1",
            "DGL_NUM_CLIENT": str(num_clients),
            "DGL_IP_CONFIG": ip_config,
            "DGL_CONF_PATH": part_config,
            "DGL_GRAPH_FORMAT": GRAPH_FORMAT,
        }
    )
    from magnet_dist.graph import _dgl_patches

    tag = _dgl_patches.shm_tag(part, addresses[part].port)
    _dgl_patches.set_partition(part, tag)
    _remove_shm_segments(tag)  # of a killed server that had this partition and port
    if parent_pid is not None:
        threading.Thread(
            target=_exit_with_parent, args=(parent_pid, tag), daemon=True, name="parent-watch"
        ).start()
    import torch
    from dgl.distributed import rpc
    from dgl.distributed.dist_graph import DistGraphServer

    # sampling threads: OMP_NUM_THREADS from start_servers (trainer.server_threads)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
    rpc.reset()
    server = DistGraphServer(
        part,
        ip_config,
        1,
        num_clients,
        part_config,
        disable_shared_mem=True,
        graph_format=GRAPH_FORMAT.split(","),
    )
    if share_graph:  # under a per-partition name; the server then samples from that copy
        graph_name = json.loads(Path(part_config).read_text())["graph_name"]
        server.client_g = _dgl_patches.share_graph(
            server.client_g, graph_name, tag, GRAPH_FORMAT.split(",")
        )
    print(f"magnet_dist: partition {part} loaded, serving {num_clients} clients", flush=True)
    server.start()
    print(f"magnet_dist: partition {part} server exited", flush=True)


def _exit_with_parent(parent_pid: int, tag: str) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    print(f"magnet_dist: parent process {parent_pid} is gone; exiting", flush=True)
    _remove_shm_segments(tag)
    os._exit(0)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one magnet_dist DGL graph server (internal)")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--part-config", required=True)
    parser.add_argument("--ip-config", required=True)
    parser.add_argument("--part", type=int, required=True)
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--share-graph", action="store_true")
    args = parser.parse_args(argv)
    serve(
        args.part_config,
        args.ip_config,
        args.part,
        args.num_clients,
        args.parent_pid,
        args.share_graph,
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
