"""The AUTOMATIC1111 dialect: `/sdapi/v1/*`, and the same routes under `/v2/automatic1111/sdapi/v1/*` (the gateway
copy, whose txt2img also takes `model` and uses the gateway defaults)."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.a1111.routes import build_router
from server.errors import A1111_PREFIXES

SDAPI_PREFIX = "/sdapi/v1"
GATEWAY_PREFIX = "/v2/automatic1111/sdapi/v1"

__all__ = ["install", "SDAPI_PREFIX", "GATEWAY_PREFIX"]


class ProcessTime:
    """A1111's `X-Process-Time` header on its routes. Pure ASGI (not BaseHTTPMiddleware), so a client's disconnect
    still reaches the route that waits for a job (server.jobs.http.cancel_on_disconnect)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(A1111_PREFIXES):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_time(message: Message) -> None:
            # Not on a 401: how long a refused credential took to check is nobody's business (timing side channel).
            if message["type"] == "http.response.start" and message["status"] != 401:
                MutableHeaders(scope=message)["X-Process-Time"] = f"{time.perf_counter() - started:.4f}"
            await send(message)

        await self.app(scope, receive, send_with_time)


def install(app: FastAPI) -> None:
    """Mount both copies of the routes and A1111's `X-Process-Time` header on their responses."""
    app.include_router(build_router(), prefix=SDAPI_PREFIX)
    app.include_router(build_router(gateway=True), prefix=GATEWAY_PREFIX)
    app.add_middleware(ProcessTime)
