"""Faults injected on purpose by the fault-tolerance tests (``MAGNET_FAULT_*``; no effect
unless ``MAGNET_ENABLE_FAULT_HOOKS=1``)."""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_SETTLE_S = 5.0
FAULT_HOOKS_ENABLE = "MAGNET_ENABLE_FAULT_HOOKS"
FAULT_HOOKS = tuple(
    f"MAGNET_FAULT_{hook}"
    for hook in ("KILL_AT_STEP", "KILL_IN_CHECKPOINT", "KILL_SERVER_AT_STEP", "MARKER")
)


def fault_hooks_from(env, warn: bool = True) -> dict[str, str]:
    """The fault hooks of ``env`` (with their enable) when ``MAGNET_ENABLE_FAULT_HOOKS=1``;
    otherwise none, with a warning if some are set (what the driver forwards to workers)."""
    hooks = {k: env[k] for k in FAULT_HOOKS if env.get(k)}
    if env.get(FAULT_HOOKS_ENABLE) == "1":
        return {**hooks, FAULT_HOOKS_ENABLE: "1"} if hooks else {}
    if hooks and warn:
        print(
            f"magnet_dist: warning: ignoring {', '.join(sorted(hooks))}: fault-injection test "
            f"hooks work only with {FAULT_HOOKS_ENABLE}=1 (tests set it; never in production)",
            file=sys.stderr,
            flush=True,
        )
    return {}


class FaultHooks:
    """Faults injected on purpose, for the fault-tolerance tests (no effect unless set).

    Honoured only with ``MAGNET_ENABLE_FAULT_HOOKS=1`` (which only the tests set), so a
    production environment cannot make a worker kill itself (:func:`fault_hooks_from`).
    Read from ``MAGNET_FAULT_*`` variables (the driver forwards its own to the workers); a
    value is ``STEP`` or ``STEP@WHO`` (WHO: a rank, or for the server hook a partition;
    default 0):

    - ``MAGNET_FAULT_KILL_AT_STEP``: that rank SIGKILLs itself right after training step STEP
      (before a checkpoint of that step);
    - ``MAGNET_FAULT_KILL_IN_CHECKPOINT``: that rank SIGKILLs itself while the checkpoint of
      step STEP is being written (its files are on disk, ``ray.train.report`` has not
      registered it);
    - ``MAGNET_FAULT_KILL_SERVER_AT_STEP``: the worker that started that partition's graph
      server SIGKILLs the server after step STEP, then waits for its server watcher.

    ``MAGNET_FAULT_MARKER=PATH``: a hook fires only if ``PATH.<hook>`` does not exist, and
    creates it first, so the restarted workers run on undisturbed.
    """

    def __init__(self, env: dict[str, str], rank: int, part: int) -> None:
        self.env = fault_hooks_from(env, warn=False)
        self.rank, self.part = rank, part

    def _due(self, hook: str, step: int, mine: int) -> bool:
        value = self.env.get(f"MAGNET_FAULT_{hook}")
        if not value:
            return False
        at, _, who = value.partition("@")
        if int(at) != step or int(who or 0) != mine:
            return False
        marker = self.env.get("MAGNET_FAULT_MARKER")
        if marker:
            try:
                os.close(os.open(f"{marker}.{hook.lower()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True

    def _kill_self(self, what: str) -> None:
        # Ray Train's controller collects reports by polling the workers (every 2 s); a report
        # still queued in a worker that dies is lost, and the group resumes from an older
        # checkpoint (still exact, but not the one a test means): let the last one land first
        time.sleep(FAULT_SETTLE_S)
        print(f"[fault] rank {self.rank}: SIGKILL to myself {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int, servers) -> None:
        if self._due("KILL_AT_STEP", step, self.rank):
            self._kill_self(f"after step {step}")
        if servers is not None and self._due("KILL_SERVER_AT_STEP", step, self.part):
            for pid in servers.pids.values():
                print(f"[fault] SIGKILL to graph server PID {pid} after step {step}", flush=True)
                os.kill(pid, signal.SIGKILL)
            # the server watcher ends this process within milliseconds; do not race it with
            # the next step's request to the dead server (DGL's sender aborts the process on
            # a failed send, before any cause is recorded: seen once in CI)
            time.sleep(FAULT_SETTLE_S)

    def in_checkpoint(self, step: int) -> None:
        if self._due("KILL_IN_CHECKPOINT", step, self.rank):
            self._kill_self(f"while writing the checkpoint of step {step}")
