"""The per-part step clock and the one end-of-step collective of the distributed trainer."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from magnet_dist.train.step_clock import StepClock, maybe_part


def test_parts_are_exclusive_and_add_up_to_the_step():
    clock = StepClock()
    for _ in range(2):
        t0 = time.perf_counter()
        with clock.part("forward"):
            time.sleep(0.02)
            with clock.part("sampling"):
                time.sleep(0.03)
            clock.timed("collective", time.sleep)(0.01)
        with maybe_part(clock, "backward"):
            time.sleep(0.01)
        with maybe_part(None, "not counted"):
            time.sleep(0.01)
        clock.steps += 1
        step = time.perf_counter() - t0
    means = clock.means()
    assert set(means) == {"forward", "sampling", "collective", "backward", "total"}
    # the nested parts are not counted in "forward" a second time
    assert means["forward"] == pytest.approx(0.02, abs=0.008)
    assert means["sampling"] == pytest.approx(0.03, abs=0.008)
    assert means["collective"] == pytest.approx(0.01, abs=0.008)
    assert means["total"] == pytest.approx(
        sum(v for k, v in means.items() if k != "total"), abs=1e-3
    )
    assert means["total"] < step  # the uncounted part is not in it


def test_cpu_seconds_tell_waiting_from_working():
    clock = StepClock()
    with clock.part("waiting"):
        time.sleep(0.05)
    with clock.part("working"):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.05:
            pass
    clock.steps = 1
    wall, cpu = clock.means(), clock.means(cpu=True)
    assert cpu["waiting"] < 0.2 * wall["waiting"]
    assert cpu["working"] > 0.5 * wall["working"]
    assert cpu["total"] == pytest.approx(cpu["waiting"] + cpu["working"], abs=1e-3)


SYNC_SCRIPT = """
import sys, torch.distributed as dist
from magnet_dist.model.schedule import ScheduleState
from magnet_dist.train.step import sync_step
rank, init, disagree = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
state = ScheduleState()
if disagree and rank == 1:
    state = ScheduleState(stage="specialisation", switch_step=40)
try:
    print("MEAN", sync_step([float(rank), 10.0 * rank], state), flush=True)
except RuntimeError as e:
    print("ERROR", e, flush=True)
dist.barrier()  # torch 2.2's gloo can hang in destroy while the peer still tears down
dist.destroy_process_group()
"""


@pytest.mark.parametrize("disagree", [False, True])
def test_sync_step_averages_and_every_rank_sees_a_disagreement(tmp_path, disagree):
    init = f"file://{tmp_path / 'init'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SYNC_SCRIPT, str(r), init, str(int(disagree))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # a rank left waiting in the collective must not outlive the test
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        if disagree:
            assert "ERROR workers disagree on the routing stage" in out
            assert "[[0.0, -1.0], [1.0, 40.0]]" in out
        else:
            assert "MEAN [0.5, 5.0]" in out
