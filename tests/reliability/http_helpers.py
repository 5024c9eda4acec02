"""Driving the ASGI app directly (a POST scope; a POST whose body never arrives; the app with the admission gate),
and watching a live server's engine through A1111's /progress."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from server.middleware import AdmissionGate


def post_scope(path: str, content_length: int, host: str = "testserver") -> dict:
    """The ASGI scope of a JSON POST to `path` from 127.0.0.1 announcing `content_length` body bytes."""
    return {
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
            (b"host", host.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(content_length).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": (host, 80),
    }


def wait_running(client: httpx.Client, steps: int, timeout: float = 120) -> None:
    """Until the engine runs a job of `steps` steps and has done at least one of them."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.get("/sdapi/v1/progress").json()["state"]
        if state["sampling_steps"] == steps and state["sampling_step"] >= 1:
            return
        assert time.monotonic() < deadline, f"no job of {steps} steps started: {state}"
        time.sleep(0.05)


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
        self.scope = post_scope(path, content_length)
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
