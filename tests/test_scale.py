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
        "2,2@128",
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
        "sweep_2-2_b128",
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
    sweep = by["sweep_2-2_b128"]
    assert sweep["fanouts"] == [2, 2] and sweep["batch_size"] == 128
    # fewer neighbours and seeds than the profile stage: fewer sampled input nodes
    assert (
        0
        < sweep["sampled_per_step"]["input_nodes"]
        < by["profile"]["sampled_per_step"]["input_nodes"]
    )
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
    assert "| [2, 2] | 128 |" in md  # the sweep table
