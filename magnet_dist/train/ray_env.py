"""The environment Ray and DGL read, set by the driver and the workers (a leaf: no project
imports, so every layer of ``train/`` may use it)."""

from __future__ import annotations

import os


def keep_ray_on_loopback() -> None:
    """Ray otherwise rewrites 127.0.0.1 to the machine's network address, even for an embedded
    cluster (internal flag, read when ray is imported; re-check on Ray upgrades). Ray's own
    processes read the variable; where this process imported ray already (a user's program, a
    test module before it), the constant Ray read then is set as well."""
    import sys

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False


# Ray's core worker SIGKILLs its child processes while it ends itself, with its threads still
# running: when Ray tears a worker group down (another worker failed, or a restart), the
# graph-server watcher of each healthy worker then saw its server die and recorded a "dead
# graph server" that was only the teardown (a CI run's failures.log blamed partition 1 after
# Ray had ended rank 1 because rank 0 died). The workers stop their servers themselves
# (ServerGroup.stop; each server exits within a second of its parent's death), so a server's
# death is only ever a real one: Ray's kill is switched off for this job's workers.
RAY_WORKER_ENV = {"RAY_kill_child_processes_on_worker_exit": "0"}


def ray_worker_env_as_seen() -> dict[str, str | None]:
    """The variables of :data:`RAY_WORKER_ENV` as this process got them (in a worker: the
    job's runtime_env, merged with that of ``ray job submit``)."""
    return {k: os.environ.get(k) for k in RAY_WORKER_ENV}


# DGL picks its tensor backend when it is first imported
os.environ.setdefault("DGLBACKEND", "pytorch")
