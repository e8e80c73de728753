"""A DGL graph client process for tests/test_graph_dist.py (also: the synthetic test graph).

Run as ``python graph_dist_worker.py DATA.npz PART_CONFIG IP_CONFIG PART WORLD OUT.npz``: connects
as partition PART, checks the sampled encoder against the full-graph reference, takes its
training edges, does one SparseAdam step (gloo group of WORLD processes when WORLD > 1) and writes
what it saw to OUT.npz for the test to compare across workers.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

DIM = 4
LAYERS = 2


def make_graph_data(seed: int = 0, users: int = 40, items: int = 24, interactions: int = 200):
    """Small random graph: every user has >= 1 training interaction; symmetric content edges;
    a few valid/test pairs that must never enter the graph."""
    rng = np.random.default_rng(seed)
    pairs = {(u, int(rng.integers(items))) for u in range(users)}
    while len(pairs) < interactions:
        pairs.add((int(rng.integers(users)), int(rng.integers(items))))
    pairs = np.array(sorted(pairs), dtype=np.int64)
    split = np.zeros(len(pairs), dtype=np.int8)
    first = np.unique(pairs[:, 0], return_index=True)[1]
    held = rng.choice(np.setdiff1d(np.arange(len(pairs)), first), 20, replace=False)
    split[held[:10]], split[held[10:]] = 1, 2
    s = rng.integers(0, items, 40)
    d = rng.integers(0, items, 40)
    keep = s != d
    und = {(min(a, b), max(a, b)) for a, b in zip(s[keep], d[keep], strict=True)}
    und = np.array(sorted(und), dtype=np.int64)
    w = rng.uniform(0.2, 1.0, len(und)).astype(np.float32)
    return {
        "num_users": users,
        "num_items": items,
        "users": pairs[:, 0],
        "items": pairs[:, 1],
        "split": split,
        "content_src": np.concatenate([und[:, 0], und[:, 1]]),
        "content_dst": np.concatenate([und[:, 1], und[:, 0]]),
        "content_weight": np.concatenate([w, w]),
        "feat_t": rng.standard_normal((items, 6)).astype(np.float32),
        "feat_v": rng.standard_normal((items, 3)).astype(np.float32),
    }


def heterograph(data):
    """The training graph of :func:`make_graph_data` as one local DGL heterograph."""
    from magnet_dist.graph.partition import build_heterograph

    train = data["split"] == 0
    return build_heterograph(
        data["num_users"],
        data["num_items"],
        data["users"][train],
        data["items"][train],
        data["content_src"],
        data["content_dst"],
        data["content_weight"],
        {"t": data["feat_t"], "v": data["feat_v"]},
    )


def make_model(seed: int = 0):
    from magnet_dist.config import Config
    from magnet_dist.model.magnet import MagnetModel

    cfg = Config.model_validate(
        {"model": {"dim": DIM, "layers": LAYERS, "use_moe": False, "fusion_init": 0.3}}
    )
    torch.manual_seed(seed)
    return MagnetModel(cfg, {"t": 6, "v": 3}).eval()


def reference_reps(data, model, user_emb, item_emb, layers: int = LAYERS):
    """MagnetModel.encode on the whole graph (full_graph_hop) for every node."""
    from magnet_dist.model.hops import full_graph_hop

    train = data["split"] == 0
    u, i = int(data["num_users"]), int(data["num_items"])
    hop = full_graph_hop(
        u,
        i,
        torch.from_numpy(data["users"][train]),
        torch.from_numpy(data["items"][train]),
        torch.from_numpy(data["content_src"]),
        torch.from_numpy(data["content_dst"]),
        torch.from_numpy(data["content_weight"]),
    )
    is_item = torch.arange(u + i) >= u
    feats = {
        m: torch.cat([torch.zeros(u, x.shape[1]), torch.from_numpy(x)])
        for m, x in (("t", data["feat_t"]), ("v", data["feat_v"]))
    }
    emb = torch.cat([user_emb, item_emb])
    with torch.no_grad():
        return model.encode([hop] * layers, emb, feats, is_item, is_item)


def sampled_edges(blocks, num_users: int) -> list[list[tuple]]:
    """Each hop's edges as sorted (src, dst, norms) in global node ids (items after users):
    independent of the order in which the partitions' samples were merged."""
    nodes = torch.cat([blocks.input_users, num_users + blocks.input_items])
    hops = []
    for h in blocks.hops:
        dst_nodes = nodes[h.dst_in_src]
        hops.append(
            sorted(
                zip(
                    nodes[h.src].tolist(),
                    dst_nodes[h.dst].tolist(),
                    h.norm_observed.round(decimals=6).tolist(),
                    h.norm_augmented.round(decimals=6).tolist(),
                    strict=True,
                )
            )
        )
        nodes = dst_nodes
    return hops


def compare_update_paths(opt, part: int) -> float:
    """LocalShardAdam's in-place update against DGL's own SparseAdam.update on the same rows
    (this partition's, with duplicates, three steps each from the same start): the largest
    difference in any embedding or Adam-state entry."""
    from dgl.distributed.optim import SparseAdam

    gen = torch.Generator().manual_seed(part)
    finals = []
    for update in (type(opt).update, SparseAdam.update):
        for emb in opt._params:
            policy = emb._tensor.part_policy
            own = torch.nonzero(policy.to_partid(torch.arange(emb.num_embeddings)) == part)[:, 0]
            tensors = (emb._tensor, *opt._state[emb.name])
            start = [t[own].clone() for t in tensors]
            gen.manual_seed(part)
            for _ in range(3):
                idx = own[torch.randint(len(own), (2 * len(own),), generator=gen)]
                grad = torch.randn(len(idx), emb.embedding_dim, generator=gen)
                update(opt, idx, grad, emb)
            finals.append([t[own].clone() for t in tensors])
            for t, rows in zip(tensors, start, strict=True):
                t[own] = rows
    half = len(finals) // 2
    return max(
        (a - b).abs().max().item()
        for fast, dgl in zip(finals[:half], finals[half:], strict=True)
        for a, b in zip(fast, dgl, strict=True)
    )


