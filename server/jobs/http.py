"""HTTP helpers every dialect with jobs shares: absolute URLs, the 202 answer with a task address, submit and wait."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.errors import ApiError
from server.jobs.db import JobRecord
from server.jobs.service import JobSpec, Ticket

TASKS_PATH = "/v2/tasks"


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
    """Submit a dialect's job to the engine and record it. Engine refusals (queue full, invalid) propagate."""
    from server.api.a1111.generation import require_engine  # the one "engine not ready" error for every dialect

    jobs = request.app.state.jobs
    return await run_in_threadpool(jobs.submit, require_engine(request), spec)


async def run_to_completion(request: Request, spec: JobSpec, timeout_s: float | None = None) -> JobRecord:
    """Submit, wait (`sync_timeout_s` by default) and return the completed record. A failed job raises the engine's
    error (so the dialect's error renderer shows it); TimeoutError if it is not done in time (the job goes on)."""
    jobs = request.app.state.jobs
    ticket = await submit(request, spec)
    record = await jobs.wait(ticket, timeout_s if timeout_s is not None else request.app.state.settings.sync_timeout_s)
    if record.status != "completed":
        if ticket.handle.error is not None:
            raise ticket.handle.error
        raise ApiError(500, record.error or "the job failed", code=record.error_code or "generation_failed")
    return record
