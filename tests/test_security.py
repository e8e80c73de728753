"""Security defaults: loopback-only listeners, tensors-only checkpoint loading, no shell."""

from __future__ import annotations

import ast
from pathlib import Path

import psutil
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "magnet_dist"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node, name in _calls(ast.parse(path.read_text())):
            if name.endswith("torch.load") or name == "th.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
                if not ok:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_shell_commands():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node, name in _calls(ast.parse(path.read_text())):
            shell = any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                for k in node.keywords
            )
            if shell or name in ("os.system", "os.popen", "subprocess.getoutput"):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert not bad, f"shell command lines: {bad}"


def _listening(pids: list[int]) -> list[tuple[int, str, int]]:
    out = []
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((pid, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return out


def _loopback(ip: str) -> bool:
    return ip.removeprefix("::ffff:") in ("127.0.0.1", "::1")


@pytest.mark.integration
def test_graph_server_listens_on_loopback_only(tiny_dataset, tmp_path):
    from magnet_dist.graph.partition import partition_dataset
    from magnet_dist.graph.servers import free_base_port, start_servers

    part_config = partition_dataset(tiny_dataset, 1, method="random", out_dir=tmp_path / "p1")
    with start_servers(part_config, base_port=free_base_port(), log_dir=tmp_path / "logs") as g:
        sockets = _listening(list(g.pids.values()))
    assert sockets and all(_loopback(ip) for _, ip, _ in sockets), sockets


@pytest.mark.integration
def test_embedded_ray_listens_on_loopback_only():
    from magnet_dist.config import load_config
    from magnet_dist.train.distributed import ray_cluster

    with ray_cluster(load_config(overrides=["train.workers=1"])):
        import ray

        @ray.remote(num_cpus=0)
        def pid() -> int:
            import os

            return os.getpid()

        ray.get(pid.remote())  # a worker process too
        me = psutil.Process()
        sockets = _listening([p.pid for p in me.children(recursive=True)] + [me.pid])
    assert sockets, "found no Ray listener to check"
    assert all(_loopback(ip) for _, ip, _ in sockets), sockets
