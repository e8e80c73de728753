"""GPU check of the distributed trainer's device path (``train.use_gpu=true``), for a machine
with a CUDA GPU. Nothing here has run on a GPU yet: this script is how it gets checked.

1. ``quickstart``: the quick start (MovieLens-100K if ``data/ml-100k`` exists, else a synthetic
   dataset of its size: nothing is downloaded) with the distributed trainer, 1 worker, on the
   GPU (NCCL, model / blocks / embedding rows on ``cuda``, DGL's SparseAdam on the worker's
   device) and, for parity, the same run on the CPU (gloo). Same seed: the metrics should agree
   to within float noise.
2. ``step``: one training step at the 1M-user scale (synthetic graph: ``--users`` users,
   ``--users/10`` items, 20 interactions per user, 10 random content neighbours per item,
   128-d + 384-d item features), batch ``--batch``, fanouts 10,10: neighbour sampling on the
   CPU (as DGL's servers do), blocks and embedding rows moved to the device, forward +
   backward + optimizer step, timed per part on the GPU and on the CPU.

Prints a table and writes ``<out>/gpu_check.json``. Without a CUDA device it stops at once with
``no CUDA device`` (exit status 2).

    .venv/bin/python launch/gpu_check.py --out runs/gpu_check            # both parts
    .venv/bin/python launch/gpu_check.py --parts step --users 200000     # a smaller step
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def quickstart_overrides(out: Path, device: str, epochs: int) -> list[str]:
    data = ROOT / "data" / "ml-100k"
    if (data / "manifest.json").is_file():
        source = [f"data.path={data}"]
    else:  # MovieLens-100K's size, generated offline
        source = [
            "data.source=synthetic",
            f"data.path={out / 'data-quickstart-size'}",
            "data.synthetic_users=943",
            "data.synthetic_items=1682",
            "data.synthetic_interactions=100000",
        ]
    return source + [
        "trainer.mode=distributed",
        "train.workers=1",
        "graph.partitions=1",
        f"train.use_gpu={str(device == 'cuda').lower()}",
        f"train.epochs={epochs}",
        f"train.run_dir={out / f'quickstart-{device}'}",
        f"train.run_name=gpu-check-{device}",
        f"train.storage_path={out / f'ray-{device}'}",
    ]


def run_quickstart(out: Path, device: str, epochs: int) -> dict:
    from magnet_dist.config import load_config
    from magnet_dist.train.distributed import train_distributed
    from magnet_dist.train.pipeline import ensure_stages

    overrides = quickstart_overrides(out, device, epochs)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    ensure_stages(cfg, quiet=True)  # builds the synthetic dataset and content edges if needed
    t0 = time.time()
    metrics = train_distributed(cfg, progress=False)
    keys = ("valid.recall@20", "test.recall@20", "test.ndcg@20", "pairs_per_second")
    return {"device": device, "wall_s": round(time.time() - t0, 1), **{k: metrics[k] for k in keys}}


class LocalClient:
    """The two calls ``step.sampled_loss`` makes of a DGL client, over a graph in this
    process: the step is the distributed worker's own code."""

    def __init__(self, graph, num_users: int, modalities: list[str], dim: int, device) -> None:
        import torch

        from magnet_dist.graph.sampling import LocalGraph

        self.access, self.num_users, self.modalities = LocalGraph(graph), num_users, modalities
        n = graph.num_nodes("user") + graph.num_nodes("item")
        self.emb = torch.nn.Embedding(n, dim).to(device)
        self.times = {"sample_s": 0.0}

    def sample_blocks(self, users, items, fanouts, rescale=True, seed=None):
        from magnet_dist.graph.sampling import sample_blocks

        t = time.perf_counter()
        blocks = sample_blocks(self.access, users, items, fanouts, self.modalities, rescale)
        self.times["sample_s"] += time.perf_counter() - t
        return blocks

    def input_embeddings(self, blocks, device=None):
        import torch

        rows = torch.cat([blocks.input_users, self.num_users + blocks.input_items])
        return self.emb(rows.to(self.emb.weight.device))


