"""HTTP helpers every dialect with jobs shares: absolute URLs, the 202 answer with a task address, submit and wait."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.access.principal import job_owner
from server.errors import ApiError
from server.jobs.db import JobRecord
from server.jobs.service import JobSpec, Ticket
from server.timing import record_engine

TASKS_PATH = "/v2/tasks"

log = logging.getLogger("easel.jobs")


class TaskAccepted(BaseModel):
    """The 202 answer to `"async": true`."""

    task_address: str
    status: str
    poll_url: str


def base_url(request: Request) -> str:
    """`public_base_url` if set (behind a proxy), else the base URL the client used (scheme, host, root path)."""
    configured = request.app.state.settings.public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def task_url(request: Request, task_address: str) -> str:
    return f"{base_url(request)}{TASKS_PATH}/{task_address}"


def accepted(request: Request, ticket: Ticket) -> JSONResponse:
    """202 with the task address; `Location` points at the status URL."""
    url = task_url(request, ticket.task_address)
    body = {"task_address": ticket.task_address, "status": "queued", "poll_url": url}
    return JSONResponse(body, status_code=202, headers={"Location": url})


async def submit(request: Request, spec: JobSpec) -> Ticket:
    """Submit a dialect's job to the engine and record it, owned by the caller. Engine refusals (queue full, invalid,
    quota) propagate."""
    from server.api.a1111.generation import require_engine  # the one "engine not ready" error for every dialect

    jobs = request.app.state.jobs
    spec.owner = job_owner(request)
    spec.base_url = spec.base_url or base_url(request)
    if not spec.request.preview_every:  # live previews for the task's event stream, unless the dialect chose
        spec.request.preview_every = request.app.state.settings.preview_every_n_steps
    return await run_in_threadpool(jobs.submit, require_engine(request), spec)


async def run_to_completion(request: Request, spec: JobSpec, timeout_s: float | None = None) -> JobRecord:
    """Submit, wait (`sync_timeout_s` by default) and return the completed record. A failed job raises the engine's
    error (so the dialect's error renderer shows it); TimeoutError if it is not done in time (the job goes on). A client
    that hangs up while waiting cancels the job."""
    ticket = await submit(request, spec)
    record = await wait_watching(request, ticket, timeout_s)
    if record.status != "completed":
        if ticket.handle.error is not None:
            raise ticket.handle.error
        raise ApiError(500, record.error or "the job failed", code=record.error_code or "generation_failed")
    return record


async def wait_watching(request: Request, ticket: Ticket, timeout_s: float | None = None) -> JobRecord:
    """Wait for a synchronous call's job (`sync_timeout_s` by default; TimeoutError after it, the job goes on); a
    client that hangs up meanwhile cancels the job."""
    jobs = request.app.state.jobs
    timeout = timeout_s if timeout_s is not None else request.app.state.settings.sync_timeout_s
    async with cancel_on_disconnect(request, lambda: run_in_threadpool(jobs.cancel, ticket.task_address)):
        record = await jobs.wait(ticket, timeout)
    record_engine(record.timings or {})
    return record


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, cancel: Callable[[], Any]) -> AsyncIterator[None]:
    """While the block waits for a synchronous call's job, watch the client: once it has hung up, `cancel()` the job
    (nobody will read its result). The block goes on and sees the job end cancelled. Async jobs are not watched."""

    async def watch() -> None:
        # The body has been read: the next message is the disconnect. Waiting for it (vLLM's listen_for_disconnect)
        # instead of polling `is_disconnected()`, whose cancelled receive never sees it through BaseHTTPMiddleware.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("%s: the client disconnected; cancelling its job", request.url.path)
        try:
            outcome = cancel()
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:  # the job then runs on; nothing else to do for a client that is gone
            log.exception("%s: cancelling the job of a disconnected client failed", request.url.path)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
