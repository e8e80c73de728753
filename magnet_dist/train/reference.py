"""The single-process reference trainer (``trainer.mode=reference``).

Full-graph LightGCN propagation every step, dense MoE, one Adam over everything (ID embeddings
included, as a dense ``nn.Embedding``). Same model, loss, routing schedule, evaluation and
selection as the distributed trainer, but not the same optimisation trajectory: that one trains
on neighbour-sampled blocks, updates the ID embeddings with DGL's SparseAdam (state only for rows
a batch touched), and batches each worker's own partition edges with negatives seeded per
(epoch, batch, rank) (``step.plan_batches``), where this one shuffles all training pairs
(``train/batches.py``). So the parity test (tests/test_distributed.py) compares the loss and
gradients of one batch on the same inputs, not whole runs.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from magnet_dist.config import Config
from magnet_dist.data.dataset import Dataset, load_dataset
from magnet_dist.eval.scoring import SplitEvaluator, ranking_score_fn
from magnet_dist.locks import run_lock
from magnet_dist.model.hops import Hop, full_graph_hop
from magnet_dist.model.magnet import MagnetModel, parameter_groups
from magnet_dist.model.schedule import ScheduleState, advance, trigger_signal
from magnet_dist.train.batches import NegativeSampler, batch_rng, epoch_batches
from magnet_dist.train.checkpoint import load_checkpoint, save_checkpoint
from magnet_dist.train.common import (
    SELECTION_METRIC,
    EarlyStopping,
    append_evaluation,
    epoch_routing,
    expert_table,
    finish_run,
    step_row,
    truncate_evaluations,
)
from magnet_dist.train.run_folder import StepLog, write_config, write_json_atomic


class FullGraph:
    """The whole training graph and every input tensor the encoder needs.

    The hop (the edges and their CSR matrices, most of the memory at scale) is built on first
    use and kept until :meth:`release_hop`; the history mode (train/history.py) needs it only
    while it refreshes."""

    def __init__(self, ds: Dataset, cfg: Config, content_edges=None) -> None:
        self.num_users, self.num_items = ds.num_users, ds.num_items
        self._pairs = ds.pairs(0)
        self._content = None
        if content_edges is not None and cfg.model.content_view:
            self._content = [torch.from_numpy(np.array(a)) for a in content_edges]
        self._hop: Hop | None = None
        n = ds.num_users + ds.num_items
        self.is_item = torch.arange(n) >= ds.num_users
        # item rows only (users have no content input; the encoder projects item rows only)
        self.feats = {c: torch.from_numpy(np.array(ds.features(c))) for c in ds.modalities}
        self.layers = cfg.model.layers

    @property
    def hop(self) -> Hop:
        if self._hop is None:
            tu, ti = self._pairs
            cs, cd, cw = self._content if self._content is not None else (None, None, None)
            self._hop = full_graph_hop(
                self.num_users,
                self.num_items,
                torch.as_tensor(tu),
                torch.as_tensor(ti),
                cs,
                cd,
                cw,
            )
        return self._hop

    def release_hop(self) -> None:
        self._hop = None

    @property
    def hops(self) -> list[Hop]:
        return [self.hop] * self.layers

    def encode(self, model: MagnetModel, id_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return model.encode(self.hops, id_emb, self.feats, self.is_item, self.is_item)


def init_id_embeddings(num_nodes: int, dim: int, seed: int) -> nn.Embedding:
    """Users then items, one table; xavier-uniform as in MMRec's LightGCN."""
    gen = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(num_nodes, dim)
    bound = (6.0 / (num_nodes + dim)) ** 0.5
    with torch.no_grad():
        emb.weight.uniform_(-bound, bound, generator=gen)
    return emb


def build_model(cfg: Config, ds: Dataset) -> MagnetModel:
    torch.manual_seed(cfg.train.seed)
    return MagnetModel(cfg, dict(ds.modalities))


