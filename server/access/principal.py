"""Who is calling: `request.state.principal`, set by the access middleware. None means the server runs open (no
keys configured, loopback only): everyone sees everything, as on a single-user workstation."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from server.access.keys import KeyInfo


@dataclass(frozen=True)
class Principal:
    id: str  # recorded as the owner of the caller's jobs
    name: str
    admin: bool = False
    key: KeyInfo | None = None  # None for HTTP Basic users (A1111 --api-auth)


def current(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)


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