def synthetic_graph(users: int, seed: int = 0):
    import numpy as np

    from magnet_dist.graph.partition import build_heterograph

    rng = np.random.default_rng(seed)
    items = max(10, users // 10)
    tu = np.repeat(np.arange(users, dtype=np.int64), 20)
    ti = rng.integers(0, items, tu.size, dtype=np.int64)
    src = np.repeat(np.arange(items, dtype=np.int64), 10)
    dst = rng.integers(0, items, src.size, dtype=np.int64)
    cs, cd = np.concatenate([src, dst]), np.concatenate([dst, src])
    feats = {
        "text": rng.standard_normal((items, 384), dtype=np.float32),
        "visual": rng.standard_normal((items, 128), dtype=np.float32),
    }
    g = build_heterograph(users, items, tu, ti, cs, cd, np.ones(cs.size, np.float32), feats)
    return g, users, items, tu, ti


def time_step(graph_parts, device_name: str, batch: int, steps: int) -> dict:
    import numpy as np
    import torch

    from magnet_dist.config import load_config
    from magnet_dist.model.magnet import MagnetModel
    from magnet_dist.model.schedule import ScheduleState
    from magnet_dist.train.step import sampled_loss

    g, users, items, tu, ti = graph_parts
    device = torch.device(device_name)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model.dim=64"])
    model = MagnetModel(cfg, {"text": 384, "visual": 128}).to(device)
    client = LocalClient(g, users, ["text", "visual"], cfg.model.dim, device)
    opt = torch.optim.Adam([*model.parameters(), *client.emb.parameters()], lr=1e-3)
    rng = np.random.default_rng(1)
    timings = []
    for step in range(steps + 2):  # two warm-up steps
        idx = rng.integers(0, tu.size, batch)
        u, p = torch.from_numpy(tu[idx]), torch.from_numpy(ti[idx])
        neg = torch.from_numpy(rng.integers(0, items, (batch, 1)))
        sync(device)
        client.times["sample_s"] = 0.0
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = sampled_loss(model, client, u, p, neg, [10, 10], ScheduleState(), device=device)
        out.loss.backward()
        opt.step()
        sync(device)
        total = time.perf_counter() - t0
        if step >= 2:
            timings.append((total, client.times["sample_s"]))
    total = sum(t for t, _ in timings) / len(timings)
    sample = sum(s for _, s in timings) / len(timings)
    return {
        "device": device_name,
        "users": users,
        "items": items,
        "batch": batch,
        "step_s": round(total, 4),
        "sample_s": round(sample, 4),
        "compute_s": round(total - sample, 4),
        "pairs_per_s": round(batch / total, 1),
    }


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--parts", default="quickstart,step")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison runs")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}): run this on a "
            "machine with an NVIDIA GPU and a driver for CUDA "
            f"{torch.version.cuda}",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    devices = ["cuda"] if args.no_cpu else ["cuda", "cpu"]
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    path = args.out / "gpu_check.json"
    parts = set(args.parts.split(","))
    if "quickstart" in parts:
        results["quickstart"] = [run_quickstart(args.out, d, args.epochs) for d in devices]
        path.write_text(json.dumps(results, indent=2))
        print(f"\nquick start, 1 worker, {args.epochs} epochs\n{table(results['quickstart'])}")
    if "step" in parts:
        t0 = time.time()
        graph = synthetic_graph(args.users)
        results["graph_build_s"] = round(time.time() - t0, 1)
        cpu_steps = max(1, min(args.steps, 2))
        results["step"] = [
            time_step(graph, d, args.batch, args.steps if d == "cuda" else cpu_steps)
            for d in devices
        ]
        path.write_text(json.dumps(results, indent=2))
        print(f"\none training step ({args.users:,} users)\n{table(results['step'])}")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
