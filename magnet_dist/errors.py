"""User-facing errors: each names the input, what was wrong, and what to do.

The CLI prints them without a traceback and exits with status 2.
"""


class MagnetError(Exception):
    """Base class of every error a user can fix by changing input, config or environment."""


class DataError(MagnetError):
    """A dataset input (file, column, row) is invalid."""


class ConfigError(MagnetError, ValueError):
    """A config file or override is invalid; the message names the key path."""


class OutputError(MagnetError):
    """An output (file or folder) cannot be written: disk full, a folder in the way, no
    permission. The message names the path."""


# errno values that mean "no room left" (disk full, file size limit, quota)
_NO_SPACE = {28: "disk full", 27: "file size limit reached", 122: "disk quota exceeded"}
NO_SPACE_ERRNOS = frozenset(_NO_SPACE)


def output_error(err: OSError, path: object) -> OutputError:
    """The OSError of writing ``path`` as one line for the user (``disk full`` for ENOSPC)."""
    what = _NO_SPACE.get(err.errno or 0)
    if what is not None:
        return OutputError(f"cannot write {path}: {what} ({err.strerror}); free space and re-run")
    if isinstance(err, IsADirectoryError):
        return OutputError(f"cannot write {path}: it is a folder; give a file path")
    if isinstance(err, NotADirectoryError):
        return OutputError(f"cannot write {path}: a part of the path is a file, not a folder")
    reason = err.strerror or str(err)
    return OutputError(f"cannot write {path}: {reason}")


FAULT_LOG_ENV = "MAGNET_FAULT_LOG"
# in the run folder: why a worker had to end itself, one file per rank (rank<r>.log)
FAILURE_DIR = "failures"
FAULT_ATTEMPT_ENV = "MAGNET_RUN_ATTEMPT"


def record_fault(message: str, kind: str = "fault") -> None:
    """Append ``message`` to this rank's fault log (``$MAGNET_FAULT_LOG``:
    ``<run_dir>/failures/rank<r>.log``, set by the distributed worker; one writer per file,
    so no interleaved appends on NFS), tagged with the driver's run attempt id
    (``$MAGNET_RUN_ATTEMPT``), so the driver can name the cause when a worker process had to
    end itself (a dead graph server, an RPC timeout) and Ray only reports that the worker
    died. ``kind="resume"`` records where a restarted worker group resumed."""
    import json
    import os
    import socket
    import time

    path = os.environ.get(FAULT_LOG_ENV)
    if not path:
        return
    entry = {
        "time": time.time(),
        "attempt": os.environ.get(FAULT_ATTEMPT_ENV),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "kind": kind,
        "message": message,
    }
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the worker may os._exit right after this
    except OSError:
        pass
