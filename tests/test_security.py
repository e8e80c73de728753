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


def test_bench_runs_only_its_own_benchmarks(tmp_path, capsys):
    from magnet_dist.cli import main

    evil = tmp_path / "evil.py"
    marker = tmp_path / "ran"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n")
    for name in (str(evil), str(tmp_path / "evil"), "../launch/train", "train"):
        assert main(["bench", name]) == 2, name
        err = capsys.readouterr().err
        assert f"unknown benchmark {name!r}; available: " in err and "scale" in err, err
        assert "Traceback" not in err
    assert not marker.exists()


def test_fault_hooks_need_their_explicit_enable(capsys):
    """MAGNET_FAULT_* in a production environment does nothing (and says so); only
    MAGNET_ENABLE_FAULT_HOOKS=1, which only the tests set, turns the hooks on."""
    from magnet_dist.train.faults import FaultHooks, fault_hooks_from

    env = {"MAGNET_FAULT_KILL_AT_STEP": "3@0", "MAGNET_FAULT_MARKER": "/tmp/m", "PATH": "/bin"}
    assert fault_hooks_from(env) == {}
    assert "ignoring MAGNET_FAULT_KILL_AT_STEP, MAGNET_FAULT_MARKER" in capsys.readouterr().err
    assert FaultHooks(env, rank=0, part=0).env == {}
    assert not FaultHooks(env, rank=0, part=0)._due("KILL_AT_STEP", 3, 0)
    enabled = {**env, "MAGNET_ENABLE_FAULT_HOOKS": "1"}
    forwarded = fault_hooks_from(enabled)
    assert forwarded == {
        "MAGNET_FAULT_KILL_AT_STEP": "3@0",
        "MAGNET_FAULT_MARKER": "/tmp/m",
        "MAGNET_ENABLE_FAULT_HOOKS": "1",
    }
    hooks = FaultHooks({"MAGNET_FAULT_KILL_AT_STEP": "3@0", **forwarded}, rank=0, part=0)
    hooks.env.pop("MAGNET_FAULT_MARKER")  # no marker file for this check
    assert hooks._due("KILL_AT_STEP", 3, 0) and not hooks._due("KILL_AT_STEP", 4, 0)
    assert fault_hooks_from({"MAGNET_FAULT_LOG": "/x", "MAGNET_ENABLE_FAULT_HOOKS": "1"}) == {}


EMBEDDED_AFTER_IMPORT = """
import json, psutil
import ray  # a user's program (or an earlier test module) imported ray before magnet_dist
from magnet_dist.config import load_config
from magnet_dist.train.distributed import ray_cluster
with ray_cluster(load_config(overrides=["train.workers=1"])):
    me = psutil.Process()
    pids = [p.pid for p in me.children(recursive=True)] + [me.pid]
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
print("LISTEN " + json.dumps(found))
"""


@pytest.mark.integration
def test_embedded_ray_stays_on_loopback_when_ray_was_imported_first(tmp_path):
    """Ray reads its loopback flag when it is imported: a program that imported ray before
    magnet_dist got an embedded cluster listening on every interface."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", EMBEDDED_AFTER_IMPORT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("LISTEN "))
    ips = json.loads(line.removeprefix("LISTEN "))
    assert ips, "found no Ray listener to check"
    assert all(_loopback(ip) for ip in ips), ips
