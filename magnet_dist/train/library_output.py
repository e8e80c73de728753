"""Keep the libraries' chatter off the terminal: what the main command prints is ours (progress,
the per-epoch line, the result); DGL's and Ray's logs go to files.

DGL prints from Python and from C++ (partitioning statistics with a process-wide "peak mem",
client connect/exit lines), so its output is captured at the file-descriptor level. Ray
Train's INFO lines (per-epoch "Checkpoint successfully created" / "Reporting training result",
worker-group start-up) stay in Ray's own session logs (``<session>/logs/train/``) and are kept
off the console.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def captured_output(path: str | Path):
    """Send everything this process writes to stdout/stderr (Python and C/C++ alike) to
    ``path`` (appended) while the block runs. On an error the log's tail is printed to
    stderr, so a failure is never silent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    text = open(path, "a", buffering=1)  # Python's own sys.stdout may not write to fd 1
    failed = False
    try:
        for fd in saved:
            os.dup2(log, fd)
        with redirect_stdout(text), redirect_stderr(text):
            yield path
    except BaseException:
        failed = True
        raise
    finally:
        text.close()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log)
        if failed:
            tail = path.read_text(errors="replace").splitlines()[-20:]
            print(f"--- last lines of {path}:", *tail, sep="\n", file=sys.stderr, flush=True)


def _ray_package_dir() -> str:
    import ray

    return os.path.dirname(ray.__file__)


class _LibraryInfoFilter(logging.Filter):
    """Drops records below WARNING from Ray's modules (some Ray Train modules log through a
    logger named by their file path, outside the ``ray.train`` hierarchy that Ray Train's
    ``LoggingConfig`` filters)."""

    def __init__(self) -> None:
        super().__init__()
        self.ray_dir = _ray_package_dir()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        from_ray = record.name.startswith(("ray.", self.ray_dir)) or record.name == "ray"
        return not from_ray


def quiet_ray_console() -> None:
    """In a Ray Train worker (after Ray Train configured its loggers): Ray's INFO records no
    longer reach the console handlers (they still reach Ray's session log files)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
                handler.addFilter(_LibraryInfoFilter())
