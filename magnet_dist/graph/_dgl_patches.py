"""Patches that make several DGL partitions' servers and clients work on one host.

DGL 2.1 assumes one partition per machine (DESIGN.md, "DGL distributed on one host"):

1. The KV store names its /dev/shm segments only by tensor name (``node~item~feat-kvdata-``), so
   two partitions' servers on one host overwrite each other's node data. Here every KV-store
   segment gets a per-partition suffix (the partition id and its server's port, unique on a host
   while the server lives); a client maps the segments of *its* partition's server, which must
   therefore run on the same host (it reads its partition's data from shared memory).
   The same goes for the partition's graph structure: a server started with ``share_graph``
   puts it in /dev/shm under ``<tag>-<graph name>`` (:func:`share_graph`; DGL's own copy, which
   the servers skip with ``disable_shared_mem=True``, would use the bare graph name), and a
   client maps it only when asked (``MAGNET_DGL_SHARED_GRAPH=1``, from
   ``connect(shared_graph=True)``): DGL then samples the seeds of the client's own partition
   in the client, with no RPC, and sends only the other partitions' seeds to their servers.
   The partition book is never shared (clients pass it), and with the variable unset no shared
   graph is looked up, so a stale segment of another run is never picked up.
2. Every client resolves itself as machine 0 (it matches local IPs against the ip_config), so
   ``edge_split`` and the KV store's "local partition" are wrong for all but one client. Here the
   machine id is the partition id given by magnet_dist.

3. Neighbour sampling runs on the graph servers with the server's own random stream, so what a
   worker samples depends on the order in which every worker's requests reach the server:
   not reproducible, and not resumable from a checkpoint. Here each sampling call gets a seed
   chosen by the client (:func:`sampling_seed`, derived from (seed, epoch, step, rank)); its
   requests carry it, and whoever samples a partition's seeds (that partition's server, or the
   client itself from the shared graph) reseeds DGL's generator with (call seed, partition)
   first. So a sample does not depend on which path served it.
4. A DGL client installs a C-level SIGINT/SIGTERM handler that logs "User pressed Ctrl+C" and
   calls ``exit(1)`` from inside the signal handler. In a Ray worker, the raylet ends the worker
   with SIGTERM after the run: DGL's handler then ran the process's exit while its threads
   still ran, and the worker aborted or segfaulted at the end of a finished run (stack traces
   in the quick start's output; the SIGTERM sender seen with strace). magnet_dist's clients keep
   the process's own handlers (Ray's, Python's); the servers keep DGL's.
5. A DGL client tells the servers where to connect back to it: the local address on the route
   to its server, and a port the kernel picks (bound, closed, listened on later). For firewalls
   (a Kubernetes NetworkPolicy) and multi-NIC nodes, ``MAGNET_DGL_CLIENT_PORTS=LOW-HIGH``
   (``trainer.client_ports``) takes the port from that range, and ``MAGNET_DGL_CLIENT_IP``
   (the address of ``trainer.interface``) sets the address.

The patches live in this imported module (not inside a function) so that processes which import
DGL through magnet_dist get them; the per-process values come from ``MAGNET_DGL_PART`` /
``MAGNET_DGL_SHM_TAG`` (so child processes such as DGL sampler workers inherit them) or from
:func:`set_partition`. With neither set, DGL behaves as shipped.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
from dgl import random as _dgl_random
from dgl._ffi import ndarray as _ndarray
from dgl.distributed import dist_graph as _dist_graph
from dgl.distributed import graph_services as _graph_services
from dgl.distributed import kvstore as _kvstore
from dgl.distributed import rpc as _rpc
from dgl.distributed import rpc_client as _rpc_client

ENV_PART = "MAGNET_DGL_PART"
ENV_SHM_TAG = "MAGNET_DGL_SHM_TAG"
ENV_CLIENT_PORTS = "MAGNET_DGL_CLIENT_PORTS"
ENV_CLIENT_IP = "MAGNET_DGL_CLIENT_IP"
ENV_SHARED_GRAPH = "MAGNET_DGL_SHARED_GRAPH"

_orig_get_local_machine_id = _rpc_client.get_local_machine_id
_orig_empty_shared_mem = _ndarray.empty_shared_mem
_orig_graph_from_shm = _dist_graph._get_graph_from_shared_mem
_orig_gpb_from_shm = _dist_graph.get_shared_mem_partition_book
_Request = _graph_services.SamplingRequestEtype
_orig_req_init = _Request.__init__
_orig_req_getstate = _Request.__getstate__
_orig_req_setstate = _Request.__setstate__
_orig_req_process = _Request.process_request
_orig_register_sig_handler = _rpc.register_sig_handler
_orig_get_local_usable_addr = _rpc_client.get_local_usable_addr

# client side: the seed of the sampling call being issued (None: the servers' own streams)
_sampling: dict[str, int | None] = {"base": None, "count": 0, "call": None}


def shm_tag(part_id: int, port: int) -> str:
    """The suffix of a partition's KV-store segments: unique on a host while its server runs."""
    return f"magnet-p{int(part_id)}-{int(port)}"


def set_partition(part_id: int, tag: str) -> None:
    """This process serves or reads partition ``part_id``; its KV-store segments carry ``tag``."""
    os.environ[ENV_PART] = str(int(part_id))
    os.environ[ENV_SHM_TAG] = tag


def current_partition() -> int | None:
    value = os.environ.get(ENV_PART)
    return int(value) if value not in (None, "") else None


def current_tag() -> str | None:
    return os.environ.get(ENV_SHM_TAG) or None


