"""`GET /v2/tasks/{task_address}/events`: a job's progress as Server-Sent Events.

Events: `queued` (position in the queue), `progress` (step, steps, percent, ETA; a base64 PNG `preview` whenever a
new live preview exists), then one of `completed` (the body GET /v2/tasks/{address} returns), `failed` or
`cancelled`, and the stream ends. A client that connects late gets the current state first; `Last-Event-ID` skips
what it has seen (the final event is always sent). Disconnecting never cancels the job. Same per-key isolation as
the task route (another key's task is a 404).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from pipelines.engine_api import JobStatus
from server.access.principal import can_see
from server.errors import ApiError
from server.jobs import JobService, TaskView, get_job_service
from server.jobs.http import base_url
from server.jobs.watch import Snapshot, preview_b64, watch

FINAL_EVENT_ID = 1_000_000_000  # above every progress id
STORED_POLL_S = 0.5  # a job running in another process (shared database): its record is polled
PING_S = 15  # a comment line this often keeps proxies from closing an idle stream


def last_event_id(request: Request) -> int:
    try:
        return int(request.headers.get("last-event-id", "-1"))
    except ValueError:
        return -1


def _event(name: str, event_id: int, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=name, id=str(event_id))


def progress_event(task_address: str, snap: Snapshot, position: int | None, preview: str | None) -> ServerSentEvent:
    if snap.status == JobStatus.QUEUED:
        return _event("queued", 0, {"task_address": task_address, "status": "queued", "position": position})
    p = snap.progress
    data: dict[str, Any] = {
        "task_address": task_address,
        "status": "running",
        "step": p.sampling_step,
        "steps": p.sampling_steps,
        "job_no": p.job_no,
        "job_count": p.job_count,
        "percent": round(100 * p.fraction, 2),
        "eta_s": None if (eta := snap.eta_s()) is None else round(eta, 2),
    }
    if preview is not None:
        data.update(preview=preview, preview_step=p.preview_step)
    return _event("progress", snap.event_id, data)


async def _final_event(request: Request, jobs: JobService, task_address: str) -> ServerSentEvent:
    from server.api.gateway.tasks import task_body  # the task route's body, shared

    while True:
        view = await run_in_threadpool(jobs.task, task_address)
        if view is None:  # expired and deleted while watched
            data = {"task_address": task_address, "status": "failed", "error": {"code": "task_not_found"}}
            return _event("failed", FINAL_EVENT_ID, data)
        if view.finished:
            break
        await asyncio.sleep(STORED_POLL_S)
    result = None
    if view.status == "completed":
        result = await run_in_threadpool(jobs.result_body, view.record, base_url(request))
    return _event(view.status, FINAL_EVENT_ID, task_body(request, view, result))


async def _stream(request: Request, jobs: JobService, view: TaskView, after: int) -> AsyncIterator[ServerSentEvent]:
    address = view.record.task_address
    ticket = jobs.live_ticket(view.record.id)
    if ticket is not None:
        engine = request.app.state.engine
        sent_preview = 0
        async for snap in watch(ticket.handle, ticket.finished):
            preview = None
            if snap.progress.preview_step != sent_preview and snap.progress.preview is not None:
                sent_preview = snap.progress.preview_step
                preview = await run_in_threadpool(preview_b64, snap.progress)
            if snap.event_id <= after and preview is None:
                continue  # seen before the reconnect
            position = getattr(engine, "queue_position", lambda _id: None)(ticket.handle.id)
            yield progress_event(address, snap, position, preview)
    elif not view.finished:  # running in another process: its stored progress
        while (current := await run_in_threadpool(jobs.task, address)) is not None and not current.finished:
            data = {"task_address": address, "status": current.status, "percent": round(100 * current.progress, 2)}
            yield _event("progress", 1, data)
            await asyncio.sleep(STORED_POLL_S)
    yield await _final_event(request, jobs, address)


async def task_events(request: Request, task_address: str) -> EventSourceResponse:
    jobs = get_job_service(request)
    view = await run_in_threadpool(jobs.task, task_address)
    if view is None or not can_see(request, view.record.owner):
        raise ApiError(404, f"task '{task_address}' not found (unknown, or expired and deleted)", code="task_not_found")
    return EventSourceResponse(_stream(request, jobs, view, last_event_id(request)), ping=PING_S)
