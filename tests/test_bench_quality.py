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
