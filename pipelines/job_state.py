"""The completion side every job handle shares: status, progress, result or error, waiting from any event loop or
thread, and done-callbacks. The engine's `Job` and the Ray ingress's `RemoteJob` add how the work is done.
Torch-free."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipelines.engine_api import JobStatus, Progress
from pipelines.request import GenerationRequest, GenerationResult

log = logging.getLogger("easel.engine")


class CompletableJob:
    """A submitted request's state. Thread-safe: finished once by whoever runs it, awaited from any event loop."""

    def __init__(self, request: GenerationRequest):
        self.id = uuid.uuid4().hex
        self.request = request
        self.created_at = time.time()
        # Flags the runner polls at every denoising step.
        self.cancel_requested = False
        self.interrupt_requested = False
        self.skip_requested = False
        self._status = JobStatus.QUEUED
        self._progress = Progress(job_count=request.n_iter, sampling_steps=request.steps)
        self._error: BaseException | None = None
        self._result: GenerationResult | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._callbacks: list[Callable[[Any], None]] = []

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def progress(self) -> Progress:
        return dataclasses.replace(self._progress)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _call_safely(fn, self)

    async def wait(self, timeout: float | None = None) -> GenerationResult:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._waiters.append((loop, fut))
            else:
                fut.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s; it keeps running") from None
        return self.result_or_raise()

    def wait_sync(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s; it keeps running")
        return self.result_or_raise()

    def result_or_raise(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _before_finish(self, status: JobStatus) -> None:
        """Hook, under the lock, just before the final state is set."""

    def _after_finish(self) -> None:
        """Hook, outside the lock, before waiters and callbacks are told."""

    def _finish(
        self, status: JobStatus, result: GenerationResult | None = None, error: BaseException | None = None
    ) -> None:
        """Set the final state once (later calls are no-ops) and wake waiters and callbacks."""
        with self._lock:
            if self._done.is_set():
                return
            self._before_finish(status)
            self._status, self._result, self._error = status, result, error
            self._done.set()
            waiters, self._waiters = self._waiters, []
            callbacks, self._callbacks = self._callbacks, []
        self._after_finish()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_if_pending, fut)
        for fn in callbacks:
            _call_safely(fn, self)


def _call_safely(fn: Callable[[Any], None], job: CompletableJob) -> None:
    try:
        fn(job)
    except Exception:  # a broken listener must not take the worker down
        log.exception("done-callback of job %s failed", job.id)


def _set_if_pending(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
