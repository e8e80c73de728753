"""Heterograph build, local block sampling vs the full graph, DGL partitioning (one process)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import dgl
import numpy as np
import pytest
import torch

from magnet_dist.errors import DataError, MagnetError
from magnet_dist.graph.partition import (
    II,
    IU,
    META_FILE,
    UI,
    build_heterograph,
    partition_arrays,
    partition_dataset,
    read_meta,
)
from magnet_dist.graph.sampling import LocalGraph, sample_blocks

WORKER = Path(__file__).with_name("graph_dist_worker.py")
_spec = importlib.util.spec_from_file_location("graph_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def data():
    return worker.make_graph_data()


def train_pairs(data):
    train = data["split"] == 0
    return data["users"][train], data["items"][train]


def heterograph(data):
    return worker.heterograph(data)


def partition(data, out, parts=2, method="random", checksum="c1"):
    users, items = train_pairs(data)
    return partition_arrays(
        data["num_users"],
        data["num_items"],
        users,
        items,
        data["content_src"],
        data["content_dst"],
        data["content_weight"],
        {"t": data["feat_t"], "v": data["feat_v"]},
        num_parts=parts,
        out_dir=out,
        method=method,
        checksum=checksum,
        verbose=False,
    )


def test_graph_holds_only_training_interactions_with_full_graph_degrees(data):
    g = heterograph(data)
    users, items = train_pairs(data)
    assert g.num_edges(UI) == g.num_edges(IU) == len(users)
    got = set(zip(*[x.tolist() for x in g.edges(etype=UI)], strict=True))
    assert got == set(zip(users.tolist(), items.tolist(), strict=True))
    held_out = data["split"] != 0
    assert not got & set(
        zip(data["users"][held_out].tolist(), data["items"][held_out].tolist(), strict=True)
    )
    deg_u = np.bincount(users, minlength=data["num_users"])
    deg_i = np.bincount(items, minlength=data["num_items"])
    content = np.bincount(data["content_dst"], data["content_weight"], minlength=data["num_items"])
    np.testing.assert_allclose(g.nodes["user"].data["deg_o"], deg_u)
    np.testing.assert_allclose(g.nodes["user"].data["deg_a"], deg_u)
    np.testing.assert_allclose(g.nodes["item"].data["deg_o"], deg_i)
    np.testing.assert_allclose(g.nodes["item"].data["deg_a"], deg_i + content, rtol=1e-6)
    np.testing.assert_allclose(g.edges[II].data["weight"], data["content_weight"])
    assert g.nodes["item"].data["feat_t"].shape == (data["num_items"], 6)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_sampled_hops_with_all_neighbours_equal_the_full_graph(data, layers):
    model = worker.make_model()
    model.encoder.layers = layers
    u, i = data["num_users"], data["num_items"]
    torch.manual_seed(1)
    user_emb, item_emb = torch.randn(u, worker.DIM), torch.randn(i, worker.DIM)
    ref = worker.reference_reps(data, model, user_emb, item_emb, layers)
    seed_users = torch.tensor([5, 0, 5, u - 1])
    seed_items = torch.tensor([3, i - 1, 3])
    b = sample_blocks(
        LocalGraph(heterograph(data)), seed_users, seed_items, [-1] * layers, ["t", "v"]
    )
    assert len(b.hops) == layers
    emb = torch.cat([user_emb[b.input_users], item_emb[b.input_items]])
    with torch.no_grad():
        out = model.encode(b.hops, emb, b.features, b.is_item_in, b.is_item_out)
    for m in out:
        torch.testing.assert_close(out[m][b.user_rows], ref[m][seed_users], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[m][b.item_rows], ref[m][u + seed_items], atol=1e-5, rtol=0)
    # output nodes are a prefix (per type) of the input nodes
    torch.testing.assert_close(
        b.input_users[b.output_in_input[~b.is_item_out]], torch.unique(seed_users)
    )
    torch.testing.assert_close(
        b.input_items[b.output_in_input[b.is_item_out] - len(b.input_users)],
        torch.unique(seed_items),
    )


def test_features_hold_only_item_rows(data):
    b = sample_blocks(
        LocalGraph(heterograph(data)), torch.tensor([1]), torch.tensor([2]), [-1], ["t"]
    )
    assert b.features["t"].shape[0] == int(b.is_item_in.sum()) == b.input_items.numel()
    torch.testing.assert_close(b.features["t"], torch.from_numpy(data["feat_t"])[b.input_items])


def test_fanout_limits_neighbours_per_edge_type(data):
    b = sample_blocks(
        LocalGraph(heterograph(data)), torch.arange(10), torch.arange(10), [3, 2], ["t"]
    )
    for hop, fanout in zip(b.hops, [3, 2], strict=True):
        for sel in (hop.norm_observed > 0, hop.norm_observed == 0):  # ui/iu vs ii edges
            assert torch.bincount(hop.dst[sel], minlength=hop.num_dst).max() <= fanout


@pytest.mark.parametrize("method", ["random", "metis"])
def test_partition_balance_and_id_maps(tmp_path, data, method):
    config = partition(data, tmp_path / "p", method=method)
    meta = read_meta(tmp_path / "p")
    users, _ = train_pairs(data)
    bal = meta["balance"]
    assert len(bal) == 2 and meta["method"] == method
    assert sum(r["user_nodes"] for r in bal) == data["num_users"]
    assert sum(r["item_nodes"] for r in bal) == data["num_items"]
    assert sum(r["train_edges"] for r in bal) == len(users)
    assert sum(r["ii_edges"] for r in bal) == len(data["content_src"])
    for nt, n in (("user", data["num_users"]), ("item", data["num_items"])):
        new2orig = np.load(tmp_path / "p" / "id_map" / f"{nt}_new2orig.npy")
        orig2new = np.load(tmp_path / "p" / "id_map" / f"{nt}_orig2new.npy")
        np.testing.assert_array_equal(new2orig[orig2new], np.arange(n))
    assert json.loads(Path(config).read_text())["num_parts"] == 2


def test_partition_folder_is_reused_or_rejected(tmp_path, data):
    config = partition(data, tmp_path / "p")
    stamp = Path(config).stat().st_mtime_ns
    assert partition(data, tmp_path / "p") == config
    assert Path(config).stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(MagnetError, match="num_parts: folder has 2, wanted 3.*delete it"):
        partition(data, tmp_path / "p", parts=3)
    with pytest.raises(MagnetError, match="checksum: folder has 'c1', wanted 'c2'"):
        partition(data, tmp_path / "p", checksum="c2")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "x").write_text("")
    with pytest.raises(MagnetError, match=f"no {META_FILE}"):
        partition(data, tmp_path / "q")


def write_dataset(data, path: Path, content: bool = True) -> Path:
    from magnet_dist.data.writer import DatasetWriter
    from magnet_dist.graph.content import write_content_edges

    with DatasetWriter(path, source="synthetic", seed=0) as w:
        w.write_interactions(data["users"], data["items"], data["split"])
        w.write_features("t", data["feat_t"])
        w.write_features("v", data["feat_v"])
        w.commit(data["num_users"], data["num_items"])
    if content:
        write_content_edges(
            path, data["content_src"], data["content_dst"], data["content_weight"], {}
        )
    return path


def test_partition_command_on_a_dataset_folder(tmp_path, data, capsys):
    from magnet_dist.cli import main

    ds = write_dataset(data, tmp_path / "ds")
    out = tmp_path / "parts"
    argv = ["partition", "--data", str(ds), "--parts", "2", "--method", "random"]
    assert main([*argv, "--out", str(out)]) == 0
    meta = read_meta(out)
    assert meta["num_train_edges"] == int((data["split"] == 0).sum())
    assert meta["modalities"] == {"t": 6, "v": 3}
    assert "train_edges" in capsys.readouterr().out
    # same inputs: reused; changed content edges: a clear error
    assert partition_dataset(ds, 2, "random", out, verbose=False) == out / "magnet.json"
    from magnet_dist.graph.content import write_content_edges

    write_content_edges(
        ds, data["content_src"][:4], data["content_dst"][:4], data["content_weight"][:4], {}
    )
    with pytest.raises(MagnetError, match="checksum"):
        partition_dataset(ds, 2, "random", out, verbose=False)


def test_partition_without_content_edges_names_the_content_command(tmp_path, data):
    ds = write_dataset(data, tmp_path / "ds", content=False)
    with pytest.raises(DataError, match="magnet-dist content --data"):
        partition_dataset(ds, 1, "random", tmp_path / "p", verbose=False)


def test_graph_without_content_edges_partitions_and_samples(tmp_path, data):
    users, items = train_pairs(data)
    u, i = data["num_users"], data["num_items"]
    feats = {"t": data["feat_t"], "v": data["feat_v"]}
    g = build_heterograph(u, i, users, items, None, None, None, feats)
    assert II not in g.canonical_etypes
    np.testing.assert_allclose(g.nodes["item"].data["deg_a"], g.nodes["item"].data["deg_o"])
    b = sample_blocks(LocalGraph(g), torch.tensor([1, 2]), torch.tensor([0]), [-1, -1], ["t"])
    assert all((h.norm_augmented == h.norm_observed).all() for h in b.hops)
    partition_arrays(
        u,
        i,
        users,
        items,
        None,
        None,
        None,
        feats,
        num_parts=2,
        out_dir=tmp_path / "p",
        method="metis",
        checksum="x",
        verbose=False,
    )
    assert sum(r["train_edges"] for r in read_meta(tmp_path / "p")["balance"]) == len(users)


def test_rescaled_one_hop_sampling_is_unbiased(data):
    """With a small fanout, the degree/sampled rescaling makes the one-hop propagation an
    unbiased estimate of the full-graph one (mean over many samples ~ full; without the
    rescaling high-degree nodes are biased low)."""
    model = worker.make_model()
    model.encoder.layers = 1
    u, i = data["num_users"], data["num_items"]
    torch.manual_seed(2)
    user_emb, item_emb = torch.randn(u, worker.DIM), torch.randn(i, worker.DIM)
    ref = worker.reference_reps(data, model, user_emb, item_emb, 1)
    graph = LocalGraph(heterograph(data))
    seed_users, seed_items = torch.arange(u), torch.arange(i)

    def mean_estimate(rescale: bool, draws: int = 200) -> torch.Tensor:
        total = 0
        for d in range(draws):
            dgl.seed(d)
            b = sample_blocks(graph, seed_users, seed_items, [2], ["t", "v"], rescale=rescale)
            emb = torch.cat([user_emb[b.input_users], item_emb[b.input_items]])
            with torch.no_grad():
                out = model.encode(b.hops, emb, b.features, b.is_item_in, b.is_item_out)
            total = total + out["behaviour"][b.user_rows]
        return total / draws

    full = ref["behaviour"][seed_users]
    err_rescaled = (mean_estimate(True) - full).abs().mean()
    err_plain = (mean_estimate(False) - full).abs().mean()
    assert err_rescaled < 0.25 * err_plain, (err_rescaled, err_plain)