def main(data_path, part_config, ip_config, part, world, out_path, init_file) -> None:
    from magnet_dist.graph.dist import connect

    data = dict(np.load(data_path))
    part, world = int(part), int(world)
    u, i = int(data["num_users"]), int(data["num_items"])
    torch.distributed.init_process_group(  # DGL's SparseAdam needs a process group
        "gloo", init_method=f"file://{init_file}", rank=part, world_size=world
    )
    client = connect(part_config, ip_config, part, timeout_s=60, shared_graph=True)
    out = {}
    train_u, train_i = client.train_edges()
    out["train_users"], out["train_items"] = train_u.numpy(), train_i.numpy()

    client.init_embeddings(DIM, seed=7)
    user_emb = client.embeddings("user", torch.arange(u))
    item_emb = client.embeddings("item", torch.arange(i))
    model = make_model()
    ref = reference_reps(data, model, user_emb, item_emb)

    # (a) fanout -1 sampled hops == full graph at the seeds (duplicates, both node types)
    seed_users = torch.tensor([3, 0, 3, u - 1, 17])
    seed_items = torch.tensor([5, 5, 0, i - 1])
    blocks = client.sample_blocks(seed_users, seed_items, [-1] * LAYERS)
    with torch.no_grad():
        reps = model.encode(
            blocks.hops,
            client.input_embeddings(blocks),
            blocks.features,
            blocks.is_item_in,
            blocks.is_item_out,
        )
    err = 0.0
    for m, h in reps.items():
        err = max(err, (h[blocks.user_rows] - ref[m][seed_users]).abs().max().item())
        err = max(err, (h[blocks.item_rows] - ref[m][u + seed_items]).abs().max().item())
    out["sampled_max_err"] = np.float64(err)

    # full_representations over this worker's share equals the reference too
    from magnet_dist.graph.dist import shard

    my_users, my_items = shard(u, part, world), shard(i, part, world)
    ru, ri = client.full_representations(model, my_users, my_items, chunk_size=7)
    err = 0.0
    for m in ru:
        err = max(err, (ru[m] - ref[m][my_users]).abs().max().item())
        err = max(err, (ri[m] - ref[m][u + my_items]).abs().max().item())
    out["full_reps_max_err"] = np.float64(err)

    # sampled fanout: at most 2 in-edges per edge type and dst node (ii edges: norm_observed 0)
    small = client.sample_blocks(seed_users, seed_items, [2, 2])
    out["max_in_edges"] = np.int64(
        max(
            int(torch.bincount(h.dst[sel], minlength=h.num_dst).max())
            for h in small.hops
            for sel in (h.norm_observed > 0, h.norm_observed == 0)
        )
    )

    # the seeds of this worker's own partition are sampled in this process, from the graph its
    # server shares in /dev/shm; the sample equals the one the servers give for the same seed
    out["shared_graph"] = np.bool_(client.g.local_partition is not None)
    in_process = sampled_edges(client.sample_blocks(seed_users, seed_items, [2, 2], seed=11), u)
    shared, client.g._g = client.g._g, None  # DGL's switch for the local path
    via_servers = sampled_edges(client.sample_blocks(seed_users, seed_items, [2, 2], seed=11), u)
    client.g._g = shared
    other_seed = sampled_edges(client.sample_blocks(seed_users, seed_items, [2, 2], seed=12), u)
    out["same_sample"] = np.bool_(in_process == via_servers)
    out["seed_changes_sample"] = np.bool_(in_process != other_seed)

    # one SparseAdam step: rows touched by any worker move by ~ -lr, the others stay
    opt = client.sparse_optimizer(lr=0.1)
    step_users = torch.tensor([part, 10 + part])
    step_items = torch.tensor([2 * part + 1])
    step_blocks = client.sample_blocks(step_users, step_items, [])  # no hops: the seeds only
    client.input_embeddings(step_blocks).sum().backward()
    opt.step()
    if world > 1:
        torch.distributed.barrier()
    out["user_delta"] = (client.embeddings("user", torch.arange(u)) - user_emb).numpy()
    out["item_delta"] = (client.embeddings("item", torch.arange(i)) - item_emb).numpy()
    if world > 1:  # the comparison below moves this worker's rows: the other reads them first
        torch.distributed.barrier()

    out["update_max_err"] = np.float64(compare_update_paths(opt.opt, part))
    if world > 1:  # its rows are back only now: the other worker reads them below
        torch.distributed.barrier()

    # checkpoint: each worker writes its own shard; loading doubled shards doubles every row
    prefix = f"{init_file}-emb"
    before = {nt: client.embeddings(nt, torch.arange(n)) for nt, n in (("user", u), ("item", i))}
    shard_file = client.save_embeddings(prefix)
    state = torch.load(shard_file)
    out["shard_users"] = state["user_ids"].numpy()
    torch.save(
        {k: v * 2 if k in ("user", "item") else v for k, v in state.items()},
        str(shard_file).replace("-emb.", "-emb2."),
    )
    torch.distributed.barrier()
    client.load_embeddings(f"{init_file}-emb2")
    torch.distributed.barrier()
    out["reload_err"] = np.float64(
        max(
            (client.embeddings(nt, torch.arange(n)) - 2 * before[nt]).abs().max().item()
            for nt, n in (("user", u), ("item", i))
        )
    )
    np.savez(out_path, **out)
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:8])
