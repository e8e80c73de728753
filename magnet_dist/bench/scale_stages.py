"""The stages of the scaling benchmark, each run in its own child process by
:func:`magnet_dist.bench.procmon.run_in_child`: a function of the stage's JSON parameters that
returns its JSON result (always with a ``throughput`` dict)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def stage_prepare(p: dict[str, Any]) -> dict[str, Any]:
    from magnet_dist.data.dataset import load_manifest
    from magnet_dist.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    path = prepare_dataset(
        "synthetic",
        p["data"],
        users=p["users"],
        items=p["items"],
        interactions=p["interactions"],
        seed=p["seed"],
        quiet=True,
        force=True,
    )
    wall = time.perf_counter() - t0
    m = load_manifest(path)
    return {
        "throughput": {"interactions_per_s": round(m["num_interactions"] / wall, 1)},
        "num_users": m["num_users"],
        "num_items": m["num_items"],
        "num_interactions": m["num_interactions"],
        "splits": m["splits"],
        "modalities": m["modalities"],
    }


def stage_content(p: dict[str, Any]) -> dict[str, Any]:
    from magnet_dist.config import load_config
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.graph.content import build_content_edges, write_content_edges

    cfg = load_config(p["config"], p["overrides"])
    ds = load_dataset(p["data"])
    features = {name: ds.features(name) for name in ds.modalities}
    t0 = time.perf_counter()
    src, dst, weight, report = build_content_edges(features, cfg.graph, seed=0, progress=False)
    build = time.perf_counter() - t0
    write_content_edges(p["data"], src, dst, weight, report)
    mods = report.get("modalities", {})
    recall = {m: r.get("recall_at_k") for m, r in mods.items() if "recall_at_k" in r}
    return {
        # items indexed and queried per second, all modalities (HNSW build + query + fusion)
        "throughput": {"items_per_s": round(ds.num_items * len(features) / build, 1)},
        "hnsw_per_modality": {
            m: {
                k: r.get(k)
                for k in ("build_s", "query_s", "build_items_per_s", "query_items_per_s")
            }
            for m, r in mods.items()
        },
        "build_s": round(build, 2),
        "num_edges": int(len(src)),
        "recall": recall,
        "report": report,
    }


def stage_partition(p: dict[str, Any]) -> dict[str, Any]:
    from magnet_dist.graph.partition import partition_dataset, read_meta

    t0 = time.perf_counter()
    cfg_path = partition_dataset(
        p["data"], p["parts"], method=p["method"], out_dir=p["out_dir"], verbose=False
    )
    wall = time.perf_counter() - t0
    meta = read_meta(Path(cfg_path).parent)
    return {
        "throughput": {"edges_per_s": round(meta["num_train_edges"] / wall, 1)},
        "parts": p["parts"],
        "method": p["method"],
        "timings": meta.get("timings", {}),
        "load_s": meta.get("load_s"),
        "balance": meta.get("balance"),
        "part_config": str(cfg_path),
    }


def stage_train(p: dict[str, Any]) -> dict[str, Any]:
    from magnet_dist.config import load_config
    from magnet_dist.train.distributed import train_distributed

    # Ray starts workers at nice 15 by default: on a shared machine they would lose the CPU to
    # any other job, which is not what a throughput benchmark should measure
    os.environ.setdefault("RAY_worker_niceness", "0")
    cfg = load_config(p["config"], p["overrides"])
    metrics = train_distributed(cfg, progress=False)
    pps = float(metrics["pairs_per_second"])
    return {
        "throughput": {
            "pairs_per_s": round(pps, 1),
            "pairs_per_s_per_worker": round(pps / cfg.train.workers, 1),
        },
        "workers": cfg.train.workers,
        "steps": metrics.get("steps"),
        "batch_size": cfg.train.batch_size,
        "train_seconds": metrics.get("train_seconds"),
        "step_parts": metrics.get("step_parts"),  # per rank: mean seconds per step of each part
        "run_dir": str(cfg.run_dir.resolve()),
    }


def stage_profile(p: dict[str, Any]) -> dict[str, Any]:
    """One client of a 1-part graph, world size 1, no Ray: time each part of a training step."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from magnet_dist.config import load_config
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.graph.dist import connect
    from magnet_dist.graph.servers import free_base_port, start_servers
    from magnet_dist.model.magnet import MagnetModel
    from magnet_dist.model.schedule import ScheduleState
    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.reduce import allreduce_gradients, split_parameters
    from magnet_dist.train.batches import NegativeSampler, batch_rng
    from magnet_dist.train.history import history_for, refresh_from_client
    from magnet_dist.train.step import sampled_loss

    cfg = load_config(p["config"], p["overrides"])
    torch.set_num_threads(1)
    port = free_base_port("127.0.0.1", count=2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + 1}", world_size=1, rank=0)
    t0 = time.perf_counter()
    shares_graph = cfg.train.shares_graph
    servers = start_servers(
        p["part_config"], base_port=port, num_clients=1, timeout_s=300, share_graph=shares_graph
    )
    client = connect(
        p["part_config"], servers.ip_config, 0, 1, timeout_s=300, shared_graph=shares_graph
    )
    setup = {"servers_and_connect_s": round(time.perf_counter() - t0, 2)}
    timers: dict[str, float] = {}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - t

        return wrapper

    acc = client._access
    acc.sample_frontier = timed("sampling", acc.sample_frontier)
    acc.node_data = timed("feature_fetch", acc.node_data)
    acc.edge_data = timed("feature_fetch", acc.edge_data)
    client.input_embeddings = timed("embedding_fetch", client.input_embeddings)
    sizes: dict[str, int] = {}
    sample_blocks = client.sample_blocks

    def counted(*a, **k):
        blocks = sample_blocks(*a, **k)
        sizes["input_nodes"] = blocks.num_input
        sizes["edges"] = sum(int(h.src.numel()) for h in blocks.hops)
        return blocks

    client.sample_blocks = counted
    try:
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data.path)
        moe = (
            build_moe(cfg, ["behaviour", *ds.modalities], 0, 1, seed=0)
            if cfg.model.use_moe
            else None
        )
        model = MagnetModel(cfg, dict(ds.modalities), moe=moe)
        client.init_embeddings(cfg.model.dim, init="xavier", seed=0)
        emb_opt = client.sparse_optimizer(cfg.train.lr, update=cfg.train.sparse_update)
        dense, expert = split_parameters(model)
        opts = [torch.optim.Adam(dense, lr=cfg.train.lr)]
        if expert:
            opts.append(torch.optim.Adam(expert, lr=cfg.train.lr))
        tu, ti = ds.pairs(0)
        sampler = NegativeSampler(tu, ti, ds.num_items)
        users_local, items_local = client.train_edges(0)
        history, full_graph = history_for(cfg, ds)
        setup["model_and_data_s"] = round(time.perf_counter() - t0, 2)
        if history is not None:
            t0 = time.perf_counter()
            refresh_from_client(history, model, full_graph, client, 0)
            setup["history_refresh_s"] = round(time.perf_counter() - t0, 2)
        order = np.random.default_rng(0).permutation(len(users_local))
        bs = cfg.train.batch_size
        state = ScheduleState()
        rows = []
        for step in range(p["warmup"] + p["steps"]):
            timers.clear()
            t_step = time.perf_counter()
            idx = order[step * bs : (step + 1) * bs]
            u, pos = users_local[idx], items_local[idx]
            t = time.perf_counter()
            neg = sampler.sample(u.numpy(), cfg.train.n_neg, batch_rng(0, 0, step))
            t_neg = time.perf_counter() - t
            for o in opts:
                o.zero_grad(set_to_none=True)
            t = time.perf_counter()
            out = sampled_loss(
                model,
                client,
                u,
                pos,
                torch.from_numpy(neg),
                cfg.train.fanouts,
                state,
                None,
                history=history,
            )
            t_fwd = time.perf_counter() - t
            t = time.perf_counter()
            out.loss.backward()
            for o in opts:
                o.step()
            t_bwd = time.perf_counter() - t
            t = time.perf_counter()
            allreduce_gradients(model)
            emb_opt.step()
            t_comm = time.perf_counter() - t
            total = time.perf_counter() - t_step
            fetch = timers.get("feature_fetch", 0.0) + timers.get("embedding_fetch", 0.0)
            rows.append(
                {
                    **sizes,
                    "total": total,
                    "negative_sampling": t_neg,
                    "sampling": timers.get("sampling", 0.0),
                    "feature_fetch": timers.get("feature_fetch", 0.0),
                    "embedding_fetch": timers.get("embedding_fetch", 0.0),
                    # forward minus sampling and fetches, plus backward and the dense optimiser
                    "compute": t_fwd - timers.get("sampling", 0.0) - fetch + t_bwd,
                    # sparse embedding gradients pushed to the KV store + dense all-reduce
                    "communication": t_comm,
                }
            )
        measured = rows[p["warmup"] :]
        split = {k: round(float(np.mean([r[k] for r in measured])), 4) for k in measured[0]}
        sampled = {k: int(split.pop(k)) for k in ("input_nodes", "edges")}
        del client.input_embeddings, client.sample_blocks
    finally:
        client.close()
        servers.wait(60)
        servers.stop()
        dist.destroy_process_group()
    step_s = split["total"]
    return {
        "throughput": {"pairs_per_s": round(bs / step_s, 1)},
        "batch_size": bs,
        "fanouts": list(cfg.train.fanouts),
        "levers": p.get("levers", []),  # the sweep entry's own overrides
        "sampled_per_step": sampled,  # input nodes and sampled edges (all hops), mean
        "steps_measured": p["steps"],
        "warmup_steps": p["warmup"],
        "step_split_s": split,
        "step_split_share": {k: round(v / step_s, 3) for k, v in split.items() if k != "total"},
        "setup": setup,
    }


