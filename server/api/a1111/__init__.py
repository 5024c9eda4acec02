"""The AUTOMATIC1111 dialect: `/sdapi/v1/*`, and the same routes under `/v2/automatic1111/sdapi/v1/*` (the gateway
copy, whose txt2img also takes `model` and uses the gateway defaults)."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from server.api.a1111.routes import build_router
from server.errors import A1111_PREFIXES

SDAPI_PREFIX = "/sdapi/v1"
GATEWAY_PREFIX = "/v2/automatic1111/sdapi/v1"

__all__ = ["install", "SDAPI_PREFIX", "GATEWAY_PREFIX"]


def install(app: FastAPI) -> None:
    """Mount both copies of the routes and A1111's `X-Process-Time` header on their responses."""
    app.include_router(build_router(), prefix=SDAPI_PREFIX)
    app.include_router(build_router(gateway=True), prefix=GATEWAY_PREFIX)

    @app.middleware("http")
    async def process_time(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith(A1111_PREFIXES):
            response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.4f}"
        return response
