"""Who is calling: `request.state.principal`, set by the access middleware. None means the server runs open (no
keys configured, loopback only): everyone sees everything, as on a single-user workstation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastapi import Request

from server.access.keys import KeyInfo


@dataclass(frozen=True)
class Principal:
    id: str  # recorded as the owner of the caller's jobs
    name: str
    admin: bool = False
    key: KeyInfo | None = None  # None for HTTP Basic users (A1111 --api-auth)
    rate_limit: int | None = None  # requests per minute; None: not limited

    @property
    def rate_key(self) -> str:
        """The id its requests are counted under (fits the 32 characters of rate_windows.key_id: user names are
        hashed)."""
        if self.key is not None:
            return self.key.id
        return "basic_" + hashlib.sha256(self.id.encode("utf-8")).hexdigest()[:24]


def basic_principal(user: str, admin: bool, rate_limit: int) -> Principal:
    return Principal(f"basic:{user}", user, admin, None, rate_limit)


def key_principal(key: KeyInfo) -> Principal:
    return Principal(key.id, key.name, key.admin, key, key.rate_limit)


def current(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)


def is_admin(request: Request) -> bool:
    """Whether the caller may act on the whole server: an admin key or Basic user, or anyone on an open server."""
    principal = current(request)
    return principal is None or principal.admin


def job_owner(request: Request) -> str | None:
    """The owner to record on a job the caller submits."""
    principal = current(request)
    return principal.id if principal is not None else None


def owner_filter(request: Request) -> str | None:
    """The owner whose jobs the caller may see, or None for all (open server, admin key)."""
    principal = current(request)
    if principal is None or principal.admin:
        return None
    return principal.id


def can_see(request: Request, owner: str | None) -> bool:
    """Whether the caller may see (get, list, fetch, cancel, delete) a job owned by `owner`. Callers must answer
    404, not 403, otherwise: another key's job ids must not even be confirmed to exist."""
    allowed = owner_filter(request)
    return allowed is None or allowed == owner
