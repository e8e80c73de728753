"""The single-process reference trainer end to end on a tiny synthetic dataset."""

import csv
import json

import pytest
import torch

from magnet_dist.cli import main as cli_main
from magnet_dist.config import load_config
from magnet_dist.errors import MagnetError
from magnet_dist.train.reference import train_reference

REQUIRED = [
    "valid.recall@20",
    "test.recall@10",
    "test.recall@20",
    "test.ndcg@10",
    "test.ndcg@20",
    "best_epoch",
]


def tiny_cfg(data, run_dir, *extra):
    return load_config(
        overrides=[
            f"data.path={data}",
            f"train.run_dir={run_dir}",
            "train.epochs=3",
            "train.batch_size=512",
            "model.dim=16",
            "routing.min_steps=5",
            "routing.window=3",
            "routing.max_steps=20",
            "routing.ramp_steps=5",
            *extra,
        ]
    )


def read_steps(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_reference_run_writes_the_run_folder(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    metrics = train_reference(tiny_cfg(tiny_dataset, run), progress=False)
    on_disk = json.loads((run / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in on_disk and key in metrics
    # Far better than random ranking (recall@20 of random ~ 20/120 of held-out items).
    assert on_disk["test.recall@20"] > 0.25
    rows = read_steps(run)
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    for col in ["loss", "bpr", "h_conf", "h_use", "h_load", "ema_trigger", "stage", "load_0"]:
        assert col in rows[0]
    assert "usage_8" in rows[0]
    # the routing summary: hard Top-K shares of the last epoch and of the best epoch
    routing = on_disk["routing"]
    for part in ("final", "best_epoch"):
        assert sum(routing[part]["load_share"]) == pytest.approx(1.0)
        assert len(routing[part]["load_share"]) == 9
        assert 0 <= routing[part]["h_load"] <= 1
    assert routing["final"]["zero_load_experts"] == sum(
        v == 0 for v in routing["final"]["load_share"]
    )
    assert {p.name for p in (run / "plots").iterdir()} >= {
        "loss.png",
        "valid_recall.png",
        "routing_entropy.png",
        "expert_usage.png",
        "modality_reliance.png",
    }
    assert (run / "checkpoints" / "reference.pt").exists()
    assert any((run / "tensorboard").iterdir())


def test_stage_switch_is_logged_once(tiny_dataset, tmp_path):
    """On the tiny data coverage does its job (H_load of the Top-K assignments ~0.92 from the
    start, above tau=0.9): the trigger fires on its own, at S_min (5) and not before."""
    run = tmp_path / "run"
    metrics = train_reference(tiny_cfg(tiny_dataset, run), progress=False)
    rows = read_steps(run)
    stages = [int(r["stage"]) for r in rows]
    assert stages == sorted(stages) and stages[-1] == 1  # coverage then specialisation
    assert metrics["switch_step"] == stages.index(1) + 1
    assert metrics["trigger_on"] == "hard" and not metrics["switch_forced"]
    assert metrics["switch_step"] == 5  # routing.min_steps=5: never earlier
    # the EMA it watched is of H_load: above tau for the window (3 steps) before the switch
    assert all(float(r["ema_trigger"]) >= 0.9 for r in rows[2:5])


class CollapsedRouter(torch.nn.Module):
    """Router logits that put experts 0 and 1 in every token's Top-2 by a hair: soft H_use and
    H_conf ~1, H_load = log 2 / log 9 ~ 0.32 (the MovieLens collapse, made deterministic)."""

    def forward(self, x):
        bias = torch.zeros(9)
        bias[:2] = 0.01
        return x.new_zeros(x.shape[0], 9) + bias


def with_collapsed_router(monkeypatch):
    import magnet_dist.train.reference as reference

    build = reference.build_model

    def build_collapsed(cfg, ds):
        model = build(cfg, ds)
        model.moe.router.proj = CollapsedRouter()
        return model

    monkeypatch.setattr(reference, "build_model", build_collapsed)


def test_collapsed_router_is_forced_at_max_steps_not_triggered(tiny_dataset, tmp_path, monkeypatch):
    with_collapsed_router(monkeypatch)
    metrics = train_reference(tiny_cfg(tiny_dataset, tmp_path / "hard"), progress=False)
    assert metrics["switch_step"] == 20 and metrics["switch_forced"]  # routing.max_steps=20
    rows = read_steps(tmp_path / "hard")
    assert max(float(r["h_load"]) for r in rows) < 0.33
    assert min(float(r["h_use"]) for r in rows) > 0.99  # the soft reading sees nothing wrong
    assert metrics["routing"]["final"]["zero_load_experts"] == 7


def test_soft_trigger_is_blind_to_a_collapsed_router(tiny_dataset, tmp_path, monkeypatch):
    """routing.trigger_on=soft (the spec's literal reading) fires at S_min on the same router."""
    with_collapsed_router(monkeypatch)
    cfg = tiny_cfg(tiny_dataset, tmp_path / "soft", "routing.trigger_on=soft")
    metrics = train_reference(cfg, progress=False)
    assert metrics["switch_step"] == 5 and not metrics["switch_forced"]


def test_same_seed_same_metrics(tiny_dataset, tmp_path):
    a = train_reference(tiny_cfg(tiny_dataset, tmp_path / "a", "train.epochs=1"), progress=False)
    b = train_reference(tiny_cfg(tiny_dataset, tmp_path / "b", "train.epochs=1"), progress=False)
    assert a["test.recall@20"] == b["test.recall@20"]
    assert a["test.ndcg@20"] == b["test.ndcg@20"]


def test_resume_continues_steps_without_repeats(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train_reference(tiny_cfg(tiny_dataset, run, "train.epochs=1"), progress=False)
    first = len(read_steps(run))
    metrics = train_reference(tiny_cfg(tiny_dataset, run, "train.epochs=2"), progress=False)
    steps = [int(r["step"]) for r in read_steps(run)]
    assert steps == list(range(1, 2 * first + 1))
    # the routing summary of the last epoch covers all of its steps
    assert metrics["routing"]["final"]["epoch"] == 1
    assert metrics["routing"]["final"]["steps"] == first


def test_checkpoint_from_other_config_is_refused(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train_reference(tiny_cfg(tiny_dataset, run, "train.epochs=1"), progress=False)
    with pytest.raises(MagnetError, match="model.dim"):
        train_reference(tiny_cfg(tiny_dataset, run, "model.dim=8"), progress=False)


@pytest.mark.parametrize(
    "ablation",
    [
        ["model.variant=lightgcn"],
        ["model.variant=lightgcn", "model.content_channels=false"],
        ["model.content_view=false"],
        ["model.use_moe=false"],
        ["model.templates=false"],
        ["routing.two_stage=false"],
        ["moe.families=[dominant]", "moe.top_k=1"],
        ["moe.experts_per_template=2", "moe.capacity_factor=1.0"],
    ],
)
def test_ablations_beat_popularity(ablation_dataset, tmp_path, ablation):
    """Every variant must rank better than the most-popular-items list on the same test split
    (random ranking would pass ``recall > 0``; popularity is the floor that means learning).
    Before the MoE grouped each user's tokens, the capacity variant fell to 0.155 < 0.206.

    The mean of three seeds is held to the floor: one 10-epoch run on this data varies by
    about +-0.02 between seeds (the single-stage variant: 0.204-0.253 over five), so one seed's
    value would follow the rounding of the day rather than the variant."""
    data, popular = ablation_dataset
    runs = [
        train_reference(
            tiny_cfg(
                data,
                tmp_path / str(seed),
                "train.epochs=10",
                "train.lr=0.01",
                f"train.seed={seed}",
                *ablation,
            ),
            progress=False,
        )
        for seed in (2024, 2025, 2026)
    ]
    for key in ("test.recall@20", "test.ndcg@20"):
        mean = sum(m[key] for m in runs) / len(runs)
        assert mean > popular[key] + 0.01, (key, [round(m[key], 4) for m in runs])


def test_mf_beats_popularity(ablation_dataset, tmp_path):
    """BPR-MF (ID embeddings only: no propagation, no content) on the ablation data, same budget
    as the ablations. Measured: test Recall@20 0.2137 vs popularity's 0.2056, NDCG@20 0.1336 vs
    0.1101 (best epoch 8 of 10; 30 epochs select the same one). With 40 interactions per user
    over 600 items and no neighbourhood to smooth them, MF only just clears popularity on recall
    (ID-only LightGCN: 0.2255), so recall is held to "above" and NDCG to the ablations' margin."""
    data, popular = ablation_dataset
    m = train_reference(
        tiny_cfg(data, tmp_path, "train.epochs=10", "train.lr=0.01", "model.variant=mf"),
        progress=False,
    )
    assert m["test.recall@20"] > popular["test.recall@20"]
    assert m["test.ndcg@20"] > popular["test.ndcg@20"] + 0.01


@pytest.fixture(scope="module")
def ablation_dataset(tmp_path_factory):
    """Synthetic data with more items than the tiny set (popularity alone gets test Recall@20
    0.21 here, 0.51 on the tiny set, where 20 interactions per user cover 1/6 of the items)."""
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.data.prepare import prepare_dataset
    from magnet_dist.eval.scoring import SplitEvaluator, popularity_score_fn
    from magnet_dist.train.pipeline import ensure_content_edges

    out = tmp_path_factory.mktemp("ablation") / "data"
    prepare_dataset("synthetic", out, users=300, items=600, interactions=12000, seed=7, quiet=True)
    ensure_content_edges(load_config(overrides=[f"data.path={out}"]), quiet=True)
    ds = load_dataset(out)
    test = SplitEvaluator(ds, 2, [10, 20], 1024, 65536)
    popular = test.sums(popularity_score_fn(ds)).metrics("test")
    assert 0.15 < popular["test.recall@20"] < 0.25  # the floor the variants are held to
    return out, popular


def test_id_only_model_ignores_content_and_needs_no_moe(tiny_dataset, tmp_path):
    """model.content_channels=false: one channel (behaviour), no content projections, so the
    score is the classic LightGCN dot product; with the MoE on it is a config error."""
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.model.magnet import MagnetModel

    cfg = tiny_cfg(tiny_dataset, tmp_path, "model.variant=lightgcn", "model.content_channels=false")
    model = MagnetModel(cfg, dict(load_dataset(tiny_dataset).modalities))
    assert model.modalities == ["behaviour"] and len(model.encoder.projections) == 0
    with pytest.raises(MagnetError, match="content_channels"):
        tiny_cfg(tiny_dataset, tmp_path, "model.content_channels=false")


def test_mf_scores_are_the_dot_product_of_the_raw_embeddings(tiny_dataset, tmp_path):
    """model.variant=mf is BPR-MF: no propagation, no content, no MoE. On its trained (best)
    checkpoint, every score is <e_u, e_i> of the ID embedding table, and the reported test
    metrics are those of ranking by that dot product alone."""
    from magnet_dist.data.dataset import load_dataset
    from magnet_dist.eval.scoring import SplitEvaluator, ranking_score_fn
    from magnet_dist.train.checkpoint import load_checkpoint
    from magnet_dist.train.reference import FullGraph, build_model, init_id_embeddings

    cfg = tiny_cfg(tiny_dataset, tmp_path, "model.variant=mf", "model.layers=2")
    m = cfg.model  # the variant overrides the component keys, fanouts included
    assert (m.layers, m.content_view, m.use_moe, m.content_channels) == (0, False, False, False)
    assert cfg.train.fanouts == []
    metrics = train_reference(cfg, progress=False)
    assert not (tmp_path / "experts.json").exists()

    ds = load_dataset(tiny_dataset)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt", cfg)
    model = build_model(cfg, ds)
    model.load_state_dict(best["model"])
    model.eval()
    assert model.modalities == ["behaviour"] and model.moe is None
    assert len(model.encoder.projections) == 0
    table = best["embeddings"]["weight"]
    start = init_id_embeddings(ds.num_users + ds.num_items, cfg.model.dim, cfg.train.seed)
    assert not torch.allclose(table, start.weight)  # it trained
    users, items = table[: ds.num_users], table[ds.num_users :]
    with torch.no_grad():
        reps = FullGraph(ds, cfg).encode(model, table)
        assert torch.equal(reps["behaviour"], table)  # layer 0 only: nothing propagated
        u = torch.arange(ds.num_users).repeat_interleave(7)
        i = torch.randint(0, ds.num_items, (u.numel(),), generator=torch.Generator().manual_seed(0))
        y, stats = model.score({"behaviour": users[u]}, {"behaviour": items[i]})
        assert stats is None
        torch.testing.assert_close(y, (users[u] * items[i]).sum(1))
        rank = ranking_score_fn(model, {"behaviour": users}, {"behaviour": items})
        torch.testing.assert_close(rank(torch.arange(5), 0, ds.num_items), users[:5] @ items.T)
    test = SplitEvaluator(ds, 2, cfg.eval.ks, cfg.eval.user_chunk, cfg.eval.item_chunk)
    dot = test.sums(lambda uid, a, b: users[uid] @ items[a:b].T).metrics("test")
    assert metrics["test.recall@20"] == pytest.approx(dot["test.recall@20"], abs=1e-9)
    assert metrics["test.ndcg@20"] == pytest.approx(dot["test.ndcg@20"], abs=1e-9)


def test_cli_train_prints_metrics(tiny_dataset, tmp_path, capsys):
    rc = cli_main(
        [
            "train",
            "--quiet",
            f"data.path={tiny_dataset}",
            f"train.run_dir={tmp_path}/r",
            "train.epochs=1",
            "model.dim=8",
        ]
    )
    assert rc == 0
    assert '"test.recall@20"' in capsys.readouterr().out


def test_early_stopping_unit():
    from magnet_dist.train.common import EarlyStopping

    stop = EarlyStopping(patience=2)
    assert stop.update(0, 0.10, {"h_load": 0.5}) and stop.best_epoch == 0
    assert not stop.update(1, 0.10)  # equal is not better
    assert not stop.should_stop
    assert stop.update(3, 0.12, {"h_load": 0.7}) and stop.bad_evals == 0
    assert not stop.update(5, 0.11) and not stop.should_stop
    assert not stop.update(7, 0.05) and stop.should_stop
    assert (stop.best, stop.best_epoch, stop.best_info) == (0.12, 3, {"h_load": 0.7})
    again = EarlyStopping(patience=2)
    again.load_state_dict(stop.state_dict())
    assert again.state_dict() == stop.state_dict() and again.should_stop


@pytest.mark.parametrize("eval_every", [1, 2])
def test_patience_stops_early_and_selects_the_best_validation_epoch(
    tiny_dataset, tmp_path, eval_every
):
    """lr 0.01 peaks on the tiny data within a few epochs: patience 2 ends a 30-epoch run, and
    the reported model is the evaluated epoch with the highest validation Recall@20."""
    cfg = tiny_cfg(
        tiny_dataset,
        tmp_path,
        "train.epochs=30",
        "train.lr=0.01",
        "train.patience=2",
        f"train.eval_every={eval_every}",
    )
    metrics = train_reference(cfg, progress=False)
    with (tmp_path / "evaluations.csv").open() as f:
        evals = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in evals]
    valid = [float(r["valid.recall@20"]) for r in evals]
    assert epochs == list(range(eval_every - 1, epochs[-1] + 1, eval_every))  # the cadence
    assert epochs[-1] < 29  # stopped early
    best = valid.index(max(valid))  # the first epoch reaching the maximum
    assert metrics["best_epoch"] == epochs[best]
    assert len(evals) == best + 1 + 2  # stopped after exactly `patience` evaluations without gain
    # the final numbers are the best checkpoint's, re-evaluated
    assert metrics["valid.recall@20"] == pytest.approx(max(valid), abs=1e-12)
    # and no epoch trained after the one that triggered the stop
    from magnet_dist.data.dataset import load_dataset

    per_epoch = -(-len(load_dataset(tiny_dataset).pairs(0)[0]) // 512)
    assert metrics["steps"] == (epochs[-1] + 1) * per_epoch == len(read_steps(tmp_path))
