"""Driving the ASGI app directly: a POST whose body never arrives, and the app with the admission gate."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from server.middleware import AdmissionGate


def with_gate(app: FastAPI) -> FastAPI:
    """The app with AdmissionGate, unless create_app already installs it."""
    if not any(m.cls is AdmissionGate for m in app.user_middleware):
        app.add_middleware(AdmissionGate)
    return app


class RawPost:
    """One POST straight into the ASGI app whose body never arrives: `receive` blocks forever and records that it
    was asked. An app that waits for the body never answers; one that refuses at once answers without asking."""

    def __init__(self, app: FastAPI, path: str, content_length: int = 50_000_000):
        self.app, self.path = app, path
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"testserver"),
                (b"content-type", b"application/json"),
                (b"content-length", str(content_length).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.body_read = False
        self.messages: list[dict] = []

    async def _receive(self) -> dict:
        self.body_read = True
        await asyncio.Event().wait()  # the client never sends its body
        raise AssertionError("unreachable")

    async def _send(self, message: dict) -> None:
        self.messages.append(message)

    def run(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body. An app that waits for the body or for a queue slot never answers: `timeout`
        ends the wait with TimeoutError. No wall-clock bound below that: a loaded CI machine runs late."""

        async def go() -> None:
            await asyncio.wait_for(self.app(self.scope, self._receive, self._send), timeout)

        asyncio.run(go())
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        return start["status"], headers, body
