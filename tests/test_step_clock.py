"""The per-part step clock and the one end-of-step collective of the distributed trainer."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from magnet_dist.train.step_clock import StepClock, maybe_part


def test_parts_are_exclusive_and_add_up_to_the_step():
    # bounds that hold however late a loaded machine wakes a sleeper: a sleep lasts at least its
    # length, and the nested part (0.25 s) is far longer than its parent's own time (0.05 s), so
    # counting it in "forward" too would show whatever the load
    clock = StepClock()
    steps = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        with clock.part("forward"):
            time.sleep(0.05)
            with clock.part("sampling"):
                time.sleep(0.25)
            clock.timed("collective", time.sleep)(0.01)
        with maybe_part(clock, "backward"):
            time.sleep(0.01)
        with maybe_part(None, "not counted"):
            time.sleep(0.2)
        clock.steps += 1
        steps += time.perf_counter() - t0
    means = clock.means()
    assert set(means) == {"forward", "sampling", "collective", "backward", "total"}
    assert means["sampling"] >= 0.25 and means["collective"] >= 0.01 and means["backward"] >= 0.01
    # the nested parts are not counted in "forward" a second time
    assert 0.05 <= means["forward"] < 0.05 + 0.25
    assert means["total"] == pytest.approx(
        sum(v for k, v in means.items() if k != "total"), abs=1e-3
    )
    # the uncounted part (at least 0.2 s a step) is not in it
    assert sum(clock.seconds.values()) <= steps - 2 * 0.2


def test_cpu_seconds_tell_waiting_from_working():
    clock = StepClock()
    with clock.part("waiting"):
        time.sleep(0.2)
    with clock.part("working"):
        c0 = time.process_time()  # work until 0.2 CPU seconds are spent, however long it takes
        while time.process_time() - c0 < 0.2:
            pass
    clock.steps = 1
    wall, cpu = clock.means(), clock.means(cpu=True)
    # CPU seconds are the whole process's: a quarter of a core for other threads is tolerated
    assert wall["waiting"] >= 0.2 and cpu["waiting"] < 0.05
    assert cpu["working"] >= 0.2 and wall["working"] >= 0.2
    assert cpu["total"] == pytest.approx(cpu["waiting"] + cpu["working"], abs=1e-3)


# Each rank ends with os._exit once its answer is flushed. torch 2.2's destroy_process_group can
# deadlock right after a collective: ProcessGroupGloo's destructor joins gloo's worker thread while
# holding the GIL, which that thread needs to free the last collective's tensors
# (pytorch/pytorch#154976; 3 hangs in 30 runs here under load, a barrier before it did not help).
# The test is about sync_step, not teardown; the same ending as tests/test_checkpoint_cadence.py.
SYNC_SCRIPT = """
import os, sys, torch.distributed as dist
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
os._exit(0)
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
