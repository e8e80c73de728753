"""User-facing errors: each names the input, what was wrong, and what to do.

The CLI prints them without a traceback and exits with status 2.
"""


class MagnetError(Exception):
    """Base class of every error a user can fix by changing input, config or environment."""


class DataError(MagnetError):
    """A dataset input (file, column, row) is invalid."""


class ConfigError(MagnetError, ValueError):
    """A config file or override is invalid; the message names the key path."""


FAULT_LOG_ENV = "MAGNET_FAULT_LOG"


def record_fault(message: str, kind: str = "fault") -> None:
    """Append ``message`` to the run's fault log (``$MAGNET_FAULT_LOG``, set by the distributed
    worker), so the driver can name the cause when a worker process had to end itself (a
    dead graph server, an RPC timeout) and Ray only reports that the worker died.
    ``kind="resume"`` records where a restarted worker group resumed."""
    import json
    import os
    import time

    path = os.environ.get(FAULT_LOG_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {"time": time.time(), "pid": os.getpid(), "kind": kind, "message": message}
                )
            )
            f.write("\n")
    except OSError:
        pass
