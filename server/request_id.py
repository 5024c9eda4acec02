"""`X-Request-ID` on every answer: the client's own id when it sends a sane one (1-128 visible ASCII characters),
else a new one. The id is bound to the request's log lines (`pipelines.log_context`), carried to the engine in the
request's tags, and stored on its job record (`JobRecord.request_id`)."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines import log_context
from server.errors import error_response

HEADER = "X-Request-ID"
MAX_LENGTH = 128
_SANE = re.compile(rf"[!-~]{{1,{MAX_LENGTH}}}")  # visible ASCII: no spaces, control characters or line breaks


def accept_or_make(given: str | None) -> str:
    """The client's id if it is sane (bounded, printable: safe in a log line and a header), else a new one."""
    if given is not None and _SANE.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current() -> str | None:
    """The id of the request being served, None outside one."""
    return log_context.request_id.get()


class RequestId:
    """Pure ASGI middleware, the outermost layer: every answer carries the id, refusals and 500s included (an
    exception that escapes every handler is answered here, in the path's error shape, so it carries the id too)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(HEADER.lower().encode())
        request_id = accept_or_make(raw.decode("latin-1") if raw is not None else None)
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        with log_context.bound(request_id):
            token = log_context.job_id.set(None)  # set by the route once it has submitted a job
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                if started:
                    raise
                await error_response(Request(scope), exc)(scope, receive, send_with_id)  # logs it with the id
            finally:
                log_context.job_id.reset(token)
