"""Result images on disk: `<data_dir>/results/<2 chars>/<token>.<ext>`, named by an unguessable token.

Files are written to a temporary name and renamed into place, so a reader never sees half an image, and a failed
write leaves nothing behind. The database row (server.jobs.store) is what makes a file reachable: a file without a
row is an orphan that `remove_orphans` deletes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
TOKEN_BYTES = 24  # 192 bits: 32 URL-safe characters
ORPHAN_AGE_S = 3600.0  # a file this old without a database row is left over from a crash


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class WrittenFile:
    token: str
    path: str  # relative to the results root
    content_type: str
    size_bytes: int


class ResultFiles:
    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, data: bytes, content_type: str) -> WrittenFile:
        token = new_token()
        relative = f"{token[:2]}/{token}.{EXTENSIONS[content_type]}"
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return WrittenFile(token, relative, content_type, len(data))

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored file; refuses anything outside the results root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"result path escapes the results directory: {relative!r}")
        return path

    def read(self, relative: str) -> bytes | None:
        try:
            return self.resolve(relative).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def remove(self, relatives: Iterable[str]) -> int:
        removed = 0
        for relative in relatives:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.resolve(relative).unlink()
                removed += 1
        return removed

    def stored(self, older_than_s: float = ORPHAN_AGE_S) -> list[str]:
        """Relative paths of stored files (and temporary leftovers) last written more than `older_than_s` ago."""
        if not self.root.is_dir():
            return []
        cutoff = time.time() - older_than_s
        out = []
        for path in self.root.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    out.append(path.relative_to(self.root).as_posix())
        return out
