"""The DGL client's connect-back address (graph/_dgl_patches.py, patch 5): the port range of
``trainer.client_ports`` and the address of ``trainer.interface``, for NetworkPolicies and
multi-NIC nodes."""

from __future__ import annotations

import socket

import pytest

from magnet_dist.graph import _dgl_patches
from magnet_dist.graph.servers import free_base_port


def test_without_settings_dgl_chooses(monkeypatch):
    monkeypatch.delenv(_dgl_patches.ENV_CLIENT_PORTS, raising=False)
    monkeypatch.delenv(_dgl_patches.ENV_CLIENT_IP, raising=False)
    ip, port = _dgl_patches._get_local_usable_addr("127.0.0.1").rsplit(":", 1)
    assert ip == "127.0.0.1" and int(port) > 0


def test_port_comes_from_the_configured_range_and_skips_taken_ones(monkeypatch):
    low = free_base_port("127.0.0.1", count=2)
    with socket.socket() as taken:
        # free_base_port's check allows TIME_WAIT connections on the port; so must this bind
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", low))
        taken.listen(1)
        monkeypatch.setenv(_dgl_patches.ENV_CLIENT_PORTS, f"{low}-{low + 1}")
        monkeypatch.setenv(_dgl_patches.ENV_CLIENT_IP, "127.0.0.1")
        assert _dgl_patches._get_local_usable_addr("127.0.0.1") == f"127.0.0.1:{low + 1}"
        monkeypatch.setenv(_dgl_patches.ENV_CLIENT_PORTS, f"{low}-{low}")
        with pytest.raises(RuntimeError, match="widen trainer.client_ports"):
            _dgl_patches._get_local_usable_addr("127.0.0.1")


def test_the_interface_address_replaces_the_routed_one(monkeypatch):
    monkeypatch.delenv(_dgl_patches.ENV_CLIENT_PORTS, raising=False)
    monkeypatch.setenv(_dgl_patches.ENV_CLIENT_IP, "127.0.0.5")
    assert _dgl_patches._get_local_usable_addr("127.0.0.1").startswith("127.0.0.5:")
