"""Webhook signatures, and the server-wide signing secret.

Every delivery carries `X-Easel-Timestamp: <ts>` and `X-Easel-Signature: t=<ts>,v1=<hex HMAC-SHA256 of "<ts>.<body>">`
(Stripe's scheme: the timestamp is signed, so a receiver can refuse replays of an old delivery). GenPicz jobs also
carry the seed's `X-GenPicz-Signature: <hex HMAC-SHA256 of the body>`; the body's "timestamp" equals the header, so
that signature covers the time too.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from server.secretfile import persistent_secret
from server.settings import Settings

SIGNATURE_VERSION = "v1"
SECRET_FILE = "webhook_secret"  # under data_dir
DEFAULT_TOLERANCE_S = 300


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def genpicz_signature(secret: str, body: bytes | str) -> str:
    """X-GenPicz-Signature: hex HMAC-SHA256 of the raw body."""
    return hmac.new(_bytes(secret), _bytes(body), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes | str) -> str:
    """The v1 signature: hex HMAC-SHA256 of "<timestamp>.<raw body>"."""
    return hmac.new(_bytes(secret), f"{timestamp}.".encode() + _bytes(body), hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes | str) -> str:
    """X-Easel-Signature: "t=<ts>,v1=<hex>"."""
    return f"t={timestamp},{SIGNATURE_VERSION}={sign(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    timestamp: str | int | None,
    body: bytes | str,
    header: str | None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """For receivers: True if `header` (X-Easel-Signature) signs `body` (the raw bytes received) at `timestamp`
    (X-Easel-Timestamp) with `secret`, and that time is within `tolerance_s` of now (older deliveries may be
    replays). Several v1 entries are accepted (any one may match), for secret rotation."""
    if not header or timestamp is None:
        return False
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamped = [value for key, _, value in fields if key == "t"]
    candidates = [value for key, _, value in fields if key == SIGNATURE_VERSION]
    if stamped != [str(ts)] or not candidates:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def server_secret(settings: Settings) -> str:
    """The secret for jobs that no API key owns: `webhook_secret`, else one generated once and kept in
    <data_dir>/webhook_secret (mode 0600; every process sharing the data directory signs with the same one)."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    return persistent_secret(settings.data_dir / SECRET_FILE, "whsec_")
