"""Ray's token-authentication file, kept private.

Ray 2.60 turns token authentication on for a cluster ``ray.init()`` starts and writes the token
to ``~/.ray/auth_token`` (or ``$RAY_AUTH_TOKEN_PATH``) with a plain ``open()``: mode 0644 under
the usual umask, so every local user can read the key to the cluster (which runs code for
whoever holds it). Before magnet_dist starts an embedded cluster it creates that file itself,
mode 0600, with a token of the same form (``secrets.token_hex(32)``); and wherever it finds a
token file of ours that group or others can read, it makes it private.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path


def token_file() -> Path | None:
    """The token file Ray reads (None: the token is in ``$RAY_AUTH_TOKEN``, or auth is off)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get(
        "RAY_AUTH_TOKEN"
    ):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def make_private(path: Path | None) -> bool:
    """chmod 0600 a token file this user owns that group or others can read; True if it did."""
    if path is None:
        return False
    try:
        st = path.expanduser().stat()
    except OSError:
        return False
    if st.st_uid != os.getuid() or not st.st_mode & 0o077:
        return False
    os.chmod(path.expanduser(), 0o600)
    print(
        f"magnet_dist: made Ray's token file {path} private (mode {st.st_mode & 0o777:o} -> 600)",
        file=sys.stderr,
        flush=True,
    )
    return True


def private_token_for_new_cluster() -> Path | None:
    """Before ``ray.init()`` starts a cluster: the token file exists, mode 0600 (created here
    if missing, so Ray never writes it world-readable)."""
    path = token_file()
    if path is None:
        return None
    path = path.expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    make_private(path)
    return path
