"""The distributed trainer against the single-process reference, and end to end through real
DGL servers, real Ray Train workers and a real gloo process group (no mocks)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_support import graph_server_pids, tiny_distributed_config

from magnet_dist.config import load_config
from magnet_dist.errors import MagnetError
from magnet_dist.graph.partition import partition_dataset
from magnet_dist.graph.servers import free_base_port, start_servers
from magnet_dist.train.distributed import check_layout, train_distributed

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def parity(tiny_dataset, tmp_path, *overrides: str) -> dict:
    """tests/parity_worker.py's differences (one DGL client, fanout -1, vs the reference)."""
    part_config = partition_dataset(tiny_dataset, 1, method="random", out_dir=tmp_path / "p1")
    with start_servers(
        part_config, num_clients=1, log_dir=tmp_path / "srv", base_port=free_base_port()
    ) as servers:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "parity_worker.py"),
                str(tiny_dataset),
                str(part_config),
                str(servers.ip_config),
                *overrides,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("PARITY ")]
        assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[0].removeprefix("PARITY "))


def test_one_worker_fanout_all_matches_reference_loss_and_gradients(tiny_dataset, tmp_path):
    r = parity(tiny_dataset, tmp_path)
    assert r["dist_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
    assert r["dist_bpr"] == pytest.approx(r["ref_bpr"], rel=1e-5, abs=1e-6)
    assert r["num_dense_grads"] > 10
    assert r["dense_grad_max_diff"] <= 1e-5 * max(1.0, r["ref_grad_scale"]), r
    assert r["emb_grad_max_diff"] <= 1e-6, r
    assert r["ref_grad_outside_inputs"] == 0.0  # sampled inputs cover every node with a gradient


def test_mf_variant_in_the_distributed_loss_matches_reference(tiny_dataset, tmp_path):
    """model.variant=mf through the distributed worker's loss: no hops sampled (fanouts []),
    the behaviour channel only, no dense parameter with a gradient; the BPR loss and the ID
    embedding gradients equal the reference's."""
    r = parity(tiny_dataset, tmp_path, "model.variant=mf")
    assert r["modalities"] == ["behaviour"] and r["hops"] == 0
    assert r["num_dense_grads"] == 0
    assert r["dist_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
    assert r["dist_bpr"] == pytest.approx(r["ref_bpr"], rel=1e-5, abs=1e-6)
    assert r["emb_grad_max_diff"] <= 1e-6, r
    assert r["ref_grad_outside_inputs"] == 0.0


def test_history_mode_loss_matches_reference(tiny_dataset, tmp_path):
    """train.history through the distributed worker's loss: one sampled hop (every neighbour)
    and a table refreshed from the DistEmbeddings give the reference's full-graph loss (the
    table is float16); layers 0-1 carry the gradients, so the ID rows still get them."""
    r = parity(tiny_dataset, tmp_path, "train.history=true", "train.fanouts=[-1]")
    assert r["hops"] == 1
    assert r["dist_loss"] == pytest.approx(r["ref_loss"], rel=1e-3)
    assert r["dist_bpr"] == pytest.approx(r["ref_bpr"], rel=1e-3)
    assert r["num_dense_grads"] > 10


def test_two_workers_train_in_history_mode(tiny_dataset, tmp_path):
    """train.history end to end on 2 Ray workers: the table is refreshed every
    history_refresh_steps steps (3 here; 2 epochs of 10 steps: before steps 0, 3, ..., 18),
    the throughput with the refreshes counted is reported, and the model ranks well above
    random (~0.17 on 120 items)."""
    metrics = train_distributed(
        tiny_distributed_config(
            tiny_dataset,
            tmp_path / "run",
            "train.history=true",
            "train.fanouts=[5]",
            "train.history_refresh_steps=3",
        ),
        progress=False,
    )
    assert metrics["steps"] == 20
    assert metrics["history_refreshes"] == 7
    assert 0 < metrics["pairs_per_second_with_refresh"] < metrics["pairs_per_second"]
    assert metrics["test.recall@20"] > 0.25


def read_steps(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_worker_run(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "run"
    before = graph_server_pids(tiny_dataset)
    metrics = train_distributed(tiny_distributed_config(tiny_dataset, run), progress=False)
    leftover = sorted(graph_server_pids(tiny_dataset) - before)
    return run, metrics, leftover


def test_two_workers_train_end_to_end(two_worker_run):
    run, metrics, _ = two_worker_run
    for key in [
        "valid.recall@20",
        "test.recall@10",
        "test.recall@20",
        "test.ndcg@10",
        "test.ndcg@20",
        "best_epoch",
    ]:
        assert key in metrics
    assert metrics["workers"] == 2 and metrics["partitions"] == 2
    assert metrics["test.recall@20"] > 0.25  # random ranking gives ~0.17 on 120 items
    steps = [int(r["step"]) for r in read_steps(run)]
    assert steps == list(range(1, len(steps) + 1))
    assert (run / "checkpoints" / "best.pt").exists()
    assert (run / "plots" / "routing_entropy.png").exists()
    # hard Top-K usage of the global batch (all-reduced): logged per step and summarised
    rows = read_steps(run)
    assert all(0 <= float(r["h_load"]) <= 1 for r in rows)
    for part in ("final", "best_epoch"):
        assert sum(metrics["routing"][part]["load_share"]) == pytest.approx(1.0)
        assert len(metrics["routing"][part]["load_share"]) == 9


def test_evaluate_reproduces_the_distributed_runs_in_loop_metrics(two_worker_run, tmp_path):
    """The exported checkpoints/best.pt (dense model with every expert, one embedding table)
    ranked again by `magnet-dist evaluate` in one process gives the metrics the workers
    computed sharded in the loop, for the selected epoch."""
    from magnet_dist.cli import main as cli_main

    run, metrics, _ = two_worker_run
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--run", str(run), "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())
    assert got["mode"] == "exact" and got["checkpoint_epoch"] == metrics["best_epoch"]
    keys = [k for k in metrics if k.startswith(("valid.", "test."))]
    assert "test.recall@20" in keys and len(keys) == 8
    for key in keys:
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_stage_switch_happens_on_every_worker_together(two_worker_run):
    run, metrics, _ = two_worker_run
    stages = [int(r["stage"]) for r in read_steps(run)]
    assert stages == sorted(stages) and 1 in stages  # switched once, never back
    assert metrics["switch_step"] == stages.index(1) + 1  # (workers assert equality each step)
    # on the tiny data H_load starts above tau: the hard trigger fires itself, at S_min (4)
    assert metrics["trigger_on"] == "hard" and not metrics["switch_forced"]
    assert metrics["switch_step"] == 4


def test_graph_servers_listen_where_the_config_says(two_worker_run):
    """trainer.host (default loopback) is what the servers bind, read from their sockets by
    the workers (psutil), not merely what was asked."""
    from magnet_dist.train.worker_info import read_workers

    run = two_worker_run[0]
    servers = [s for w in read_workers(run) for s in w["graph_servers"]]
    assert sorted(s["part"] for s in servers) == [0, 1]
    for s in servers:
        assert s["listening"] == [f"127.0.0.1:{s['port']}"], s


def test_no_graph_server_left_running(two_worker_run, tiny_dataset):
    # the servers were those of partitions under the dataset, which the leftover filter matches
    assert list(Path(tiny_dataset).glob("partitions-2-*/magnet.json"))
    assert two_worker_run[2] == []


def test_embedded_cluster_sets_up_every_worker_process():
    """Every worker of the embedded cluster gets RAY_WORKER_ENV (Ray leaves the graph servers to
    us) and runs the setup hook that quiets Ray Train's placement-group cleaner (without the
    dashboard it warned every second: ~230 lines in a quick start, none with the hook)."""
    import logging

    import ray

    from magnet_dist.config import load_config
    from magnet_dist.train.distributed import (
        PLACEMENT_GROUP_CLEANER_LOGGER,
        RAY_WORKER_ENV,
        ray_cluster,
    )

    @ray.remote(num_cpus=0)
    def worker_setup() -> tuple[dict, int]:
        import logging
        import os

        env = {k: os.environ.get(k) for k in RAY_WORKER_ENV}
        return env, logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).level

    with ray_cluster(load_config(overrides=["train.workers=1"])):
        env, level = ray.get(worker_setup.remote(), timeout=120)
    assert env == RAY_WORKER_ENV
    assert level == logging.ERROR


def test_more_partitions_than_workers_is_refused():
    cfg = load_config(overrides=["train.workers=2", "graph.partitions=3"])
    with pytest.raises(MagnetError, match="train.workers=2 does not fit graph.partitions=3"):
        check_layout(cfg)


def test_expert_parallel_two_workers_end_to_end(tiny_dataset, tmp_path):
    """E = 18 experts sharded 9 + 9 over 2 Ray workers (DeepSpeed MoE all-to-all, gloo)."""
    run = tmp_path / "ep"
    cfg = load_config(
        overrides=[
            f"data.path={tiny_dataset}",
            f"train.run_dir={run}",
            "trainer.mode=distributed",
            "train.workers=2",
            "train.epochs=1",
            "train.batch_size=512",
            "model.dim=16",
            "moe.experts_per_template=2",
            "moe.ep_size=2",
            "graph.partition_method=random",
        ]
    )
    metrics = train_distributed(cfg, progress=False)
    assert metrics["ep_size"] == 2 and metrics["test.recall@20"] > 0.2
    experts = json.loads((run / "experts.json").read_text())["experts"]
    assert len(experts) == 18
    rows = read_steps(run)
    assert all(float(r["load_17"]) >= 0 for r in rows)  # stats cover every global expert
    shards = sorted(p.name for p in (run / "ray").rglob("experts-ep*-of-002.pt"))
    assert {"experts-ep000-of-002.pt", "experts-ep001-of-002.pt"} <= set(shards)


def test_workers_get_absolute_paths(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory (regression: the quick start's
    relative data.path was not found by the workers)."""
    from magnet_dist.train.distributed import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(
        load_config(overrides=["data.path=data/x", "graph.partition_dir=p", "train.storage_path=s"])
    )
    assert cfg.data.path == str(tmp_path / "data" / "x")
    assert cfg.graph.partition_dir == str(tmp_path / "p")
    assert cfg.train.storage_path == str(tmp_path / "s")
    assert Path(cfg.train.run_dir).is_absolute()


def test_epoch_plan_global_and_per_worker_batch():
    """Global batch: each worker takes batch/world pairs a step; per-worker batch: batch each.
    Either way every local edge once and the same number of steps on every rank (unequal
    shards: the step count follows the largest)."""
    import numpy as np

    from magnet_dist.train.step import plan_batches

    shards = (1000, 900)
    for per, want_steps in ((False, 8), (True, 4)):  # ceil(1000 / 128), ceil(1000 / 256)
        for rank, num_local in enumerate(shards):
            plan = plan_batches(num_local, max(shards), 256, 2, 7, 0, rank, per)
            assert len(plan) == want_steps
            assert max(len(b) for b in plan) <= (256 if per else 128)
            assert np.array_equal(np.sort(np.concatenate(plan)), np.arange(num_local))
