"""Where a worker's training step spends its time, part by part, on every rank.

A step of the distributed trainer alternates local work (sampling RPCs, the forward and
backward) with collectives that wait for the slowest rank. The pairs/s figure alone cannot say
which one a second worker pays for; the per-rank parts can: a part that grows on one rank and
not the other is imbalance, a collective that grows everywhere is waiting.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any


class StepClock:
    """Exclusive seconds per named part, summed over steps: time spent in a part nested inside
    another counts for the inner part only, so the parts of a step add up to the step.

    Wall seconds and this process's CPU seconds (all its threads) are both kept: a part whose
    CPU is far below its wall time waits (an RPC, a collective); one whose CPU is near or above
    it works, or spins while it waits."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._inner: list[tuple[float, float]] = []  # per open part: (wall, cpu) of nested parts

    @contextmanager
    def part(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        self._inner.append((0.0, 0.0))
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            inner_wall, inner_cpu = self._inner.pop()
            self.seconds[name] += wall - inner_wall
            self.cpu_seconds[name] += cpu - inner_cpu
            if self._inner:
                w, c = self._inner[-1]
                self._inner[-1] = (w + wall, c + cpu)

    def timed(self, name: str, fn):
        """``fn`` with each call counted as part ``name``."""

        def wrapper(*args: Any, **kwargs: Any):
            with self.part(name):
                return fn(*args, **kwargs)

        return wrapper

    def means(self, cpu: bool = False) -> dict[str, float]:
        """Mean wall (or, with ``cpu``, CPU) seconds per step of each part, and their sum
        (``total``)."""
        n = max(self.steps, 1)
        seconds = self.cpu_seconds if cpu else self.seconds
        out = {k: round(v / n, 4) for k, v in sorted(seconds.items())}
        out["total"] = round(sum(seconds.values()) / n, 4)
        return out


@contextmanager
def maybe_part(clock: StepClock | None, name: str):
    """``clock.part(name)``, or nothing without a clock (the reference and test callers)."""
    if clock is None:
        yield
    else:
        with clock.part(name):
            yield
