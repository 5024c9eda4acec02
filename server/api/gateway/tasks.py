"""`/v2/tasks/{task_address}` (status, result, cancel) and `/v2/results/{token}.{ext}` (result images).

Both serve jobs of every dialect that uses the JobService (the gateway and the A1111 gateway copy's async txt2img).
Task addresses and file tokens are unguessable; an unknown, expired or malformed one is a 404.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.access.principal import can_see, owner_filter
from server.api.gateway.events import task_events
from server.errors import ApiError
from server.jobs import JobService, TaskView, Ticket, get_job_service
from server.jobs.db import utcnow
from server.jobs.files import EXTENSIONS
from server.jobs.http import TASKS_PATH, base_url, task_url
from server.jobs.service import RESULTS_PATH
from server.webhooks import get_webhook_service

CANCEL_WAIT_S = 5.0  # how long a cancel request waits for the job to stop before answering 202


class TaskError(BaseModel):
    code: str | None
    message: str | None


class TaskStatus(BaseModel):
    task_address: str
    status: str  # queued | running | completed | failed | cancelled
    progress: float
    route: str
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    seeds: list[int] | None
    timings: dict[str, float] | None  # queued_s, load_s, prepare_s, run_s (engine); encode_s, store_s
    result: dict[str, Any] | None  # completed: the body the synchronous call returns
    error: TaskError | None  # failed / cancelled
    cancel_requested: bool = False
    poll_url: str
    webhook: list[dict[str, Any]] | None = None  # the job's webhook deliveries (server.webhooks), if it has a URL


def _not_found(task_address: str) -> ApiError:
    return ApiError(404, f"task '{task_address}' not found (unknown, or expired and deleted)", code="task_not_found")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def task_body(
    request: Request, view: TaskView, result: dict[str, Any] | None, webhook: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    record = view.record
    error = {"code": record.error_code, "message": record.error} if view.status in ("failed", "cancelled") else None
    return {
        "task_address": record.task_address,
        "status": view.status,
        "progress": round(view.progress, 4),
        "route": record.route,
        "model": record.model,
        "created_at": _iso(record.created_at),
        "started_at": _iso(view.started_at),
        "finished_at": _iso(record.finished_at),
        "expires_at": _iso(record.expires_at),
        "seeds": record.seeds,
        "timings": record.timings,
        "result": result if view.status == "completed" else None,
        "error": error,
        "cancel_requested": view.cancel_requested,
        "poll_url": task_url(request, record.task_address),
        "webhook": webhook,
    }


async def _task_response(request: Request, jobs: JobService, task_address: str, status_code: int = 200) -> Response:
    view = await run_in_threadpool(jobs.task, task_address)
    if view is None or not can_see(request, view.record.owner):
        raise _not_found(task_address)
    result = None
    if view.status == "completed":
        result = await run_in_threadpool(jobs.result_body, view.record, base_url(request))
    webhooks = get_webhook_service(request.app)
    webhook = None
    if webhooks is not None and view.record.webhook_url:
        webhook = await run_in_threadpool(webhooks.deliveries_for, view.record.id)
    return JSONResponse(task_body(request, view, result, webhook), status_code=status_code)


async def _cancel(request: Request, task_address: str) -> Response:
    jobs = get_job_service(request)
    view = await run_in_threadpool(jobs.task, task_address)
    if view is None or not can_see(request, view.record.owner):
        raise _not_found(task_address)
    outcome = await run_in_threadpool(jobs.cancel, task_address)
    if outcome is None:
        raise _not_found(task_address)
    if isinstance(outcome, TaskView):
        if outcome.status in ("completed", "failed"):
            raise ApiError(
                409, f"task '{task_address}' already {outcome.status}; nothing to cancel", code="task_finished"
            )
        return await _task_response(request, jobs, task_address)
    return await _await_stop(request, jobs, outcome)


async def _await_stop(request: Request, jobs: JobService, ticket: Ticket) -> Response:
    """200 once the job has stopped; 202 if it is still stopping (a step in progress) after CANCEL_WAIT_S."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ticket.finished)), CANCEL_WAIT_S)
    except (asyncio.TimeoutError, concurrent.futures.CancelledError):
        return await _task_response(request, jobs, ticket.task_address, status_code=202)
    return await _task_response(request, jobs, ticket.task_address)


def build_router() -> APIRouter:
    router = APIRouter(tags=["tasks"])

    @router.get(f"{TASKS_PATH}/{{task_address}}", response_model=TaskStatus)
    async def get_task(request: Request, task_address: str) -> Response:
        """Status of an async (or timed-out sync) call; `result` is the synchronous body once completed."""
        return await _task_response(request, get_job_service(request), task_address)

    @router.get(f"{TASKS_PATH}/{{task_address}}/events", response_class=Response)
    async def task_events_stream(request: Request, task_address: str) -> Response:
        """The task's progress as Server-Sent Events: `queued`, `progress` (with live previews), then `completed`
        (the body of GET /v2/tasks/{task_address}), `failed` or `cancelled`. `Last-Event-ID` resumes."""
        return await task_events(request, task_address)

    @router.delete(f"{TASKS_PATH}/{{task_address}}", response_model=TaskStatus)
    async def delete_task(request: Request, task_address: str) -> Response:
        """Cancel: a queued job never runs, a running one stops at its next step. 409 if already finished."""
        return await _cancel(request, task_address)

    @router.post(f"{TASKS_PATH}/{{task_address}}/cancel", response_model=TaskStatus)
    async def cancel_task(request: Request, task_address: str) -> Response:
        """Same as DELETE /v2/tasks/{task_address}."""
        return await _cancel(request, task_address)

    @router.api_route(f"{RESULTS_PATH}/{{filename}}", methods=["GET", "HEAD"], response_class=Response)
    async def result_file(request: Request, filename: str) -> Response:
        """A result image, until its URL expires."""
        token, _, ext = filename.rpartition(".")
        jobs = get_job_service(request)
        found = await run_in_threadpool(jobs.file, token) if token else None
        if found is not None and owner_filter(request) is not None:
            record = await run_in_threadpool(jobs.store.get, found[0].job_id)
            if record is None or not can_see(request, record.owner):
                found = None
        if found is None or EXTENSIONS.get(found[0].content_type) != ext:
            raise ApiError(404, "result not found (unknown, or expired)", code="result_not_found")
        stored, data = found
        max_age = max(0, int((stored.expires_at - utcnow()).total_seconds()))
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": f"private, max-age={max_age}"}
        return Response(data, media_type=stored.content_type, headers=headers)

    return router
