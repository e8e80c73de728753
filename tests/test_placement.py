"""Where graph servers bind and which workers may share a partition (train/cluster.py).

The end-to-end checks (real Ray nodes, a real refused placement) are in test_multinode.py;
these pin the rules on entries as ``start_partition_server`` all-gathers them:
``(rank, part, node_ip, advertised, port, bind)``, port only on a partition's owner.
"""

from __future__ import annotations

import pytest

from magnet_dist.errors import MagnetError
from magnet_dist.train.cluster import check_colocation, server_bind_host


def entry(rank, part, node, port=None):
    return (rank, part, node, node, port, node)


def test_workers_on_their_partition_server_node_pass():
    check_colocation(
        [entry(0, 0, "10.0.0.1", 30050), entry(1, 0, "10.0.0.1"), entry(2, 1, "10.0.0.2", 30051)],
        "node",
    )


def test_a_worker_away_from_its_partition_server_is_refused_with_names():
    entries = [entry(0, 0, "10.0.0.1", 30050), entry(1, 0, "10.0.0.2")]
    with pytest.raises(MagnetError) as err:
        check_colocation(entries, "node")
    text = str(err.value)
    for part in ("rank 1", "node 10.0.0.2", "partition 0", "node 10.0.0.1", "STRICT_SPREAD"):
        assert part in text, text


def test_loopback_servers_across_nodes_are_refused():
    entries = [entry(0, 0, "10.0.0.1", 30050), entry(1, 1, "10.0.0.2", 30051)]
    with pytest.raises(MagnetError, match="trainer.host: node"):
        check_colocation(entries, "127.0.0.1")
    check_colocation([entry(0, 0, "127.0.0.1", 1), entry(1, 1, "127.0.0.1", 2)], "127.0.0.1")


def test_bind_host_is_what_the_config_says():
    assert server_bind_host("127.0.0.1", "10.0.0.7") == "127.0.0.1"
    assert server_bind_host("node", "10.0.0.7") == "10.0.0.7"
    assert server_bind_host("0.0.0.0", "10.0.0.7") == "0.0.0.0"
    assert server_bind_host("node", "10.0.0.7", interface="lo") == "127.0.0.1"
    with pytest.raises(MagnetError, match="trainer.interface='no-such-nic'"):
        server_bind_host("node", "10.0.0.7", interface="no-such-nic")
