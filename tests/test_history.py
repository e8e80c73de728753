"""History mode (train/history.py): one sampled hop + a full-graph table of the deeper layers.

With a fresh table and every neighbour sampled, the history mode's forward must equal the exact
mode's (the single-process reference of this path); the table, its refresh schedule and the
config rule are checked on their own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from magnet_dist.config import Config, load_config
from magnet_dist.graph.sampling import LocalGraph, sample_blocks
from magnet_dist.model.hops import full_graph_hop
from magnet_dist.train.history import History

WORKER = Path(__file__).with_name("graph_dist_worker.py")
_spec = importlib.util.spec_from_file_location("graph_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


class WholeGraph:
    """The three things History.refresh reads of the trainer's FullGraph, from test data."""

    def __init__(self, data) -> None:
        train = data["split"] == 0
        self.args = (
            int(data["num_users"]),
            int(data["num_items"]),
            torch.from_numpy(data["users"][train]),
            torch.from_numpy(data["items"][train]),
            torch.from_numpy(data["content_src"]),
            torch.from_numpy(data["content_dst"]),
            torch.from_numpy(data["content_weight"]),
        )
        self.hop = full_graph_hop(*self.args)
        u, i = self.args[:2]
        self.is_item = torch.arange(u + i) >= u
        self.feats = {"t": torch.from_numpy(data["feat_t"]), "v": torch.from_numpy(data["feat_v"])}
        self.released = 0

    def release_hop(self) -> None:
        self.released += 1


@pytest.fixture(scope="module")
def data():
    return worker.make_graph_data()


def local_graph(data) -> LocalGraph:
    return LocalGraph(worker.heterograph(data))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_one_hop_plus_fresh_history_equals_the_exact_forward(data, layers):
    model = worker.make_model()
    model.encoder.layers = layers
    u, i = data["num_users"], data["num_items"]
    torch.manual_seed(3)
    user_emb, item_emb = torch.randn(u, worker.DIM), torch.randn(i, worker.DIM)
    ref = worker.reference_reps(data, model, user_emb, item_emb, layers)

    whole = WholeGraph(data)
    history = History(u, i, refresh_steps=0)
    history.refresh(model, whole, torch.cat([user_emb, item_emb]), step=0)
    assert whole.released == 1  # the full graph is not kept between refreshes
    assert history.refreshed_at == 0 and history.refreshes == 1
    if layers == 1:
        assert history.table == {}  # nothing deeper than the sampled hop
    else:
        assert set(history.table) == {"observed", "augmented"}
        assert history.table["observed"].dtype == torch.float16
        assert history.table["observed"].shape == (u + i, 3 * worker.DIM)

    seed_users = torch.tensor([5, 0, 5, u - 1])
    seed_items = torch.tensor([3, i - 1, 3])
    b = sample_blocks(local_graph(data), seed_users, seed_items, [-1], ["t", "v"])
    assert len(b.hops) == 1
    torch.testing.assert_close(b.output_users, torch.unique(seed_users))
    torch.testing.assert_close(b.output_items, torch.unique(seed_items))
    deep = history.rows(b.output_users, b.output_items)
    assert (deep is None) == (layers == 1)
    emb = torch.cat([user_emb[b.input_users], item_emb[b.input_items]])
    with torch.no_grad():
        out = model.encode(b.hops, emb, b.features, b.is_item_in, b.is_item_out, deep)
    # the table is float16: ~1e-3 relative on values of order 1
    for m in out:
        torch.testing.assert_close(out[m][b.user_rows], ref[m][seed_users], atol=3e-3, rtol=0)
        torch.testing.assert_close(out[m][b.item_rows], ref[m][u + seed_items], atol=3e-3, rtol=0)
    if layers >= 2:  # without the table the same hop gives a different (one-layer) answer
        with torch.no_grad():
            short = model.encode(b.hops, emb, b.features, b.is_item_in, b.is_item_out)
        assert (short["behaviour"][b.user_rows] - ref["behaviour"][seed_users]).abs().max() > 0.05