def two_stage(loaded, ev, users, n: int, timings: dict[str, float]):
    """Two-stage ranking of ``users``: retrieval of ``n`` candidates by dot score, MoE re-rank.
    Returns the ranking sums, the candidates, the pair scorer and the retrieval vectors (the
    evaluate stage reuses them); ``timings`` gets retrieve_s and rerank_s."""
    from magnet_dist.eval.model_io import candidate_score_fn, retrieve_for
    from magnet_dist.eval.ranking import rank_candidates

    cfg = loaded.cfg
    vecs = loaded.retrieval_vectors()
    t = time.perf_counter()
    cand = retrieve_for(loaded, users, n, ev.train_mask, False, *vecs)
    timings["retrieve_s"] = time.perf_counter() - t
    pair_fn = candidate_score_fn(loaded.model, loaded.user_reps, loaded.item_reps)
    t = time.perf_counter()
    sums = rank_candidates(
        pair_fn,
        users,
        cand,
        ev.ground_truth,
        ev.train_mask,
        cfg.eval.ks,
        cfg.eval.user_chunk,
        False,
    )
    timings["rerank_s"] = time.perf_counter() - t
    return sums, cand, pair_fn, vecs


def stage_evaluate(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from magnet_dist.eval.model_io import load_run
    from magnet_dist.eval.ranking import rank_candidates, retrieval_recall
    from magnet_dist.eval.run import sample_users
    from magnet_dist.eval.scoring import SplitEvaluator, ranking_score_fn

    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_run(p["run_dir"], quiet=True)
    timings["load_and_encode_s"] = time.perf_counter() - t
    cfg, ds = loaded.cfg, loaded.dataset
    t = time.perf_counter()
    ev = SplitEvaluator(ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk)
    timings["ground_truth_s"] = time.perf_counter() - t
    users = sample_users(ev.users, p["two_stage_users"], p["seed"])
    exact_users = sample_users(users, p["exact_users"], p["seed"] + 1)
    n = min(p["candidates"], ds.num_items)
    two, cand, pair_fn, (user_vecs, item_vecs) = two_stage(loaded, ev, users, n, timings)
    rows = np.searchsorted(users, exact_users)
    two_sub = rank_candidates(
        pair_fn,
        exact_users,
        cand[rows],
        ev.ground_truth,
        ev.train_mask,
        cfg.eval.ks,
        cfg.eval.user_chunk,
        False,
    )
    t = time.perf_counter()
    rr = retrieval_recall(
        user_vecs[users],
        item_vecs,
        n,
        rows,
        users=users,
        exclude=ev.train_mask,
        candidates=cand,
        item_chunk=cfg.eval.item_chunk,
    )
    timings["retrieval_recall_s"] = time.perf_counter() - t
    t = time.perf_counter()
    exact = ev.sums(ranking_score_fn(loaded.model, loaded.user_reps, loaded.item_reps), exact_users)
    timings["exact_s"] = time.perf_counter() - t
    metrics = {
        **two.metrics("test.two_stage"),
        **two_sub.metrics("test.two_stage_sample"),
        **exact.metrics("test.exact_sample"),
        f"retrieval_recall@{n}": rr,
    }
    return {
        "throughput": {
            "two_stage_users_per_s": round(
                len(users) / (timings["retrieve_s"] + timings["rerank_s"]), 1
            ),
            "exact_users_per_s": round(len(exact_users) / timings["exact_s"], 2),
        },
        "candidates": n,
        "two_stage_users": int(len(users)),
        "exact_users": int(len(exact_users)),
        "metrics": {k: round(float(v), 5) for k, v in metrics.items()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def stage_snapshot_eval(p: dict[str, Any]) -> dict[str, Any]:
    """One exported model (``checkpoint`` of ``run_dir``) on the validation split: two-stage
    ranking (retrieval by dot score, MoE re-rank) of ``users`` sampled validation users."""
    from magnet_dist.eval.model_io import load_run
    from magnet_dist.eval.run import sample_users
    from magnet_dist.eval.scoring import SplitEvaluator

    t = time.perf_counter()
    loaded = load_run(p["run_dir"], quiet=True, checkpoint=p["checkpoint"])
    cfg, ds = loaded.cfg, loaded.dataset
    ev = SplitEvaluator(ds, 1, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk)
    users = sample_users(ev.users, p["users"], p["seed"])
    n = min(p["candidates"], ds.num_items)
    sums = two_stage(loaded, ev, users, n, {})[0]
    wall = time.perf_counter() - t
    return {
        "throughput": {"users_per_s": round(len(users) / wall, 1)},
        "users": int(len(users)),
        "candidates": n,
        "metrics": {
            k: round(float(v), 5) for k, v in sums.metrics("valid.two_stage_sample").items()
        },
    }


STAGE_FUNCS = {
    "prepare": stage_prepare,
    "content": stage_content,
    "partition": stage_partition,
    "train": stage_train,
    "profile": stage_profile,
    "evaluate": stage_evaluate,
    "snapshot_eval": stage_snapshot_eval,
}
