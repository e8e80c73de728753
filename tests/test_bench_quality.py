"""launch/bench_quality.py end to end in --quick mode on the tiny synthetic dataset."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_json_and_table(bench, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "--quick",
        "--data",
        str(tiny_dataset),
        "--variants",
        "magnet,lightgcn",
        "--seeds",
        "2",
        "--out",
        str(out),
        "train.batch_size=512",
        "model.dim=16",
    ]
    result = bench.main(argv)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["finished"] is True
    assert on_disk["variants"] == ["magnet", "lightgcn"]
    assert len(on_disk["seeds"]) == 2 and on_disk["seeds"][0] != on_disk["seeds"][1]
    assert on_disk["budget"]["epochs"] == 2
    assert on_disk["content_edges"] is not None
    rows = on_disk["rows"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for v in ["magnet", "lightgcn"] for s in on_disk["seeds"]
    )
    for r in rows:
        for key in ["test.recall@20", "test.ndcg@20", "test.recall@10", "test.ndcg@10"]:
            assert 0.0 <= r[key] <= 1.0
        assert 1 <= r["best_epoch"] <= r["epochs_run"] <= 2
        assert r["train_seconds"] > 0 and r["reused"] is False
        assert (Path(r["run_dir"]) / "metrics.json").exists()
        assert (Path(r["run_dir"]) / "config.yaml").read_text().count(f"seed: {r['seed']}")
    magnet = [r for r in rows if r["variant"] == "magnet"]
    assert all(r["switch_step"] is not None for r in magnet)  # the quick budget still switches
    assert all("expert_usage" in r and len(r["expert_usage"]) == 9 for r in magnet)
    for v in ["magnet", "lightgcn"]:
        s = on_disk["summary"][v]
        assert s["seeds"] == on_disk["seeds"]
        assert set(s["test.recall@20"]) == {"mean", "std"}
    assert list(on_disk["comparisons"]) == ["lightgcn"]  # lightgcn_id did not run
    cmp_ = on_disk["comparisons"]["lightgcn"]
    assert set(cmp_["test.recall@20"]) >= {"gain", "spread", "beats", "paired_gains"}
    assert isinstance(cmp_["beats_both"], bool)  # 2 seeds a side: a verdict
    assert result["rows"] == rows

    table = (out / "results.md").read_text()
    assert "| variant | Recall@20 | NDCG@20 | Recall@10 | NDCG@10 |" in table
    assert "| magnet |" in table and "| lightgcn |" in table
    assert "| variant | Recall@20" in capsys.readouterr().out

    # A rerun with the same settings reuses the finished runs instead of training again.
    again = bench.main(argv + ["--variants", "magnet", "--seeds", "1"])
    assert [r["reused"] for r in again["rows"]] == [True]
    assert again["rows"][0]["test.recall@20"] == rows[0]["test.recall@20"]
    assert again["rows"][0]["wall_seconds"] == rows[0]["wall_seconds"]
    # MoE settings do not touch the baseline (reused) but do touch MAGNET (trained again).
    changed = bench.main(argv + ["--seeds", "1", "moe.top_k=1"])
    assert {r["variant"]: r["reused"] for r in changed["rows"]} == {
        "magnet": False,
        "lightgcn": True,
    }
    assert changed["comparisons"]["lightgcn"]["beats_both"] is None  # 1 seed a side: no verdict


def test_unknown_variant_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--variants", "magnet,nope"])


def test_every_variant_loads_and_mf_is_plain_matrix_factorisation(bench, tiny_dataset, tmp_path):
    args = bench.parse_args(["--data", str(tiny_dataset), "--out", str(tmp_path)])
    cfgs = {v: bench.run_config(args, v, 1) for v in bench.VARIANTS}  # each a valid config
    assert set(bench.BASELINES) <= set(cfgs)
    mf = cfgs["mf"]
    m = mf.model
    assert (m.layers, m.content_view, m.use_moe, m.content_channels) == (0, False, False, False)
    assert mf.train.fanouts == []
    assert cfgs["lightgcn_id"].model.layers == cfgs["magnet"].model.layers == 2


def test_grid_spec_parsing_and_points(bench):
    grid = bench.parse_grid("train.lr=1e-3,5e-3 model.layers=1,2,3")
    assert grid == [("train.lr", ["1e-3", "5e-3"]), ("model.layers", ["1", "2", "3"])]
    points = bench.grid_points(grid)
    assert len(points) == 6
    assert points[0] == {"train.lr": "1e-3", "model.layers": "1"}
    assert points[3] == {"train.lr": "5e-3", "model.layers": "1"}  # first key varies slowest
    assert bench.point_name(points[0]) == "train.lr=1e-3+model.layers=1"
    for bad in ["lr=1", "train.lr=", "train.lr=1 train.lr=2", "train.lr=1,1", "  "]:
        with pytest.raises(ValueError):
            bench.parse_grid(bad)
    with pytest.raises(SystemExit):  # the command line refuses it too
        bench.parse_args(["--grid", "train.lr"])


def test_select_point_is_the_best_validation_score_first_on_ties(bench):
    nan = float("nan")
    assert bench.select_point([0.30, 0.32, 0.31]) == 1
    assert bench.select_point([0.32, 0.30, 0.32]) == 0
    assert bench.select_point([nan, 0.1, nan]) == 1
    with pytest.raises(ValueError):
        bench.select_point([nan, nan])


def test_grid_tunes_each_variant_on_validation_then_runs_the_choice_on_every_seed(
    bench, tiny_dataset, tmp_path, monkeypatch
):
    """The grid flow with a stand-in trainer (no training): every distinct point on the first
    seed, the choice by validation (which here disagrees with test), then all seeds."""
    calls = []

    def fake_run_one(args, variant, seed, point=None):
        calls.append((variant, seed, dict(point or {})))
        lr, reg = float(point["train.lr"]), float(point["model.reg_weight"])
        layers = bench.run_config(args, variant, seed, point).model.layers
        # validation prefers lr 5e-3 and reg 1e-4 (and 1 layer); test prefers the opposite
        valid = 0.30 + (lr == 5e-3) * 0.02 + (reg == 1e-4) * 0.01 - layers * 0.001
        test = 0.40 - valid + seed * 1e-4
        return {
            "variant": variant,
            "seed": seed,
            "point": dict(point),
            "run_dir": str(tmp_path / variant / bench.point_name(point) / str(seed)),
            "valid.recall@20": valid,
            "test.recall@20": test,
            "test.ndcg@20": test / 2,
            "test.recall@10": test / 3,
            "test.ndcg@10": test / 4,
            "best_epoch": 3,
            "epochs_run": 5,
            "train_seconds": 1.0,
            "wall_seconds": 1.0,
            "reused": False,
            "code": "x",
            "switch_step": None,
        }

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    out = tmp_path / "grid"
    grid = "train.lr=1e-3,5e-3 model.reg_weight=1e-3,1e-4 model.layers=1,2"
    result = bench.main(
        ["--data", str(tiny_dataset), "--variants", "mf,lightgcn", "--seeds", "3"]
        + ["--seed-base", "10", "--out", str(out), "--grid", grid]
    )
    best = {"train.lr": "5e-3", "model.reg_weight": "1e-4", "model.layers": "1"}
    mf_grid = [c for c in calls if c[0] == "mf" and c[1] == 10 and c[2] != best]
    lgcn_grid = [c for c in calls if c[0] == "lightgcn" and c[1] == 10 and c[2] != best]
    # BPR-MF has no layers: 4 distinct points of 8 (the layers=2 copies are not trained)
    assert len(mf_grid) + 1 == 4 and len(lgcn_grid) + 1 == 8
    assert all(c[2]["model.layers"] == "1" for c in mf_grid)
    assert result["grid"]["variants"]["mf"]["distinct"] == 4
    mf_points = result["grid"]["variants"]["mf"]["points"]
    assert mf_points[1]["same_as"] == 0 and "valid.recall@20" not in mf_points[1]
    for variant in ["mf", "lightgcn"]:
        tuned = result["grid"]["variants"][variant]
        assert tuned["chosen_point"] == best  # by validation, not by test
        finals = [c for c in calls if c[0] == variant and c[2] == best]
        assert [c[1] for c in finals] == [10, 10, 11, 12]  # tuned on seed 10, then every seed
        assert [r["seed"] for r in result["rows"] if r["variant"] == variant] == [10, 11, 12]
        assert all(r["point"] == best for r in result["rows"] if r["variant"] == variant)
    assert [c[1] for c in calls if c[2] != best] == [10] * 10  # grid points: first seed only

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["grid"]["spec"][0] == ["train.lr", ["1e-3", "5e-3"]]
    assert on_disk["summary"]["mf"]["seeds"] == [10, 11, 12]
    table = (out / "results.md").read_text()
    assert "| mf | **lr=5e-3 reg_weight=1e-4 layers=1** (chosen) |" in table
    assert "same run as point 1" in table


def test_items_adds_the_ranking_among_the_listed_items(bench, tiny_dataset, tmp_path):
    import numpy as np

    from magnet_dist.errors import MagnetError
    from magnet_dist.eval.model_io import load_run
    from magnet_dist.eval.run import evaluate_run

    out = tmp_path / "bench"
    listed = tmp_path / "items.txt"
    listed.write_text("\n".join(str(i) for i in range(0, 120, 3)))
    common = ["--quick", "--data", str(tiny_dataset), "--variants", "lightgcn", "--seeds", "1"]
    result = bench.main([*common, "--out", str(out), "--items", str(listed), "model.dim=16"])
    (row,) = result["rows"]
    want = evaluate_run(load_run(row["run_dir"]), ["test"], "exact", items=np.arange(0, 120, 3))
    for key in bench.ITEM_METRICS:
        assert row[key] == pytest.approx(want[key], abs=1e-12)
        assert result["summary"]["lightgcn"][key]["mean"] == pytest.approx(want[key])
    assert row["test.on_items.recall@20"] != pytest.approx(row["test.recall@20"])
    assert result["items"] == {"file": str(listed), "count": 40, "original_ids": False}
    assert "Ranked among the 40 items of `--items" in (out / "results.md").read_text()
    # a bad list is refused before anything trains
    with pytest.raises(MagnetError, match="1 unknown item"):
        bench.main([*common, "--out", str(tmp_path / "other"), "--items", "3,500"])
    assert not (tmp_path / "other").exists()
