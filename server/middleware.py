"""ASGI middleware: refuse oversized request bodies before they cost memory (BodySizeLimit), and new generation work
before its body is read when the engine cannot take it (AdmissionGate)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.errors import QueueFull
from server.errors import ErrorInfo, error_info, renderer_for


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 for bodies above `max_bytes`: at once from Content-Length, or as soon as a chunked body passes the cap."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send, int(length))
            return

        seen = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not refused:
                    # Answer now: the app may swallow the exception below (FastAPI turns body errors into 400).
                    refused = True
                    if not started:
                        await self._refuse(scope, send, seen)
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; drop whatever the app answers after the failed read
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            pass

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        """413 in the error shape of the path's dialect."""
        message = f"request body of {size}+ bytes exceeds max_body_bytes={self.max_bytes}"
        info = ErrorInfo(413, message, "PayloadTooLarge", "payload_too_large")
        app = scope.get("app")
        body = json.dumps(renderer_for(app, scope["path"])(info) if app is not None else {"detail": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": info.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# POST routes that submit generation work, in every dialect: exact paths, and prefixes whose POSTs all do.
GENERATION_PATHS = frozenset(
    {
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/v2/automatic1111/sdapi/v1/txt2img",
        "/v2/automatic1111/sdapi/v1/img2img",
        "/v1/generate",  # GenPicz
        "/image/create",  # Genrex
        "/v1/image/create",
    }
)
GENERATION_PREFIXES = ("/v2/image/", "/v1/images/", "/api/v1/images/")


class AdmissionGate:
    """Refuse new generation work at once, before its body is read or its images decoded, when the engine could not
    admit it anyway: 429 + Retry-After when the admission queue is full, 503 while draining or dead (the engine's
    `admission_error()`). The body is the dialect's own error shape (`server.errors.renderer_for`).

    A cheap pre-check, not a reservation: a request that passes may still get the same 429 from `submit` if the
    last slot is taken while its body is decoded. Control routes (progress, interrupt, options) are never gated.
    """

    def __init__(
        self,
        app: ASGIApp,
        paths: Iterable[str] = GENERATION_PATHS,
        prefixes: Iterable[str] = GENERATION_PREFIXES,
    ):
        self.app = app
        self.paths = frozenset(p.rstrip("/") for p in paths)
        self.prefixes = tuple(prefixes)

    def gates(self, method: str, path: str) -> bool:
        return method == "POST" and (path.rstrip("/") in self.paths or path.startswith(self.prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.gates(scope["method"], scope["path"]):
            app = scope.get("app")  # the Starlette/FastAPI app, set before its middleware runs
            engine = getattr(getattr(app, "state", None), "engine", None)
            refusal = _refusal(engine) if engine is not None else None  # None engine: the route says "starting"
            if refusal is not None:
                info = error_info(refusal)
                body = renderer_for(app, scope["path"])(info)
                await JSONResponse(body, status_code=info.status, headers=info.headers or None)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(engine: object) -> Exception | None:
    check = getattr(engine, "admission_error", None)  # EngineClient; an engine without it reports free_slots
    if check is not None:
        return check()
    return QueueFull() if getattr(engine, "free_slots", 1) <= 0 else None
