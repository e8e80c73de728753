"""When the distributed worker writes a mid-epoch checkpoint (``checkpoint_due``): every
``train.checkpoint_every_steps`` steps, or after ``train.checkpoint_every_minutes`` of wall
clock, decided by rank 0's clock for every rank (real gloo process group, two processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch.distributed as dist

from magnet_dist.train.worker_checkpoint import checkpoint_due

# One rank of a real 2-process gloo group. The process ends with os._exit once its answers are
# written: a spawned torch.distributed child can hang at interpreter exit inside a full pytest
# run (seen here with torch.multiprocessing.spawn: both answers written, one rank never exited).
RANK_SCRIPT = """
import json, os, sys, time
import torch.distributed as dist
from magnet_dist.train.worker_checkpoint import checkpoint_due
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
now = time.monotonic()
stale, fresh = now - 600.0, now  # a checkpoint 10 minutes ago / just now
answers = {
    # rank 0's last checkpoint is 10 minutes old: every rank checkpoints, rank 1 too
    "rank0_late": checkpoint_due(7, 0, 5.0, stale if rank == 0 else fresh),
    # only rank 1's clock says late: nobody checkpoints (rank 0 decides)
    "rank1_late": checkpoint_due(7, 0, 5.0, fresh if rank == 0 else stale),
    # the step interval still applies alongside the clock
    "step_due": checkpoint_due(8, 4, 5.0, fresh),
}
with open(f"{out}.{rank}", "w") as f:
    json.dump(answers, f)
os._exit(0)
"""


def test_every_rank_takes_rank_zeros_wall_clock_decision(tmp_path):
    out = str(tmp_path / "answers")
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), str(tmp_path / "store"), out])
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0]
    answers = [json.loads((tmp_path / f"answers.{r}").read_text()) for r in range(2)]
    assert answers[0] == answers[1] == {"rank0_late": True, "rank1_late": False, "step_due": True}


def test_step_interval_without_a_clock_needs_no_process_group():
    assert not dist.is_initialized()
    assert [s for s in range(1, 13) if checkpoint_due(s, 4, 0.0, 0.0)] == [4, 8, 12]
    assert not any(checkpoint_due(s, 0, 0.0, 0.0) for s in range(1, 13))  # both off
