"""Secrets the server makes for itself and keeps in the data directory (webhook signing, result URL signing)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def persistent_secret(path: Path, prefix: str) -> str:
    """A random secret generated once and kept in `path` (mode 0600): every process sharing the data directory
    reads the same one, and a restart keeps it."""
    existing = _read_secret(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(prefix + secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(candidate, path)  # atomic, and fails if another process got there first: theirs wins
        except FileExistsError:
            pass
    finally:
        candidate.unlink(missing_ok=True)
    secret = _read_secret(path)
    if not secret:
        raise RuntimeError(f"the secret file {path} is empty")
    return secret


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