def test_a_stale_table_gives_no_gradient_and_differs_from_the_exact_forward(data):
    model = worker.make_model()
    u, i = data["num_users"], data["num_items"]
    torch.manual_seed(4)
    emb_all = torch.randn(u + i, worker.DIM)
    history = History(u, i, refresh_steps=0)
    history.refresh(model, WholeGraph(data), emb_all, step=0)
    moved = emb_all + 0.5  # the embeddings train on; the table does not follow until a refresh
    ref = worker.reference_reps(data, model, moved[:u], moved[u:], 2)
    b = sample_blocks(local_graph(data), torch.tensor([1, 2]), torch.tensor([0]), [-1], ["t", "v"])
    emb = torch.cat([moved[b.input_users], moved[u + b.input_items]]).requires_grad_(True)
    out = model.encode(
        b.hops,
        emb,
        b.features,
        b.is_item_in,
        b.is_item_out,
        history.rows(b.output_users, b.output_items),
    )
    assert (
        out["behaviour"][b.user_rows] - ref["behaviour"][torch.tensor([1, 2])]
    ).abs().max() > 0.05
    out["behaviour"].sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # layers 0 and 1 train


def test_rows_before_a_refresh_is_an_error():
    with pytest.raises(RuntimeError, match="before the first refresh"):
        History(3, 2, 0).rows(torch.tensor([0]), torch.tensor([1]))


@pytest.mark.parametrize(
    "refresh_steps, calls, expected",
    [
        # (step, first batch of an epoch) -> due?
        (0, [(0, True), (1, False), (7, False), (8, True), (9, False)], [1, 0, 0, 1, 0]),
        (3, [(0, True), (1, False), (3, False), (4, True), (6, False)], [1, 0, 1, 0, 1]),
    ],
)
def test_refresh_schedule(data, refresh_steps, calls, expected):
    model = worker.make_model()
    u, i = data["num_users"], data["num_items"]
    history = History(u, i, refresh_steps)
    got = []
    for step, first in calls:
        due = history.due(step, first)
        got.append(int(due))
        if due:
            history.refresh(model, WholeGraph(data), torch.zeros(u + i, worker.DIM), step)
    assert got == expected


def test_a_resumed_worker_refreshes_before_its_first_step():
    history = History(3, 2, refresh_steps=100)
    assert history.due(57, first_of_epoch=False)  # no table yet, whatever the step


def test_history_config_samples_one_hop():
    cfg = load_config(overrides=["train.history=true", "train.fanouts=[10]"])
    assert cfg.train.history and cfg.train.fanouts == [10] and cfg.model.layers == 2
    with pytest.raises(ValueError, match=r"train.history samples one hop.*train.fanouts=\[10\]"):
        Config.model_validate({"train": {"history": True, "fanouts": [10, 10]}})


# os._exit once the answer is written: torch 2.2's destroy_process_group can deadlock right after
# a collective (see tests/test_step_clock.py).
SHARE_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from magnet_dist.train.history import History
from magnet_dist.model.encoder import DualViewEncoder
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
enc = DualViewEncoder({"t": 6}, dim=4, layers=2)
h = History(5, 3, refresh_steps=0)
if rank == 0:
    g = torch.Generator().manual_seed(0)
    h.table = {v: torch.randn(8, 8, generator=g).half() for v in ("observed", "augmented")}
    h.refreshed_at, h.refreshes = 7, 1
h.share(7, enc, source=0)
torch.save({"table": h.table, "at": h.refreshed_at, "n": h.refreshes}, out)
os._exit(0)
"""


def test_share_gives_every_rank_rank0s_table(tmp_path):
    import subprocess
    import sys

    init = f"file://{tmp_path / 'init'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARE_SCRIPT, str(r), init, str(tmp_path / f"r{r}.pt")]
        )
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert set(r1["table"]) == {"observed", "augmented"}
    for v in r0["table"]:
        assert r1["table"][v].dtype == torch.float16
        torch.testing.assert_close(r1["table"][v], r0["table"][v], rtol=0, atol=0)
    assert r0["table"]["observed"].abs().sum() > 0
    assert (r1["at"], r1["n"]) == (r0["at"], r0["n"]) == (7, 1)
