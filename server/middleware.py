"""ASGI middleware: refuse oversized request bodies before they cost memory (BodySizeLimit), and new generation work
before its body is read when the engine cannot take it (AdmissionGate)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.errors import QueueFull
from server.errors import ErrorInfo, FieldError, error_info, renderer_for


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


# A JSON \u escape of a UTF-16 surrogate (D800-DFFF). Valid pairs (emoji) decode to one character; a lone one decodes
# to a Python str that cannot be encoded as UTF-8, so it would fail later wherever the text is written (PNG infotext,
# the job database, the JSON answer): a 500 after the work was done.
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (key or value) in decoded JSON holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path or "body" if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            return path or "body"
        if (found := lone_surrogate_field(item, here)) is not None:
            return found
    return None


class TextGuard:
    """422 naming the field, in the dialect's shape, for a JSON body whose text is not Unicode (a lone surrogate
    such as "\\ud800"): every dialect and field at once, before any route sees it. Bodies without such an escape
    (nearly all) pass through untouched, held once (the route reads the same bytes)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if scope["type"] != "http" or b"json" not in headers.get(b"content-type", b"").lower():
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                first: Message | None = message
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                first = None
                break
        body = b"".join(chunks)
        if _ESCAPED_SURROGATE.search(body):
            try:
                field = lone_surrogate_field(json.loads(body))
            except ValueError:
                field = None  # not JSON: the route's own parser says so
            if field is not None:
                message_text = "not valid text: contains a lone UTF-16 surrogate (\\ud800-\\udfff)"
                info = ErrorInfo(
                    422, f"{field}: {message_text}", "RequestValidationError", "invalid_request", field,
                    [FieldError(field, message_text, "string_unicode")],
                )  # fmt: skip
                rendered = renderer_for(scope.get("app"), scope["path"])(info)
                await JSONResponse(rendered, status_code=info.status)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first if first is not None else {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
