"""Subprocess for test_distributed_parity: one DGL client over a 1-part partition computes the
loss and gradients of one batch with fanout -1; the reference trainer computes the same batch on
the full graph. Prints a JSON of the differences. Arguments after the three paths are config
overrides (e.g. ``model.variant=mf``; ``train.history=true``: one hop + a fresh history table)."""

import json
import sys

import numpy as np
import torch


def main(data_dir: str, part_config: str, ip_config: str, *overrides: str) -> None:
    from magnet_dist.config import load_config
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.graph.content import read_content_edges
    from magnet_dist.graph.dist import connect
    from magnet_dist.model.schedule import ScheduleState
    from magnet_dist.train.batches import NegativeSampler, batch_rng, epoch_batches
    from magnet_dist.train.history import history_for, refresh_from_client
    from magnet_dist.train.reference import FullGraph, build_model, init_id_embeddings, select
    from magnet_dist.train.step import sampled_loss

    cfg = load_config(
        overrides=[f"data.path={data_dir}", "model.dim=16", "train.batch_size=256", *overrides]
    )
    ds = load_dataset(data_dir)
    graph = FullGraph(ds, cfg, read_content_edges(data_dir))
    tu, ti = ds.pairs(0)
    _, idx = next(iter(epoch_batches(len(tu), cfg.train.batch_size, cfg.train.seed, 0)))
    users, pos = tu[idx], ti[idx]
    neg = NegativeSampler(tu, ti, ds.num_items).sample(users, 1, batch_rng(cfg.train.seed, 0, 0))
    state = ScheduleState()

    # reference: full graph, nn.Embedding
    ref_model = build_model(cfg, ds)
    emb = init_id_embeddings(ds.num_users + ds.num_items, cfg.model.dim, cfg.train.seed)
    reps = graph.encode(ref_model, emb.weight)
    u = torch.as_tensor(users)
    p = torch.as_tensor(pos) + ds.num_users
    n = torch.as_tensor(neg).reshape(-1) + ds.num_users
    ref = ref_model.loss(
        select(reps, u), select(reps, p), select(reps, n), emb.weight[torch.cat([u, p, n])], state
    )
    ref.loss.backward()

    # distributed: DGL client, sampled blocks with every neighbour
    client = connect(part_config, ip_config, 0, 1, timeout_s=90)
    try:
        client.init_embeddings(cfg.model.dim)
        table = emb.weight.detach()
        for nt, rows in (("user", table[: ds.num_users]), ("item", table[ds.num_users :])):
            e = client.user_emb if nt == "user" else client.item_emb
            e.weight[client.to_graph_ids(nt, torch.arange(rows.shape[0]))] = rows
        model = build_model(cfg, ds)
        captured = {}
        original = client.input_embeddings

        def capture(blocks, device=None):
            x = original(blocks, device=device)
            x.retain_grad()
            captured["x"], captured["blocks"] = x, blocks
            return x

        client.input_embeddings = capture
        history = None
        if cfg.train.history:  # one hop with every neighbour + a fresh table of the rest
            history, full_graph = history_for(cfg, ds)
            refresh_from_client(history, model, full_graph, client, 0)
        out = sampled_loss(
            model,
            client,
            torch.as_tensor(users),
            torch.as_tensor(pos),
            torch.as_tensor(neg),
            [-1] * (1 if history is not None else cfg.model.layers),
            state,
            history=history,
        )
        out.loss.backward()
        b = captured["blocks"]
        rows = torch.cat(
            [
                client.to_orig_ids("user", b.input_users),
                client.to_orig_ids("item", b.input_items) + ds.num_users,
            ]
        )
        emb_grad_diff = (captured["x"].grad - emb.weight.grad[rows]).abs().max().item()
        outside = torch.ones(table.shape[0], dtype=torch.bool)
        outside[rows] = False
        grad_outside = emb.weight.grad[outside].abs().max().item() if outside.any() else 0.0
        dense = {
            name: (p1.grad - p2.grad).abs().max().item()
            for (name, p1), (_, p2) in zip(
                ref_model.named_parameters(), model.named_parameters(), strict=True
            )
            if p1.grad is not None
        }
        result = {
            "ref_loss": ref.loss.item(),
            "dist_loss": out.loss.item(),
            "ref_bpr": ref.bpr.item(),
            "dist_bpr": out.bpr.item(),
            "emb_grad_max_diff": emb_grad_diff,
            "ref_grad_outside_inputs": grad_outside,
            "dense_grad_max_diff": max(dense.values(), default=0.0),
            "dense_grad_worst": max(dense, key=dense.get, default=None),
            "num_dense_grads": len(dense),
            "ref_grad_scale": max(
                (p.grad.abs().max().item() for p in ref_model.parameters() if p.grad is not None),
                default=0.0,
            ),
            "modalities": list(model.modalities),
            "hops": len(captured["blocks"].hops),
        }
    finally:
        client.close()
    print("PARITY " + json.dumps(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main(*sys.argv[1:])