def select(reps: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every modality's representation (shared with the distributed loop)."""
    return {m: v[idx] for m, v in reps.items()}


def evaluate(model, graph: FullGraph, emb, evaluator: SplitEvaluator, prefix: str) -> dict:
    model.eval()
    with torch.no_grad():
        reps = graph.encode(model, emb.weight)
    users = {m: v[: graph.num_users] for m, v in reps.items()}
    items = {m: v[graph.num_users :] for m, v in reps.items()}
    sums = evaluator.sums(ranking_score_fn(model, users, items))
    model.train()
    return sums.metrics(prefix)


def train_reference(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train, select on validation Recall@20, test the best model, write the run folder."""
    with ExitStack() as hold:  # the run lock, once the inputs are checked
        return _train_reference(cfg, progress, hold)


def _train_reference(cfg: Config, progress: bool, hold: ExitStack) -> dict[str, Any]:
    from magnet_dist.graph.content import read_content_edges

    # inputs first (checksums of manifest.json: a damaged Parquet file fails here), so a bad
    # input leaves no run folder behind
    ds = load_dataset(cfg.data.path, verify_checksum=True)
    edges = read_content_edges(cfg.data.path) if cfg.model.content_view else None
    graph = FullGraph(ds, cfg, edges)
    if cfg.train.history:
        print(
            "[reference] train.history is the distributed trainer's sampling: this trainer "
            "propagates the whole graph every step (train.fanouts unused)"
        )
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoints" / "reference.pt"
    # a resume is checked (every byte, every config key) before anything is written
    ck = load_checkpoint(ckpt_path, cfg, resume=True) if ckpt_path.exists() else None
    hold.enter_context(run_lock(run_dir))
    write_config(run_dir, cfg)
    model = build_model(cfg, ds)
    emb = init_id_embeddings(ds.num_users + ds.num_items, cfg.model.dim, cfg.train.seed)
    groups = parameter_groups(model, cfg.moe.weight_decay)
    opt = torch.optim.Adam([*groups, {"params": list(emb.parameters())}], lr=cfg.train.lr)
    if model.moe is not None:
        write_json_atomic(run_dir / "experts.json", expert_table(model))

    tu, ti = ds.pairs(0)
    sampler = NegativeSampler(tu, ti, ds.num_items)
    valid = SplitEvaluator(ds, 1, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk)
    test = SplitEvaluator(ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk)
    stopper = EarlyStopping(cfg.train.patience)
    state, step, start_epoch = ScheduleState(), 0, 0
    best_path = run_dir / "checkpoints" / "best.pt"
    log = StepLog(run_dir)
    if ck is not None:
        model.load_state_dict(ck["model"])
        emb.load_state_dict(ck["embeddings"])
        opt.load_state_dict(ck["optimizer"])
        state = ScheduleState.from_dict(ck["schedule"])
        stopper.load_state_dict(ck["early_stopping"])
        step, start_epoch = ck["step"], ck["epoch"] + 1
        print(f"[reference] resumed from {ckpt_path} at epoch {start_epoch}, step {step}")
    # rows an earlier attempt logged after this step (all of them on a fresh start) go
    log.resume_at(step)
    truncate_evaluations(run_dir, step)

    t0 = time.time()
    pairs_trained, step_seconds = 0, 0.0
    last_routing = epoch_routing(run_dir, start_epoch - 1)  # a resumed run's last epoch
    epochs = range(start_epoch, cfg.train.epochs)
    bar = tqdm(epochs, desc="epochs", disable=not progress, unit="epoch")
    for epoch in bar:
        for b, idx in epoch_batches(len(tu), cfg.train.batch_size, cfg.train.seed, epoch):
            if cfg.train.max_steps_per_epoch and b >= cfg.train.max_steps_per_epoch:
                break
            t_step = time.perf_counter()
            users, pos = tu[idx], ti[idx]
            neg = sampler.sample(users, cfg.train.n_neg, batch_rng(cfg.train.seed, epoch, b))
            out = train_step(model, graph, emb, opt, users, pos, neg, state)
            if out.stats is not None:
                state = advance(state, trigger_signal(out.stats, cfg.routing), cfg.routing)
            step += 1
            pairs_trained += len(idx)
            step_seconds += time.perf_counter() - t_step
            log.log(step_row(step, epoch, out, state))
        log.flush()
        last_routing = epoch_routing(run_dir, epoch)  # from metrics.csv, resume-proof
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics = evaluate(model, graph, emb, valid, "valid")
            improved = stopper.update(epoch, metrics[SELECTION_METRIC], last_routing)
            append_evaluation(run_dir, {"epoch": epoch, "step": step, **metrics})
            bar.set_postfix(recall20=f"{metrics[SELECTION_METRIC]:.4f}", stage=state.stage[:4])
            if improved:
                save_checkpoint(
                    best_path,
                    cfg,
                    {"model": model.state_dict(), "embeddings": emb.state_dict(), "epoch": epoch},
                )
        save_checkpoint(
            ckpt_path,
            cfg,
            {
                "model": model.state_dict(),
                "embeddings": emb.state_dict(),
                "optimizer": opt.state_dict(),
                "schedule": state.to_dict(),
                "early_stopping": stopper.state_dict(),
                "step": step,
                "epoch": epoch,
            },
        )
        if stopper.should_stop:
            break
    log.close()
    wall = time.time() - t0

    best = load_checkpoint(best_path, cfg)
    model.load_state_dict(best["model"])
    emb.load_state_dict(best["embeddings"])
    metrics = {
        **evaluate(model, graph, emb, valid, "valid"),
        **evaluate(model, graph, emb, test, "test"),
        "best_epoch": stopper.best_epoch,
        "steps": step,
        "train_seconds": wall,
        "pairs_per_second": pairs_trained / max(step_seconds, 1e-9),  # training steps only
        "stage": state.stage,
        "switch_step": state.switch_step,
        "switch_forced": state.forced,
        "trigger_on": cfg.routing.trigger_on,
        "routing": {"final": last_routing, "best_epoch": stopper.best_info},
        "fusion_lambda": dict(
            zip(model.modalities, model.encoder.fusion_weights.tolist(), strict=True)
        ),
        "trainer": "reference",
    }
    return finish_run(run_dir, metrics)


def train_step(model, graph, emb, opt, users, pos, neg, state):
    """One optimisation step on a batch: encode the full graph, BPR + reg + routing loss."""
    opt.zero_grad(set_to_none=True)
    reps = graph.encode(model, emb.weight)
    u = torch.as_tensor(users)
    p = torch.as_tensor(pos) + graph.num_users
    n = torch.as_tensor(neg).reshape(-1) + graph.num_users
    ego = emb.weight[torch.cat([u, p, n])]
    out = model.loss(select(reps, u), select(reps, p), select(reps, n), ego, state)
    out.loss.backward()
    opt.step()
    return out
