"""GET /v1/account: the calling key's plan, rate limit and usage (seed 001). Errors in the GenPicz shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.access.principal import current


class Account(BaseModel):
    plan: str  # starter | pro | studio | custom; "open" on a server without keys; "basic" for A1111 Basic users
    rate_limit: int | None  # requests per minute
    images_generated: int
    credits_used: int
    credits_remaining: int | None  # None: no quota
    quota: int | None
    key_id: str | None
    key_name: str | None


def build_router() -> APIRouter:
    router = APIRouter(tags=["account"])

    @router.get("/v1/account", response_model=Account)
    async def account(request: Request) -> dict[str, Any]:
        """Plan, rate limit, images generated and credits of the calling API key."""
        principal = current(request)
        if principal is None or principal.key is None:
            plan = "open" if principal is None else "basic"
            return Account(
                plan=plan,
                rate_limit=None,
                images_generated=0,
                credits_used=0,
                credits_remaining=None,
                quota=None,
                key_id=None,
                key_name=principal.name if principal else None,
            ).model_dump()
        key = await run_in_threadpool(request.app.state.keys.get, principal.key.id) or principal.key
        return Account(
            plan=key.plan,
            rate_limit=key.rate_limit,
            images_generated=key.images_generated,
            credits_used=key.credits_used,
            credits_remaining=key.credits_remaining,
            quota=key.quota,
            key_id=key.id,
            key_name=key.name,
        ).model_dump()

    return router
