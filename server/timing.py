"""Where a request's time goes, by stage, in a W3C `Server-Timing` response header.

Generation responses carry e.g. `Server-Timing: queue;dur=0.4, load;dur=0.0, prepare;dur=1.1, run;dur=212.5,
encode;dur=14.2, b64;dur=0.9, total;dur=236.0` (milliseconds): the engine's stages
(`GenerationResult.timings`) plus the ones the HTTP layer times itself. Browser devtools show it; `scripts/bench.py`
reads it to break the serving overhead down by stage. Other responses carry no such header.

The stages are collected in a context variable that the middleware sets per request: the thread pool that runs
encoding copies the context, so `stage("encode")` in a worker thread lands on the request it serves.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator, Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The engine's timings (seconds) under their Server-Timing names.
ENGINE_STAGES = {
    "queued_s": "queue",
    "load_s": "load",
    "prepare_s": "prepare",
    "run_s": "run",
    "encode_s": "encode",  # jobs-service routes: encoded and written in its pool, outside the request
    "store_s": "store",
}


class StageTimes:
    """Seconds per stage for one request; stages repeated (one encode per image) add up. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def header(self, total_s: float) -> str:
        with self._lock:
            parts = [f"{name};dur={s * 1000:.1f}" for name, s in self.seconds.items()]
        return ", ".join([*parts, f"total;dur={total_s * 1000:.1f}"])


_current: contextvars.ContextVar[StageTimes | None] = contextvars.ContextVar("easel_stage_times", default=None)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage `name` of the current request (no-op outside a request)."""
    times = _current.get()
    if times is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - started)


def record_engine(timings: Mapping[str, float]) -> None:
    """Add a finished job's engine timings to the current request's stages."""
    times = _current.get()
    if times is None:
        return
    for key, name in ENGINE_STAGES.items():
        if key in timings:
            times.add(name, float(timings[key]))


class ServerTiming:
    """Pure ASGI middleware: collect the stages of each HTTP request and send them as `Server-Timing`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        times = StageTimes()
        token = _current.set(times)
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and times.seconds:
                MutableHeaders(scope=message).append("Server-Timing", times.header(time.perf_counter() - started))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _current.reset(token)
