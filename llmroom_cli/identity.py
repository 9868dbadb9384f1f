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


KEY_BYTES = 64  # hex characters of the random key


def _read_key(path: Path) -> bytes | None:
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    return key if len(key) >= 16 else None


def _user_key(warn: Callable[[str], None] | None) -> bytes | None:
    """The random per-user key, created on first use with mode 0600, atomically: the key is written
    to a temporary file that is then hard-linked into place, which fails if another process got
    there first (its key is then read and used). However many agents start at once, one key wins,
    and no reader ever sees a half-written one. When it cannot be stored, `warn` is told why."""
    path = config_dir() / "key"
    try:
        key = _read_key(path)
        if key is not None:
            return key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():  # too short to be ours: damaged. Replace it (the race is as below).
            path.unlink(missing_ok=True)
        fresh = secrets.token_hex(KEY_BYTES // 2).encode()
        tmp = path.with_name(f".key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(fresh)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another agent created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
        key = _read_key(path)
        if key is None:
            raise OSError(f"{path} is not a usable key")
        return key
    except OSError as exc:
        if warn:
            reason = exc.strerror or str(exc)
            warn(
                f"cannot keep the participant key in {path} ({reason}): the participant id changes on"
                " every run, so a restart leaves the old entry until the hub marks it offline; fix the"
                " directory or pass --id ID"
            )
        return None


def stable_participant_id(
    hub: str, code: str, endpoint: str, warn: Callable[[str], None] | None = None
) -> str:
    """The same share (hub, room, endpoint) from the same user gets the same id across restarts, so the
    hub upserts instead of listing a ghost; two shares get two ids. When the key cannot be stored the
    id is random, and `warn` is told once."""
    key = _user_key(warn)
    if key is None:
        return str(uuid.uuid4())
    digest = hmac.new(key, f"{hub}\n{code.upper()}\n{endpoint}".encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))
