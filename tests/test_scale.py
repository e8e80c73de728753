"""launch/scale.py end to end on a tiny synthetic dataset: every stage runs (prepare, content
edges, partitions, 2-worker distributed training, step profile, two-stage + exact
evaluation) and results.json / results.md have the documented shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "scale.py"


def test_quick_scale_benchmark_schema(tmp_path):
    out = tmp_path / "scale"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--users",
        "3000",
        "--items",
        "600",
        "--interactions",
        "30000",
        "--steps",
        "3",
        "--profile-steps",
        "2",
        "--two-stage-users",
        "200",
        "--exact-users",
        "50",
        "--candidates",
        "50",
        "--workers",
        "2",
        "--partition-method",
        "random",
        "--sweep",
        "2,2@128+train.history=false 2@128+train.history=true",
        "--out",
        str(out),
        "train.batch_size=256",
        "graph.recall_sample=100",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1
    assert results["machine"]["cores"] >= 1 and results["machine"]["memory_gb"] > 0
    assert results["size"] == {"users": 3000, "items": 600, "interactions": 30000}
    names = [s["stage"] for s in results["stages"]]
    assert names == [
        "prepare",
        "content",
        "partition_1",
        "partition_2",
        "train_w2",
        "profile",
        "sweep_2-2_b128_train.history=false",
        "sweep_2_b128_train.history=true",
        "evaluate",
    ]
    for s in results["stages"]:
        assert s["status"] == "ok", s
        for key in ("stage", "status", "wall_s", "peak_rss_gb", "peak_processes", "throughput"):
            assert key in s, (s["stage"], key)
        assert s["wall_s"] > 0 and s["peak_rss_gb"] > 0 and s["peak_processes"] >= 1
        assert s["throughput"] and all(v > 0 for v in s["throughput"].values()), s
    by = {s["stage"]: s for s in results["stages"]}
    # Ray's processes, the workers and the DGL servers are all in the sampled tree
    assert by["train_w2"]["peak_processes"] > by["prepare"]["peak_processes"]
    assert by["train_w2"]["workers"] == 2 and by["train_w2"]["steps"] == 3
    # every rank's step, part by part: the parts add up to the step the throughput counts
    parts = by["train_w2"]["step_parts"]
    assert len(parts) == 2
    wanted = {"negatives", "sampling", "forward", "backward", "sparse_optimizer", "step_sync"}
    for rank in parts:
        assert wanted <= rank["wall"].keys() and rank["wall"].keys() == rank["cpu"].keys()
        named = sum(v for k, v in rank["wall"].items() if k != "total")
        assert named == pytest.approx(rank["wall"]["total"], abs=2e-3)
    split = by["profile"]["step_split_s"]
    for key in (
        "total",
        "sampling",
        "feature_fetch",
        "embedding_fetch",
        "compute",
        "communication",
    ):
        assert key in split
    sweep = by["sweep_2-2_b128_train.history=false"]  # the exact 2-hop path
    assert sweep["fanouts"] == [2, 2] and sweep["batch_size"] == 128
    # the history lever: one sampled hop (same fanout and seeds), after one refresh of the
    # table: fewer sampled input nodes and edges than the two hops
    lever = by["sweep_2_b128_train.history=true"]
    assert lever["levers"] == ["train.history=true"] and lever["fanouts"] == [2]
    assert lever["setup"]["history_refresh_s"] > 0
    for key in ("input_nodes", "edges"):
        assert 0 < lever["sampled_per_step"][key] < sweep["sampled_per_step"][key], key
    # the configured path (synthetic-1m.yaml: history, fanout 5, batch 256 here) profiled too
    assert by["profile"]["fanouts"] == [5] and by["profile"]["setup"]["history_refresh_s"] > 0
    m = by["evaluate"]["metrics"]
    for key in (
        "test.two_stage.recall@20",
        "test.two_stage_sample.recall@20",
        "test.exact_sample.recall@20",
        "retrieval_recall@50",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    targets = {t["target"] for t in results["summary"]["targets"]}
    assert ">= 10,000 pairs/s with 2 workers" in targets
    assert "peak memory <= 16 GB every stage" in targets
    md = (out / "results.md").read_text()
    assert "| stage |" in md and "train_w2" in md and "Command:" in md
    assert "| [2, 2] | 128 | train.history=false |" in md  # the sweep table
    assert "| [2] | 128 | train.history=true |" in md


def _fixed_results():
    def stage(name, wall, rss, pss, procs, throughput, **extra):
        return {
            "stage": name,
            "status": "ok",
            "wall_s": wall,
            "peak_rss_gb": rss,
            "peak_pss_gb": pss,
            "peak_processes": procs,
            "throughput": throughput,
            **extra,
        }

    def without_pss(record):  # a record written before PSS was sampled
        del record["peak_pss_gb"]
        return record

    split = {
        "total": 0.5,
        "negative_sampling": 0.01,
        "sampling": 0.2,
        "feature_fetch": 0.05,
        "embedding_fetch": 0.04,
        "compute": 0.15,
        "communication": 0.05,
    }
    return {
        "schema_version": 1,
        "command": "python launch/scale.py --quick",
        "machine": {"cores": 2, "memory_gb": 24.0, "load_average_at_start": [0.5, 0.4, 0.3]},
        "size": {"users": 50_000, "items": 10_000, "interactions": 1_000_000},
        "finished_at": "2026-01-01T00:00:00Z",
        "stages": [
            stage("prepare", 100.0, 1.0, 0.9, 1, {"interactions_per_s": 10_000.0}, reused=True),
            stage("content", 200.0, 2.0, 1.5, 1, {"items_per_s": 100.0}),
            stage("partition_2", 300.0, 3.0, 2.5, 1, {"edges_per_s": 5000.0}),
            stage("train_w1", 60.0, 6.0, 5.0, 9, {"pairs_per_s": 6000.0}, workers=1),
            stage(
                "train_w2",
                60.0,
                20.0,
                17.0,
                14,
                {"pairs_per_s": 11_000.0},
                workers=2,
                step_parts=[
                    {
                        "wall": {"sampling": 0.5, "step_sync": 0.25, "total": 0.75},
                        "cpu": {"sampling": 0.125, "step_sync": 0.0, "total": 0.125},
                    },
                    {
                        "wall": {"sampling": 0.625, "step_sync": 0.125, "total": 0.75},
                        "cpu": {"sampling": 0.25, "step_sync": 0.0, "total": 0.25},
                    },
                ],
            ),
            stage(
                "profile",
                30.0,
                4.0,
                3.0,
                1,
                {"pairs_per_s": 2048.0},
                batch_size=1024,
                fanouts=[10, 10],
                steps_measured=3,
                step_split_s=split,
                step_split_share={k: v / 0.5 for k, v in split.items() if k != "total"},
                sampled_per_step={"input_nodes": 12_345, "edges": 67_890},
            ),
            without_pss(
                stage(
                    "sweep_2-2_b128",
                    20.0,
                    3.0,
                    None,
                    1,
                    {"pairs_per_s": 1280.0},
                    batch_size=128,
                    fanouts=[2, 2],
                    steps_measured=3,
                    step_split_s={**split, "total": 0.1},
                    step_split_share={},
                    sampled_per_step={"input_nodes": 500, "edges": 900},
                )
            ),
            stage(
                "evaluate",
                40.0,
                5.0,
                4.0,
                1,
                {"two_stage_users_per_s": 50.0},
                two_stage_users=2000,
                candidates=200,
                exact_users=200,
                metrics={"test.two_stage.recall@20": 0.12345},
            ),
        ],
    }


def test_summarise_and_markdown_of_fixed_results():
    """The targets and tables of a fixed results dict (no processes)."""
    from magnet_dist.bench.scale_report import markdown, summarise

    results = _fixed_results()
    summary = summarise(results)
    assert summary["pairs_per_s"] == {1: 6000.0, 2: 11_000.0}
    assert summary["targets"] == [
        {"target": "prepare + content + partition <= 900 s", "value": "600 s", "met": True},
        {
            "target": "peak memory <= 16 GB every stage",
            "value": "17.00 GB PSS sum (RSS sum 20.00 GB)",
            "met": False,
        },
        {
            "target": ">= 10,000 pairs/s with 2 workers",
            "value": "11,000 pairs/s (5,500 per core)",
            "met": True,
        },
        {"target": "2 workers >= 1.7x 1 worker", "value": "1.83x", "met": True},
    ]
    results["summary"] = summary
    md = markdown(results)
    lines = md.splitlines()
    assert lines[0] == (
        "Synthetic 50,000 users / 10,000 items / 1,000,000 interactions (visual 128-d, text "
        "384-d); machine: 2 cores, 24.0 GB RAM, load average at start [0.5, 0.4, 0.3]; "
        "2026-01-01T00:00:00Z."
    )
    assert "Command: `python launch/scale.py --quick`" in lines
    assert "| prepare (reused) | ok | 100.0 | 1.00 | 0.90 | 1 | 10,000 interactions/s |" in lines
    assert "| train_w2 | ok | 60.0 | 20.00 | 17.00 | 14 | 11,000 pairs/s |" in lines
    assert "| sweep_2-2_b128 | ok | 20.0 | 3.00 | n/a | 1 | 1,280 pairs/s |" in lines
    assert "| 2 workers >= 1.7x 1 worker | 1.83x | True |" in lines
    # the per-rank step parts: wall seconds, CPU seconds in brackets, one column per rank
    assert "| part | train_w2 rank 0 | train_w2 rank 1 |" in lines
    assert "| sampling | 0.500 (0.125) | 0.625 (0.250) |" in lines
    assert "| total | 0.750 (0.125) | 0.750 (0.250) |" in lines
    assert "| peak memory <= 16 GB every stage | 17.00 GB PSS sum (RSS sum 20.00 GB) | False |" in (
        lines
    )
    assert (
        "One training step (profile stage: 1 client, 1 partition, batch 1024, mean of 3 steps):"
        in lines
    )
    assert "| sampling | 0.200 | 40% |" in lines and "| total | 0.500 | 100% |" in lines
    assert "| [10, 10] | 1024 | - | 12,345 | 67,890 | 0.50 | 0.20 | 0.15 | 0.05 | 2,048 |" in lines
    assert "| [2, 2] | 128 | - | 500 | 900 | 0.10 | 0.20 | 0.15 | 0.05 | 1,280 |" in lines
    assert (
        "Evaluation (test split; two-stage on 2,000 sampled users with N=200; exact full "
        "ranking on 200 of them):" in lines
    )
    assert "| test.two_stage.recall@20 | 0.1235 |" in lines
    assert md.endswith("| test.two_stage.recall@20 | 0.1235 |\n")


def test_skipped_stages_with_built_output_are_carried_not_dropped(tmp_path):
    """``--reuse --skip prepare,content,partition``: the built stages stay in the plan as
    carried entries (their earlier records are kept in results.json; a run that dropped them
    lost the partition rows and the build-time target of every later report)."""
    from magnet_dist.bench.scale import parse_args, plan

    args = parse_args(["--quick", "--reuse", "--skip", "prepare,content,partition,evaluate"])
    stages = plan(args, tmp_path, tmp_path / "data", [])
    by_name = {s.name: s for s in stages}
    for name in ("prepare", "content", "partition_1", "partition_2"):
        assert by_name[name].params is None and by_name[name].reuse is not None, name
    assert by_name["partition_2"].reuse == tmp_path / "data" / "partitions-2-metis" / (
        "magnet_partition.json"
    )
    assert [s.name for s in stages if s.params is not None] == ["train_w1", "train_w2", "profile"]


def test_reused_stage_carries_the_record_kept_beside_its_output(tmp_path):
    """A reused stage's record comes from the last results.json, else from the file its own
    run left beside the output; with neither, nothing is invented."""
    from magnet_dist.bench.scale import Stage, carried_record, record_file

    folder = tmp_path / "partitions-2-metis"
    folder.mkdir()
    stage = Stage("partition_2", None, "partition", reuse=folder / "magnet_partition.json")
    assert record_file(stage).parent == folder
    assert carried_record(stage, {}) is None
    record_file(stage).write_text(json.dumps({"stage": "partition_2", "wall_s": 84.5}))
    assert carried_record(stage, {}) == {"stage": "partition_2", "wall_s": 84.5, "reused": True}
    newer = {"partition_2": {"stage": "partition_2", "wall_s": 80.0}}
    assert carried_record(stage, newer)["wall_s"] == 80.0


def test_time_to_quality_paths_and_summary():
    from magnet_dist.bench.time_to_quality import METRIC, parse_path, summarise

    p = parse_path("history:100:train.history=true train.fanouts=[10]")
    assert p == {
        "name": "history",
        "steps": 100,
        "overrides": ["train.history=true", "train.fanouts=[10]"],
    }
    assert parse_path("today:40:")["overrides"] == []
    for bad in ("today", "today:0:", ":3:", "today:x:"):
        with pytest.raises(SystemExit, match="NAME:STEPS:OVERRIDES"):
            parse_path(bad)
    rows = [
        {"path": "today", "train_seconds": 100.0, METRIC: 0.010},
        {"path": "today", "train_seconds": 200.0, METRIC: 0.020},
        {"path": "new", "train_seconds": 50.0, METRIC: 0.015},
        {"path": "new", "train_seconds": 90.0, METRIC: 0.021},
        {"path": "slow", "train_seconds": 90.0, METRIC: 0.019},
    ]
    s = summarise(rows, ["today", "new", "slow"])
    # today's final metric (0.020), first reached by "new" at 90 s, never by "slow"
    assert s == {
        "target_path": "today",
        "target": 0.020,
        "reached": {"today": 200.0, "new": 90.0, "slow": None},
    }


@pytest.mark.integration
def test_time_to_quality_end_to_end(tiny_dataset, tmp_path):
    """Two training paths on real Ray workers and DGL servers, a snapshot per epoch, each
    evaluated on validation (two-stage, sampled users): rows, summary, table and plot."""
    from magnet_dist.bench.time_to_quality import METRIC, main
    from magnet_dist.graph.partition import partition_dataset

    parts = partition_dataset(tiny_dataset, 2, method="random", out_dir=tmp_path / "p2")
    common = "train.batch_size=256 model.dim=16 eval.candidates=50 graph.partition_method=random"
    results = main(
        [
            "--data",
            str(tiny_dataset),
            "--partitions",
            str(parts.parent),
            "--out",
            str(tmp_path / "ttq"),
            "--snapshots",
            "2",
            "--users",
            "60",
            "--candidates",
            "50",
            "--path",
            f"exact:3:train.history=false train.fanouts=[10,10] {common}",
            "--path",
            f"history:3:train.fanouts=[5] train.history_refresh_steps=2 {common}",
        ]
    )
    rows = results["rows"]
    assert [(r["path"], r["epoch"], r["step"]) for r in rows] == [
        ("exact", 0, 3),
        ("exact", 1, 6),
        ("history", 0, 3),
        ("history", 1, 6),
    ]
    for name in ("exact", "history"):
        mine = [r for r in rows if r["path"] == name]
        assert 0 < mine[0]["train_seconds"] < mine[1]["train_seconds"]
        assert mine[1]["pairs"] == 2 * mine[0]["pairs"] > 0
    assert all(0.0 <= r[METRIC] <= 1.0 and r["eval_status"] == "ok" for r in rows)
    assert results["summary"]["target_path"] == "exact"
    # the first path reaches its own final metric at its first snapshot that scores as high
    # (the last one, or an earlier one when a tiny run's metric does not rise)
    target = rows[1][METRIC]
    first_hit = next(r for r in rows[:2] if r[METRIC] >= target)
    assert results["summary"]["target"] == target
    assert results["summary"]["reached"]["exact"] == first_hit["train_seconds"]
    out = tmp_path / "ttq"
    assert (out / "time_to_quality.png").stat().st_size > 0
    assert "| history |" in (out / "results.md").read_text()
