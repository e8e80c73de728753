"""Ray's token file stays private: magnet_dist creates it 0600 before an embedded cluster
starts (Ray 2.60 writes it 0644 under the usual umask) and tightens a readable one of ours."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from magnet_dist.train.ray_auth import make_private, private_token_for_new_cluster, token_file


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_token_file_is_created_private_before_a_cluster_starts(home):
    path = private_token_for_new_cluster()
    assert path == home / ".ray" / "auth_token"
    assert mode(path) == 0o600 and len(path.read_text()) == 64  # secrets.token_hex(32), as Ray
    token = path.read_text()
    assert private_token_for_new_cluster() == path and path.read_text() == token  # kept


def test_a_readable_token_file_of_ours_is_made_private(home, monkeypatch, capsys):
    path = home / "elsewhere" / "token"
    path.parent.mkdir()
    path.write_text("x" * 64)
    os.chmod(path, 0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert token_file() == path
    assert make_private(token_file()) and mode(path) == 0o600
    assert "private (mode 644 -> 600)" in capsys.readouterr().err
    assert not make_private(path)  # already private: nothing to do


def test_no_token_file_when_auth_is_off_or_the_token_is_in_the_environment(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert token_file() is None and private_token_for_new_cluster() is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    assert token_file() is None
    assert not (home / ".ray").exists()


@pytest.mark.integration
def test_embedded_cluster_uses_a_private_token_file(tmp_path):
    """A real embedded Ray cluster (own process, own HOME): token auth on, the file 0600."""
    token = tmp_path / "home" / ".ray" / "auth_token"
    code = (
        "from magnet_dist.config import load_config\n"
        "from magnet_dist.train.distributed import ray_cluster\n"
        "with ray_cluster(load_config(overrides=['train.workers=1'])):\n"
        "    import ray\n"
        "    from ray._private.authentication.authentication_utils import is_token_auth_enabled\n"
        "    print('auth', is_token_auth_enabled(), ray.cluster_resources().get('CPU'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "auth True" in done.stdout, done.stdout
    assert mode(token) == 0o600 and len(token.read_text()) == 64
