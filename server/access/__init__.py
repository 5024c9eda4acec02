"""Access control: API keys (hashed), HTTP Basic for A1111 routes, per-key rate limits and credit quotas.

The middleware (`middleware.AccessControl`) authenticates every request except health probes and the API docs,
applies the key's per-minute rate limit and adds the X-RateLimit-* headers; routes read the caller from
`request.state.principal` (`principal.current`) to scope job listings and lookups to their owner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.jobs import JobService
    from server.settings import Settings

__all__ = ["install_access"]


def install_access(app: FastAPI, settings: Settings, jobs: JobService) -> None:
    """Keys and rate limits on the job database; the middleware; GET /v1/account."""
    from server.access import routes
    from server.access.config import check_access_settings
    from server.access.keys import KeyStore
    from server.access.middleware import AccessControl
    from server.access.ratelimit import RateLimiter

    keys = KeyStore(jobs.store.engine)
    limiter = RateLimiter(jobs.store.engine)
    app.state.keys = keys

    def ready_keys() -> KeyStore:
        jobs.ensure_started()  # creates the tables on first use (requests before start-up in some test clients)
        return keys

    users = check_access_settings(settings)  # fails closed: a malformed setting raises instead of opening the app
    from server.jobs.service import RESULTS_PATH

    signed = None if jobs.links is None else RESULTS_PATH + "/"
    app.add_middleware(
        AccessControl,
        keys=ready_keys,
        limiter=lambda: limiter,
        basic_users=users,
        basic_rate_limit=settings.api_auth_rate_limit,
        signed_results_prefix=signed,
    )
    app.include_router(routes.build_router())
