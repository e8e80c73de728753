"""Expert-parallel triplet MoE (DeepSpeed MoE, ep_size 2) against the dense single-process head.

Two real gloo processes on 127.0.0.1 run every scenario once (DeepSpeed's comm init costs ~7 s
per process, so the scenarios share one spawn); each test then checks one scenario's result.
Each rank feeds its half of a global batch; the reference is ``TripletMoE`` on the full batch
with the same weights.
"""

from __future__ import annotations

import copy
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

from magnet_dist.errors import ConfigError
from magnet_dist.parallel.groups import valid_ep_sizes, validate_ep_size

WORLD = 2
MODS = ["behaviour", "visual", "text"]
DIM = 8
TOL = 1e-5


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else WORLD


def _cfg(**moe):
    from magnet_dist.config import Config

    cfg = Config()
    cfg.model.dim = DIM
    cfg.train.workers = _world()
    cfg.moe.experts_per_template = moe.pop("experts_per_template", 2)  # E = 18
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def _skew_router(moe, seed: int, scale: float = 3.0) -> None:
    """Sharper routing than the default init, so expert loads differ across ranks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = moe.router.proj.weight
        w.copy_(torch.randn(w.shape, generator=gen) * scale / w.shape[1] ** 0.5)


def _route_loss(stats):
    return 0.3 * stats.l_aux() + 0.7 * (1 - stats.h_use()) + 0.5 * stats.h_conf()


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _dense_grad(grads: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """The dense gradient by name; zeros for an expert that got no token (grad None)."""
    return grads.get(name, torch.zeros_like(like))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# scenarios (run inside each spawned rank; return a dict of numbers the tests assert on)


def _equivalence(rank: int, top_k: int, with_grads: bool, dispatch: str = "index") -> dict:
    import torch.distributed as dist

    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.expert_parallel import copy_from_dense
    from magnet_dist.parallel.reduce import allreduce_gradients, stats_all_reduce

    cfg = _cfg(top_k=top_k, ep_size=1)
    dense = build_moe(cfg, MODS, seed=11)
    _skew_router(dense, seed=5)
    cfg_ep = _cfg(top_k=top_k, ep_size=2)
    ep = build_moe(cfg_ep, MODS, rank=rank, world=_world(), seed=99, dispatch=dispatch)
    copy_from_dense(ep, dense)

    gen = torch.Generator().manual_seed(3)
    n = 48
    x_all = torch.randn(n, len(MODS) * DIM, generator=gen)
    w_all = torch.randn(n, DIM, generator=gen)
    world = _world()
    rows = slice(rank * n // world, (rank + 1) * n // world)

    x_dense = x_all.clone().requires_grad_(True)
    out_dense, stats_dense = dense(x_dense)
    x_ep = x_all[rows].clone().requires_grad_(True)
    out_ep, stats_ep = ep(x_ep)
    reduced = stats_ep.reduce(stats_all_reduce())

    res = {
        "out_diff": _max_diff(out_ep, out_dense[rows]),
        "l_aux": (float(reduced.l_aux()), float(stats_dense.l_aux())),
        "h_use": (float(reduced.h_use()), float(stats_dense.h_use())),
        "h_conf": (float(reduced.h_conf()), float(stats_dense.h_conf())),
        "assigned_diff": _max_diff(reduced.assigned, stats_dense.assigned),
        "prob_sum_diff": _max_diff(reduced.prob_sum, stats_dense.prob_sum),
        "dropped": float(reduced.dropped),
        "local_loads": stats_ep.load.tolist(),
        "capacity": ep.gate.last_capacity,
        "expert_ids": ep.expert_ids,
    }
    if not with_grads:
        return res
    # loss_r = f(local rows) + R(global stats); dense: mean_r f_r + R. After allreduce_gradients
    # (world average) every parameter gradient equals the dense one; token grads are W x dense.
    parts = [slice(r * n // world, (r + 1) * n // world) for r in range(world)]
    f_dense = [(out_dense[part] * w_all[part]).sum() for part in parts]
    (sum(f_dense) / world + _route_loss(stats_dense)).backward()
    ((out_ep * w_all[rows]).sum() + _route_loss(reduced)).backward()
    allreduce_gradients(ep)
    dense_grads = _grads(dense)
    ep_grads = _grads(ep)
    res["router_grad_diff"] = _max_diff(
        ep_grads["router.proj.weight"], dense_grads["router.proj.weight"]
    )
    expert_diffs = []
    for gid, expert in ep.local_experts():
        for name, p in expert.named_parameters():
            expert_diffs.append(
                _max_diff(p.grad, _dense_grad(dense_grads, f"experts.{gid}.{name}", p))
            )
    res["expert_grad_diff"] = max(expert_diffs)
    res["expert_grad_count"] = len(expert_diffs)
    res["token_grad_diff"] = _max_diff(x_ep.grad, world * x_dense.grad[rows])
    res["expert_params_marked"] = all(
        getattr(p, "allreduce", True) is False and p.group_name == "ep_size_2"
        for _, e in ep.local_experts()
        for p in e.parameters()
    )
    res["router_not_marked"] = getattr(ep.router.proj.weight, "allreduce", True) is True
    dist.barrier()
    return res


def _magnet_model_loss(rank: int) -> dict:
    """MagnetModel.loss with the expert-parallel head, all-reduced stats and gradients."""
    from magnet_dist.model.magnet import MagnetModel
    from magnet_dist.model.schedule import ScheduleState
    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.expert_parallel import copy_from_dense
    from magnet_dist.parallel.reduce import allreduce_gradients, stats_all_reduce

    dims = {"visual": 5, "text": 7}
    dense_moe = build_moe(_cfg(ep_size=1), MODS, seed=1)
    _skew_router(dense_moe, seed=2)
    ep_moe = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=1)
    copy_from_dense(ep_moe, dense_moe)
    torch.manual_seed(0)
    dense_model = MagnetModel(_cfg(ep_size=1), dims, moe=dense_moe)
    ep_model = MagnetModel(_cfg(ep_size=2), dims, moe=ep_moe)
    with torch.no_grad():
        dense_model.readout.weight.normal_()
        ep_model.readout.weight.copy_(dense_model.readout.weight)
        ep_model.encoder.load_state_dict(dense_model.encoder.state_dict())
    gen = torch.Generator().manual_seed(4)
    n = 32
    h = {k: {m: torch.randn(n, DIM, generator=gen) for m in MODS} for k in ("u", "pos", "neg")}
    ego = torch.randn(n, DIM, generator=gen)
    world = _world()
    rows = slice(rank * n // world, (rank + 1) * n // world)
    state = ScheduleState()
    out_dense = dense_model.loss(h["u"], h["pos"], h["neg"], ego, state)
    local = {k: {m: v[rows] for m, v in d.items()} for k, d in h.items()}
    out_ep = ep_model.loss(
        local["u"], local["pos"], local["neg"], ego[rows], state, reduce_stats=stats_all_reduce()
    )
    out_dense.loss.backward()
    (out_ep.bpr + out_ep.route).backward()  # the reg term is per-rank: compare the rest
    allreduce_gradients(ep_model)
    dense_grads = _grads(dense_model)
    diffs = {}
    for name, p in ep_model.named_parameters():
        if getattr(p, "allreduce", True) is False:
            continue
        diffs[name] = _max_diff(p.grad, _dense_grad(dense_grads, name, p))
    for gid, expert in ep_moe.local_experts():
        for name, p in expert.named_parameters():
            want = _dense_grad(dense_grads, f"moe.experts.{gid}.{name}", p)
            diffs[f"experts.{gid}.{name}"] = _max_diff(p.grad, want)
    import torch.distributed as dist

    bpr = out_ep.bpr.detach().clone()
    dist.all_reduce(bpr)
    return {
        "route": (float(out_ep.route), float(out_dense.route)),
        "bpr": (float(bpr) / world, float(out_dense.bpr)),
        "max_grad_diff": max(diffs.values()),
        "grad_count": len(diffs),
    }


def _drops(rank: int) -> dict:
    """Small capacity factor, uneven local batches (40 / 24 tokens)."""
    from magnet_dist.model.router import capacity_for, routing_stats, top_k_route
    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.expert_parallel import copy_from_dense

    factor, top_k = 0.5, 2
    dense = build_moe(_cfg(top_k=top_k, ep_size=1, capacity_factor=factor), MODS, seed=21)
    _skew_router(dense, seed=8, scale=4.0)
    ep = build_moe(
        _cfg(top_k=top_k, ep_size=2, capacity_factor=factor), MODS, rank=rank, world=_world()
    )
    copy_from_dense(ep, dense)
    gen = torch.Generator().manual_seed(6)
    x_all = torch.randn(64, len(MODS) * DIM, generator=gen)
    x = x_all[:40] if rank == 0 else x_all[40:]
    with torch.no_grad():
        out, stats = ep(x)
        cap = capacity_for(x.shape[0], dense.num_experts, top_k, factor)
        ref = routing_stats(top_k_route(dense.router.proj(x), top_k, cap))
        ref_out, _ = dense(x)  # the dense head with the same capacity on the local tokens
        routing = ep.gate.last_routing
        all_dropped = ~routing.kept.any(dim=1)
        # by hand: sum over kept assignments only
        by_hand = torch.zeros_like(out)
        for t in range(x.shape[0]):
            for j in range(top_k):
                if routing.kept[t, j]:
                    e = int(routing.experts[t, j])
                    by_hand[t] += routing.combine[t, j] * dense.experts[e](x[t : t + 1])[0]
    return {
        "dropped": float(stats.dropped),
        "ref_dropped": float(ref.dropped),
        "load_diff": _max_diff(stats.load, ref.load),
        "assigned_diff": _max_diff(stats.assigned, ref.assigned),
        "out_vs_dense_local": _max_diff(out, ref_out),
        "out_vs_by_hand": _max_diff(out, by_hand),
        "all_dropped_rows": int(all_dropped.sum()),
        "all_dropped_max_abs": float(out[all_dropped].abs().max()) if all_dropped.any() else 0.0,
        "local_capacity": cap,
        "buffer_capacity": ep.gate.last_capacity,
    }


def _train_step(moe, optimizers, x) -> None:
    from magnet_dist.parallel.reduce import allreduce_gradients

    for opt in optimizers:
        opt.zero_grad()
    out, _ = moe(x)
    out.pow(2).sum().backward()
    allreduce_gradients(moe)
    for opt in optimizers:
        opt.step()


def _checkpoint(rank: int, tmp: Path) -> dict:
    import torch.distributed as dist

    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.checkpoint import (
        CheckpointError,
        dense_state_dict,
        load_dense_state_dict,
        load_expert_shard,
        save_expert_shard,
    )
    from magnet_dist.parallel.expert_parallel import copy_from_dense
    from magnet_dist.parallel.reduce import split_parameters

    def adam(params):
        return torch.optim.Adam(params, lr=1e-2)

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(24, len(MODS) * DIM, generator=gen)
    ep = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=31)
    dense_params, expert_params = split_parameters(ep)
    opts = [adam(dense_params), adam(expert_params)]
    _train_step(ep, opts, x)
    with torch.no_grad():
        want, _ = ep(x)
    written = save_expert_shard(ep, tmp / "ep2", optimizer=opts[1])
    # as if written to disk: no tensor shared with the live model / optimizer
    dense_state = copy.deepcopy(dense_state_dict(ep))
    dense_opt_state = copy.deepcopy(opts[0].state_dict())
    dist.barrier()

    fresh = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=32)
    fresh_dense, fresh_experts = split_parameters(fresh)
    fresh_opts = [adam(fresh_dense), adam(fresh_experts)]
    load_dense_state_dict(fresh, dense_state)
    fresh_opts[0].load_state_dict(dense_opt_state)
    with torch.no_grad():
        before, _ = fresh(x)
    load_expert_shard(fresh, tmp / "ep2", optimizer=fresh_opts[1])
    with torch.no_grad():
        after, _ = fresh(x)
    # one more step on both: identical if the optimizer state was restored too
    _train_step(ep, opts, x)
    _train_step(fresh, fresh_opts, x)
    with torch.no_grad():
        next_want, _ = ep(x)
        next_got, _ = fresh(x)

    # re-shard: ep_size 2 shards -> dense (ep_size 1) head, and a dense shard -> ep_size 2
    dense = build_moe(_cfg(ep_size=1), MODS, seed=33)
    load_dense_state_dict(dense, dense_state)
    load_expert_shard(dense, tmp / "ep2")
    with torch.no_grad():
        dense_out, _ = dense(x)
    if rank == 0:
        save_expert_shard(dense, tmp / "ep1")
    dist.barrier()
    back = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=34)
    copy_from_dense(back, build_moe(_cfg(ep_size=1), MODS, seed=35))  # scramble
    load_dense_state_dict(back, dense_state)
    load_expert_shard(back, tmp / "ep1")
    with torch.no_grad():
        back_out, _ = back(x)
    try:
        load_expert_shard(back, tmp / "empty")
        missing_error = ""
    except CheckpointError as err:
        missing_error = str(err)
    return {
        "written": written.name if written else None,
        "restored_diff": _max_diff(after, want),
        "fresh_differs": _max_diff(before, want),
        "resumed_step_diff": _max_diff(next_got, next_want),
        "dense_reshard_diff": _max_diff(dense_out, want),
        "ep1_to_ep2_diff": _max_diff(back_out, want),
        "missing_error": missing_error,
        "dense_keys": sorted(dense_state_dict(ep)),
        "dense_keys_ref": sorted(dense_state_dict(dense)),
    }


def _invalid_ep_size(rank: int) -> dict:
    from magnet_dist.parallel.groups import setup_expert_parallel

    messages = {}
    for ep_size, num_experts in ((3, 18), (2, 9), (4, 36)):
        try:
            setup_expert_parallel(ep_size, num_experts)
            messages[f"{ep_size}/{num_experts}"] = ""
        except ConfigError as err:
            messages[f"{ep_size}/{num_experts}"] = str(err)
    return messages


def _empty_batch(rank: int) -> dict:
    """A rank with no tokens still joins the all-to-alls (every rank must call the head)."""
    from magnet_dist.parallel.build import build_moe

    for factor in (None, 0.5):
        ep = build_moe(
            _cfg(ep_size=2, capacity_factor=factor), MODS, rank=rank, world=_world(), seed=5
        )
        x = torch.randn(0 if rank == 1 else 20, len(MODS) * DIM, requires_grad=True)
        out, stats = ep(x)
        out.sum().backward()
    return {"shape": list(out.shape), "tokens": float(stats.tokens)}


def _deepspeed_engine(rank: int) -> dict:
    """deepspeed.initialize recognises the head as an MoE layer and reduces its gradients the
    same way as allreduce_gradients (expert params over their replicas only)."""
    import deepspeed

    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.reduce import allreduce_gradients

    ours = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=3)
    theirs = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=3)
    x = torch.randn(16, len(MODS) * DIM, generator=torch.Generator().manual_seed(rank))
    out, stats = ours(x)
    (out.pow(2).sum() + stats.l_aux()).backward()
    allreduce_gradients(ours)
    config = {
        "train_batch_size": _world(),
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 0},
    }
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=theirs, optimizer=optimizer, config=config)
    out, stats = engine(x)
    engine.backward(out.pow(2).sum() + stats.l_aux())
    want = dict(ours.named_parameters())
    return {
        "has_moe_layers": engine.has_moe_layers,
        "grad_diff": max(_max_diff(p.grad, want[n].grad) for n, p in theirs.named_parameters()),
    }


def _broadcast(rank: int) -> dict:
    """Replicas drawn from different seeds agree after broadcast_parameters."""
    import torch.distributed as dist

    from magnet_dist.parallel.build import build_moe
    from magnet_dist.parallel.reduce import broadcast_parameters

    ep = build_moe(_cfg(ep_size=2), MODS, rank=rank, world=_world(), seed=100 + rank)
    broadcast_parameters(ep)
    router = ep.router.proj.weight.detach().clone()
    gathered = [torch.empty_like(router) for _ in range(_world())]
    dist.all_gather(gathered, router)
    flat = torch.cat(
        [p.detach().reshape(-1) for _, e in ep.local_experts() for p in e.parameters()]
    )
    group = ep.groups.edp_group
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(replicas, flat, group=group)
    return {
        "router_spread": max(_max_diff(g, router) for g in gathered),
        "replica_spread": max(_max_diff(r, flat) for r in replicas),
        "replicas": len(replicas),
    }


SCENARIOS = {
    "equivalence_k2": lambda rank, tmp: _equivalence(rank, 2, True),
    "equivalence_k1": lambda rank, tmp: _equivalence(rank, 1, True),
    "equivalence_k3": lambda rank, tmp: _equivalence(rank, 3, False),
    "equivalence_dense_dispatch": lambda rank, tmp: _equivalence(rank, 2, True, "dense"),
    "magnet_model": lambda rank, tmp: _magnet_model_loss(rank),
    "drops": lambda rank, tmp: _drops(rank),
    "checkpoint": _checkpoint,
    "empty_batch": lambda rank, tmp: _empty_batch(rank),
    "deepspeed_engine": lambda rank, tmp: _deepspeed_engine(rank),
    "invalid_ep_size": lambda rank, tmp: _invalid_ep_size(rank),
}
# world 4 = two expert-parallel groups {0,1}, {2,3}; replicas {0,2}, {1,3}
SCENARIOS_WORLD4 = {
    "equivalence_k2": SCENARIOS["equivalence_k2"],
    "checkpoint": _checkpoint,
    "broadcast": lambda rank, tmp: _broadcast(rank),
}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    results = {}
    for name, scenario in (SCENARIOS if world == 2 else SCENARIOS_WORLD4).items():
        try:
            results[name] = {"ok": True, **scenario(rank, Path(tmp))}
        except Exception:  # reported by the test that reads this scenario
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, Path(tmp) / f"rank{rank}.pt")
    # not destroy_process_group: torch 2.2's gloo can hang there (tests/test_step_clock.py did in
    # CI), and mp.spawn joins without a timeout, so a hang here would stall the whole run
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp: Path, world: int) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ep2"), WORLD)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ep4"), 4)


def _result(ranks, name):
    for r, res in enumerate(ranks):
        assert res[name]["ok"], f"rank {r}, scenario {name}:\n{res[name]['error']}"
    return [res[name] for res in ranks]


# ---------------------------------------------------------------------------------------------


def test_importing_deepspeed_forks_no_compile_workers():
    """``import deepspeed`` imports torch's inductor, which forks one compile worker per core at
    import unless TORCHINDUCTOR_COMPILE_THREADS says otherwise (2 forks here before the fix):
    copies of every Ray worker that also abort noisily when Ray ends the worker."""
    import subprocess
    import sys

    code = (
        "import psutil, magnet_dist.parallel.expert_parallel, deepspeed; "
        "print(len(psutil.Process().children(recursive=True)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0", out.stdout


def test_ep_size_must_divide_experts_and_world():
    with pytest.raises(
        ConfigError, match=r"moe.ep_size=4 .* E=18 .* W=2; values that work: \[1, 2\]"
    ):
        validate_ep_size(4, 18, 2)
    with pytest.raises(ConfigError, match=r"values that work: \[1\]"):
        validate_ep_size(2, 9, 2)
    validate_ep_size(2, 18, 4)
    assert valid_ep_sizes(36, 8) == [1, 2, 4]


@pytest.mark.integration
@pytest.mark.parametrize(
    "scenario", ["equivalence_k1", "equivalence_k2", "equivalence_dense_dispatch"]
)
def test_ep2_matches_dense_outputs_gradients_and_entropies(ranks, scenario):
    results = _result(ranks, scenario)
    assert [r["expert_ids"] for r in results] == [list(range(9)), list(range(9, 18))]
    for res in results:
        assert res["out_diff"] < TOL
        for key in ("l_aux", "h_use", "h_conf"):
            got, want = res[key]
            assert got == pytest.approx(want, abs=TOL), key
        assert res["assigned_diff"] == 0 and res["prob_sum_diff"] < TOL
        assert res["dropped"] == 0
        assert res["router_grad_diff"] < TOL
        assert res["expert_grad_diff"] < TOL and res["expert_grad_count"] > 0
        assert res["token_grad_diff"] < TOL
        assert res["expert_params_marked"] and res["router_not_marked"]
    # no-drop capacity is the max load over both ranks: one all-to-all shape
    caps = {res["capacity"] for res in results}
    assert caps == {max(max(res["local_loads"]) for res in results)}


@pytest.mark.integration
def test_ep2_matches_dense_with_top3(ranks):
    for res in _result(ranks, "equivalence_k3"):
        assert res["out_diff"] < TOL
        assert res["l_aux"][0] == pytest.approx(res["l_aux"][1], abs=TOL)


@pytest.mark.integration
def test_magnet_model_loss_and_gradients_match_dense(ranks):
    for res in _result(ranks, "magnet_model"):
        assert res["route"][0] == pytest.approx(res["route"][1], abs=TOL)
        assert res["bpr"][0] == pytest.approx(res["bpr"][1], abs=TOL)
        assert res["max_grad_diff"] < TOL and res["grad_count"] > 10


@pytest.mark.integration
def test_dropped_tokens_counted_and_fall_back_to_residual(ranks):
    results = _result(ranks, "drops")
    assert sum(res["dropped"] for res in results) > 0
    for res in results:
        assert res["dropped"] == res["ref_dropped"]
        assert res["load_diff"] == 0 and res["assigned_diff"] == 0
        assert res["out_vs_dense_local"] < TOL
        assert res["out_vs_by_hand"] < TOL
        assert res["all_dropped_max_abs"] == 0.0
    assert [r["local_capacity"] for r in results] == [3, 2]  # ceil(0.5 * N * 2 / 18)
    assert len({r["buffer_capacity"] for r in results}) == 1


@pytest.mark.integration
def test_deepspeed_engine_reduces_gradients_like_allreduce_gradients(ranks):
    for res in _result(ranks, "deepspeed_engine"):
        assert res["has_moe_layers"]
        assert res["grad_diff"] < TOL


@pytest.mark.integration
def test_rank_without_tokens_still_takes_part(ranks):
    results = _result(ranks, "empty_batch")
    assert [r["shape"] for r in results] == [[20, DIM], [0, DIM]]
    assert [r["tokens"] for r in results] == [20.0, 0.0]


@pytest.mark.integration
def test_expert_checkpoint_round_trip_and_reshard(ranks):
    results = _result(ranks, "checkpoint")
    assert [r["written"] for r in results] == ["experts-ep000-of-002.pt", "experts-ep001-of-002.pt"]
    for res in results:
        assert res["fresh_differs"] > 1e-3
        assert res["restored_diff"] == 0.0
        assert res["resumed_step_diff"] == 0.0
        assert res["dense_reshard_diff"] < TOL
        assert res["ep1_to_ep2_diff"] < TOL
        assert "no complete set of expert shards" in res["missing_error"]
        assert res["dense_keys"] == res["dense_keys_ref"] == ["router.proj.weight"]


@pytest.mark.integration
def test_invalid_ep_size_in_a_running_world_names_values_that_work(ranks):
    for res in _result(ranks, "invalid_ep_size"):
        assert "values that work: [1, 2]" in res["3/18"]
        assert "E=9" in res["2/9"] and "values that work: [1]" in res["2/9"]
        assert "W=2" in res["4/36"] and "values that work: [1, 2]" in res["4/36"]


@pytest.mark.integration
def test_world4_expert_grads_reduced_over_replicas_only(ranks4):
    """ep_size 2 in a world of 4: experts split over {0,1} and {2,3}, replicated over {0,2}
    and {1,3}; gradients still equal the dense single-process ones."""
    results = _result(ranks4, "equivalence_k2")
    assert [r["expert_ids"] for r in results] == [list(range(9)), list(range(9, 18))] * 2
    for res in results:
        assert res["out_diff"] < TOL
        assert res["router_grad_diff"] < TOL and res["expert_grad_diff"] < TOL
        assert res["token_grad_diff"] < TOL


@pytest.mark.integration
def test_world4_one_shard_writer_per_replica_group_and_broadcast(ranks4):
    results = _result(ranks4, "checkpoint")
    assert [r["written"] for r in results] == [
        "experts-ep000-of-002.pt",
        "experts-ep001-of-002.pt",
        None,
        None,
    ]
    for res in results:
        assert res["restored_diff"] == 0.0 and res["ep1_to_ep2_diff"] < TOL
    for res in _result(ranks4, "broadcast"):
        assert res["replicas"] == 2
        assert res["router_spread"] == 0.0 and res["replica_spread"] == 0.0
