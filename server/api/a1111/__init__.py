"""The AUTOMATIC1111 dialect: `/sdapi/v1/*`, and the same routes under `/v2/automatic1111/sdapi/v1/*` (the gateway
copy, whose txt2img also takes `model` and uses the gateway defaults)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.a1111 import controlnet, controlnet_modules
from server.api.a1111.routes import build_router
from server.errors import A1111_PREFIXES, ErrorInfo, renderer_for

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


class UntypedJson:
    """A1111's pinned FastAPI parses a body sent without `Content-Type` as JSON, and some integrations send every call
    that way: on the A1111 routes such a body is read as JSON (`application/json` is set on the request before any
    other layer sees it). Strict content types exist to stop cross-site requests from browsers, which may send a
    body without a type and without a CORS preflight; a browser always names its page in `Origin`, so an untyped
    request from an origin the CORS settings do not allow is refused (403). Requests without `Origin` (every
    non-browser client) and from allowed origins pass."""

    def __init__(self, app: ASGIApp, allow_origins: Sequence[str] = (), allow_origin_regex: str | None = None):
        self.app = app
        self.allow_all = "*" in allow_origins
        self.allow_origins = frozenset(allow_origins)
        self.allow_origin_regex = re.compile(allow_origin_regex) if allow_origin_regex else None

    def origin_allowed(self, origin: str) -> bool:
        """The CORS middleware's own rule (starlette CORSMiddleware.is_allowed_origin)."""
        if self.allow_all or origin in self.allow_origins:
            return True
        return self.allow_origin_regex is not None and self.allow_origin_regex.fullmatch(origin) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH")
            or not scope["path"].startswith(A1111_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if any(name == b"content-type" and value.strip() for name, value in headers):
            await self.app(scope, receive, send)
            return
        origin = next((value.decode("latin-1") for name, value in headers if name == b"origin"), None)
        if origin is not None and not self.origin_allowed(origin):
            info = ErrorInfo(
                403,
                f"a request without Content-Type from origin {origin!r} is refused: that origin is not allowed by "
                "the CORS settings (send Content-Type: application/json, or allow the origin)",
                "Forbidden",
                "forbidden",
            )
            body = renderer_for(scope.get("app"), scope["path"])(info)
            await JSONResponse(body, status_code=info.status)(scope, receive, send)
            return
        kept = [(name, value) for name, value in headers if name != b"content-type"]  # an empty one counts as none
        typed = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        await self.app(typed, receive, send)


def install(app: FastAPI) -> None:
    """Mount both copies of the routes, A1111's `X-Process-Time` header on their responses and its reading of
    untyped bodies as JSON."""
    app.include_router(build_router(), prefix=SDAPI_PREFIX)
    app.include_router(build_router(gateway=True), prefix=GATEWAY_PREFIX)
    controlnet.install(app)  # the ControlNet extension's /controlnet/* routes (and their gateway copy)
    controlnet_modules.install(app)  # /controlnet/module_list, /controlnet/detect (the extension's preprocessors)
    settings = app.state.settings
    app.add_middleware(
        UntypedJson,
        allow_origins=settings.cors_allow_origins,
        allow_origin_regex=settings.cors_allow_origin_regex,
    )
    app.add_middleware(ProcessTime)
