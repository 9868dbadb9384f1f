"""Who this participant is: the default nickname and the stable participant id. Stdlib only."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path


def default_nickname() -> str:
    """`user@host`, the short host name."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in a bare container
        user = "user"
    return f"{user}@{socket.gethostname().split('.')[0] or 'localhost'}"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "llmroom"


def _user_key(debug: Callable[[str], None] | None) -> bytes | None:
    """The random per-user key, created on first use with mode 0600."""
    path = config_dir() / "key"
    try:
        key = path.read_bytes()
        if len(key) >= 16:
            return key
    except OSError:
        pass
    key = secrets.token_hex(32).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.chmod(path, 0o600)
    except OSError as exc:
        if debug:
            debug(f"cannot keep the participant key in {path}: {exc}; using a random id for this run")
        return None
    return key


def stable_participant_id(
    hub: str, code: str, endpoint: str, debug: Callable[[str], None] | None = None
) -> str:
    """The same share (hub, room, endpoint) from the same user gets the same id across restarts, so the
    hub upserts instead of listing a ghost; two shares get two ids."""
    key = _user_key(debug)
    if key is None:
        return str(uuid.uuid4())
    digest = hmac.new(key, f"{hub}\n{code.upper()}\n{endpoint}".encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))
