"""Benchmark of the triplet MoE head: forward + backward tokens/s, dense vs expert parallel.

CPU (default): ``--world`` gloo processes on 127.0.0.1, each feeding ``--tokens`` tokens per
step. Rows: ``dense`` = TripletMoE replicated on every rank (ep_size 1, the reference loop over
experts), ``ds-ep1`` = ExpertParallelMoE with ep_size 1 (DeepSpeed's layer, all experts local:
the dispatch overhead alone), ``ds-ep2`` = ExpertParallelMoE with ep_size 2 (experts split,
tokens exchanged by all-to-all; E = 9 is skipped: ep_size must divide E). Tokens/s counts the
global batch (world x tokens) over the slowest rank's step time (median over steps). The
all-to-all share is the time in the dispatch and combine all-to-alls (forward and backward,
timed separately) over the step time, averaged over ranks.

CUDA (``--device cuda``): one process, NCCL world of 1, ep_size 1 (dense and ds-ep1), a few
minutes at most:

    python launch/bench_moe.py --out runs/bench_moe_cpu.json
    python launch/bench_moe.py --quick
    python launch/bench_moe.py --device cuda --tokens 4096,32768 --out runs/bench_moe_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

MODS = ["behaviour", "visual", "text"]
A2A_KEYS = ("a2a_dispatch_fwd", "a2a_dispatch_bwd", "a2a_combine_fwd", "a2a_combine_bwd")


def _config(p: int, k: int, ep_size: int, dim: int, world: int, capacity_factor):
    from magnet_dist.config import Config

    cfg = Config()
    cfg.model.dim = dim
    cfg.train.workers = world
    cfg.moe.experts_per_template = p
    cfg.moe.top_k = k
    cfg.moe.ep_size = ep_size
    cfg.moe.capacity_factor = capacity_factor
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(impl: str, p: int, k: int, tokens: int, args, device: torch.device) -> dict:
    """Time ``args.steps`` forward+backward steps of one MoE head on this rank."""
    import torch.distributed as dist

    from magnet_dist.parallel.build import build_moe

    world = dist.get_world_size()
    ep_size = 2 if impl == "ds-ep2" else 1
    cfg = _config(p, k, ep_size, args.dim, world, args.capacity_factor)
    if impl == "ds-ep1":
        from magnet_dist.model.experts import build_experts
        from magnet_dist.parallel.expert_parallel import ExpertParallelMoE
        from magnet_dist.parallel.groups import setup_expert_parallel

        torch.manual_seed(0)
        m, moe_cfg = cfg.model, cfg.moe
        experts = build_experts(
            MODS,
            list(moe_cfg.families),
            p,
            m.dim,
            moe_cfg.hidden_mult * m.dim,
            moe_cfg.alpha,
            moe_cfg.beta,
            moe_cfg.delta,
        )
        groups = setup_expert_parallel(1, len(experts))
        moe = ExpertParallelMoE(experts, len(MODS) * m.dim, k, groups, moe_cfg.capacity_factor)
    else:
        moe = build_moe(cfg, MODS, seed=0)
    moe.to(device)
    layer = getattr(moe, "deepspeed_moe", None)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, len(MODS) * args.dim, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(tokens, args.dim, generator=gen).to(device)

    def step() -> tuple[float, float]:
        moe.zero_grad(set_to_none=True)
        x.grad = None
        out, stats = moe(x)
        loss = (out * w).sum() + 0.01 * stats.l_aux()
        loss.backward()
        return float(stats.dropped), float(stats.assigned.max())

    for _ in range(args.warmup):
        step()
    if layer is not None:
        layer.profile, layer.timings = True, {}
    capacities = []
    dropped = 0.0
    _sync(device)
    dist.barrier()
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        d, _ = step()
        _sync(device)
        step_times.append(time.perf_counter() - start)
        dropped += d
        if layer is not None:
            capacities.append(moe.gate.last_capacity)
    elapsed = sum(step_times)
    # per step, the slowest rank; the median over steps resists other load on a shared machine
    slowest = torch.tensor(step_times, dtype=torch.float64, device=device)  # NCCL: on device
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    step_s = float(slowest.median())
    mean_step_s = float(slowest.mean())
    best_step_s = float(slowest.min())
    # all-to-all times and share: mean over ranks (each rank's own a2a time / its step time)
    local = [
        layer.timings.get(key, 0.0) / args.steps if layer is not None else 0.0 for key in A2A_KEYS
    ]
    local.append(sum(local) / (elapsed / args.steps))
    mean = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    mean = (mean / world).cpu()
    a2a = dict(zip(A2A_KEYS, mean[:-1].tolist(), strict=True))
    share = float(mean[-1])
    return {
        "impl": impl,
        "ep_size": ep_size,
        "experts_per_template": p,
        "E": moe.num_experts,
        "K": k,
        "tokens_per_rank": tokens,
        "world": world,
        "step_ms": 1000 * step_s,  # median over steps of the slowest rank
        "mean_step_ms": 1000 * mean_step_s,
        "best_step_ms": 1000 * best_step_s,
        "tokens_per_s": world * tokens / step_s,
        "best_tokens_per_s": world * tokens / best_step_s,  # fastest step: least disturbed
        "a2a_ms": {key: 1000 * v for key, v in a2a.items()},
        "a2a_share": share,
        "capacity": sum(capacities) / len(capacities) if capacities else None,
        "dropped_per_step": dropped / args.steps,
    }


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from magnet_dist.parallel.groups import init_deepspeed_comm

    init_deepspeed_comm()
    rows = []
    impls = ["dense", "ds-ep1"] + (["ds-ep2"] if world >= 2 else [])
    for tokens in args.tokens:
        for impl in impls:
            for p in args.experts_per_template:
                for k in args.top_k:
                    if impl == "ds-ep2" and (9 * p) % 2:
                        continue  # ep_size must divide E (E = 9 cannot be split over 2)
                    row = bench_one(impl, p, k, tokens, args, device)
                    rows.append(row)
                    if rank == 0:
                        print(_format_row(row), flush=True)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()
    # not destroy_process_group: in torch 2.2 it can deadlock right after a collective (its
    # destructor joins gloo's worker thread while holding the GIL that thread needs to free the
    # last work's tensors; pytorch/pytorch#154976), and mp.spawn would wait for ever
    os._exit(0)


HEADER = (
    f"{'impl':<7} {'E':>3} {'K':>2} {'tok/rank':>8} {'step ms':>9} {'tokens/s':>10} {'best tok/s':>10} "
    f"{'a2a ms (disp f/b, comb f/b)':>30} {'a2a %':>6} {'C':>6}"
)


def _format_row(r: dict) -> str:
    a = r["a2a_ms"]
    a2a = (
        "-"
        if r["impl"] == "dense"
        else (
            f"{a['a2a_dispatch_fwd']:.2f}/{a['a2a_dispatch_bwd']:.2f}, "
            f"{a['a2a_combine_fwd']:.2f}/{a['a2a_combine_bwd']:.2f}"
        )
    )
    share = "-" if r["impl"] == "dense" else f"{100 * r['a2a_share']:.1f}"
    cap = "-" if r["capacity"] is None else f"{r['capacity']:.0f}"
    return (
        f"{r['impl']:<7} {r['E']:>3} {r['K']:>2} {r['tokens_per_rank']:>8} "
        f"{r['step_ms']:>9.2f} {r['tokens_per_s']:>10.0f} {r['best_tokens_per_s']:>10.0f} {a2a:>30} {share:>6} {cap:>6}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--world", type=int, default=None, help="processes (default: 2 on CPU, 1 on CUDA)"
    )
    parser.add_argument(
        "--tokens",
        type=_ints,
        default=None,
        help="tokens per rank per step, comma-separated (default 4096)",
    )
    parser.add_argument("--experts-per-template", type=_ints, default=[1, 2, 4], help="p: E = 9p")
    parser.add_argument("--top-k", type=_ints, default=[1, 2, 3])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="default: no drop (capacity = global max load)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: 512 tokens, E in {9, 18}, K in {1, 2}, 3 steps",
    )
    parser.add_argument("--out", default="runs/bench_moe.json")
    args = parser.parse_args()
    if args.world is None:
        args.world = 1 if args.device == "cuda" else 2
    if args.tokens is None:
        args.tokens = [512] if args.quick else [4096]
    if args.quick:
        args.experts_per_template, args.top_k = [1, 2], [1, 2]
        args.steps, args.warmup = 3, 1
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device visible")
        if args.world != 1:
            parser.error("--device cuda runs one process on one GPU (--world 1)")
    elif args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch.multiprocessing as mp

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_path = out.with_suffix(".rows.tmp")
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    mp.spawn(
        _worker, args=(args.world, _free_port(), args, str(rows_path)), nprocs=args.world, join=True
    )
    rows = json.loads(rows_path.read_text())
    rows_path.unlink()
    report = {
        "benchmark": "moe_forward_backward",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_process": args.threads,
        "world": args.world,
        "dim": args.dim,
        "capacity_factor": args.capacity_factor,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
