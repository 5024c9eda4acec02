"""Result URLs as capability URLs, as object stores presign theirs: `/v2/results/<token>.<ext>?expires=&sig=`.

The token is unguessable (192 random bits) and the query is an HMAC-SHA256, under a server secret, of the file name
and the expiry, which is the result's own. Such a URL loads with no `Authorization` header (an `<img>` tag, a chat
client, a downstream service handed it) until it expires, its generation is deleted, or the key that made it is
revoked (the route checks those); changing any character of it makes it useless. `result_urls_require_auth` turns
this off: every fetch then needs the caller's credentials, as any other route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime

SIGNATURE_CHARS = 43  # the whole 256-bit HMAC, URL-safe base64 without padding
SECRET_FILE = "result_url_secret"  # under data_dir, unless the result_url_secret setting gives one


class ResultLinks:
    """Signs and checks result URLs. The secret is read (or made) on first use."""

    def __init__(self, secret: Callable[[], str]):
        self._secret_factory = secret
        self._secret: bytes | None = None
        self._lock = threading.Lock()

    def _key(self) -> bytes:
        if self._secret is None:
            with self._lock:
                if self._secret is None:
                    self._secret = self._secret_factory().encode("utf-8")
        return self._secret

    def signature(self, filename: str, expires: int) -> str:
        digest = hmac.new(self._key(), f"{filename}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def query(self, filename: str, expires_at: datetime) -> str:
        expires = math.ceil(expires_at.timestamp())  # never before the file itself expires (the route checks that)
        return f"expires={expires}&sig={self.signature(filename, expires)}"

    def verify(self, filename: str, expires: str | None, sig: str | None, now: float | None = None) -> bool:
        """True for an untampered URL that has not expired. (Whether the file still exists and whose it is, the
        route checks.)"""
        if not expires or not sig or not expires.isdigit() or len(sig) != SIGNATURE_CHARS:
            return False
        if int(expires) <= (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self.signature(filename, int(expires)), sig)