def _get_local_machine_id(server_namebook):
    part = current_partition()
    if part is None:
        return _orig_get_local_machine_id(server_namebook)
    machines = {data[0] for data in server_namebook.values()}
    if part not in machines:
        raise RuntimeError(
            f"magnet_dist: partition {part} has no server in the ip_config "
            f"(machines {sorted(machines)})"
        )
    return part


def _kv_empty_shared_mem(name, is_create, shape, dtype="float32"):
    tag = current_tag()
    if tag is not None:
        name = f"{name}{tag}"
    return _orig_empty_shared_mem(name, is_create, shape, dtype)


def shared_graph_name(graph_name: str, tag: str) -> str:
    """The /dev/shm name of a partition's shared graph structure (its segments start with it)."""
    return f"{tag}-{graph_name}"


def share_graph(g, graph_name: str, tag: str, graph_format):
    """Put a server's partition graph in shared memory under :func:`shared_graph_name`; the
    server then serves from that copy (DGL's own copy step, without the per-partition name)."""
    return _dist_graph._copy_graph_to_shared_mem(
        g, shared_graph_name(graph_name, tag), graph_format, False
    )


def _graph_from_shm(graph_name, use_graphbolt):
    tag = current_tag()
    if tag is None:
        return _orig_graph_from_shm(graph_name, use_graphbolt)
    if os.environ.get(ENV_SHARED_GRAPH) != "1" or use_graphbolt:
        return None
    g = _orig_graph_from_shm(shared_graph_name(graph_name, tag), use_graphbolt)
    if g is None:
        raise RuntimeError(
            f"magnet_dist: the shared graph {shared_graph_name(graph_name, tag)!r} of this "
            "client's partition is not in /dev/shm: its server must run on this host, "
            "started with share_graph"
        )
    return g


def _gpb_from_shm(graph_name):
    if current_tag() is not None:
        return None
    return _orig_gpb_from_shm(graph_name)


def _derive_seed(base: int, count: int) -> int:
    """A 31-bit seed (DGL takes a C int) from the base seed and the request's position."""
    return int(np.random.SeedSequence([base, count]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def sampling_seed(seed: int | None):
    """Neighbour sampling inside the block is a pure function of ``seed``: every sampling call
    gets its own seed (``seed`` and the call's position in the block), and each partition's
    seeds are sampled after reseeding with (call seed, partition id), on the server or in the
    client, whatever the other clients do meanwhile."""
    if seed is None:
        yield
        return
    previous = dict(_sampling)
    _sampling.update(base=int(seed), count=0, call=None)
    try:
        yield
    finally:
        _sampling.update(previous)


def next_sampling_seed() -> int | None:
    """Start the next sampling call inside :func:`sampling_seed`: its seed, which the call's
    requests carry (None outside: the servers' own streams)."""
    if _sampling["base"] is None:
        _sampling["call"] = None
        return None
    _sampling["count"] += 1
    _sampling["call"] = _derive_seed(_sampling["base"], _sampling["count"])
    return _sampling["call"]


def partition_seed(call_seed: int, part_id: int) -> int:
    """The generator seed for sampling partition ``part_id``'s seeds in one call."""
    return _derive_seed(call_seed, int(part_id))


def _req_init(self, *args, **kwargs):
    _orig_req_init(self, *args, **kwargs)
    self.magnet_seed = _sampling["call"]


def _req_getstate(self):
    return (_orig_req_getstate(self), getattr(self, "magnet_seed", None))


def _req_setstate(self, state):
    inner, self.magnet_seed = state
    _orig_req_setstate(self, inner)


def _req_process(self, server_state):
    seed = getattr(self, "magnet_seed", None)
    if seed is not None:
        _dgl_random.seed(partition_seed(seed, server_state.partition_book.partid))
    return _orig_req_process(self, server_state)


def _register_sig_handler():
    if os.environ.get("DGL_ROLE") == "client" and current_partition() is not None:
        return  # a magnet_dist client (patch 4)
    _orig_register_sig_handler()


_Request.__init__ = _req_init
_Request.__getstate__ = _req_getstate
_Request.__setstate__ = _req_setstate
_Request.process_request = _req_process


def _get_local_usable_addr(probe_addr):
    """DGL's choice of the client's connect-back ``ip:port``, within ``$MAGNET_DGL_CLIENT_PORTS``
    and at ``$MAGNET_DGL_CLIENT_IP`` when set."""
    import socket

    ports, ip = os.environ.get(ENV_CLIENT_PORTS), os.environ.get(ENV_CLIENT_IP)
    if not ports and not ip:
        return _orig_get_local_usable_addr(probe_addr)
    default_ip, default_port = _orig_get_local_usable_addr(probe_addr).rsplit(":", 1)
    ip = ip or default_ip
    if not ports:
        return f"{ip}:{default_port}"
    low, high = (int(x) for x in ports.split("-"))
    candidates = list(range(low, high + 1))
    start = (os.getpid() * 7919) % len(candidates)  # spread the clients of one node
    for port in candidates[start:] + candidates[:start]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, port))
            except OSError:
                continue
        return f"{ip}:{port}"
    raise RuntimeError(
        f"no free port for the DGL client's connect-back in {ENV_CLIENT_PORTS}={ports} on {ip}; "
        "widen trainer.client_ports"
    )


_rpc_client.get_local_machine_id = _get_local_machine_id
_kvstore.empty_shared_mem = _kv_empty_shared_mem
_dist_graph._get_graph_from_shared_mem = _graph_from_shm
_dist_graph.get_shared_mem_partition_book = _gpb_from_shm
_rpc.register_sig_handler = _register_sig_handler
_rpc_client.get_local_usable_addr = _get_local_usable_addr
