"""`/v2/history`: the caller's own jobs, newest first, each with its parameters and signed image URLs; delete one.

The studio page (server/studio) browses with it; any client may. Scoped to the caller: with keys, the jobs its key
made (an admin key too: its own, not everyone's); on an open server, every job. Every dialect's jobs are listed;
images are those the job stored as result files (URLs signed like every result URL, so they load in an `<img>`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from server.access.principal import can_see, job_owner
from server.api.gateway.tasks import TaskError
from server.errors import ApiError, FieldError
from server.jobs import JobService, cursors, get_job_service
from server.jobs.db import JobRecord
from server.jobs.http import base_url
from server.jobs.store import FINISHED

HISTORY_PATH = "/v2/history"
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_CURSOR_PREFIX = "h1|"


class HistoryImage(BaseModel):
    url: str = Field(description="Absolute result URL (signed unless result_urls_require_auth); expires with the job")
    width: int
    height: int
    seed: int | None
    content_type: str


class HistoryItem(BaseModel):
    task_address: str = Field(description="GET /v2/tasks/{task_address}, /events; DELETE /v2/history/{...}")
    status: str = Field(description="queued | running | completed | failed | cancelled")
    progress: float
    dialect: str = Field(description="a1111, gateway, openai, genpicz, ...: the API that made it")
    route: str = Field(description="txt2img, img2img, flux, ...")
    model: str
    created_at: datetime
    finished_at: datetime | None
    expires_at: datetime | None
    parameters: dict[str, Any] = Field(description="The request as recorded (image bytes replaced by their size)")
    seeds: list[int] | None
    images: list[HistoryImage]
    error: TaskError | None


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    total: int = Field(description="All of the caller's jobs, whatever the page")
    limit: int
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last")


class Deleted(BaseModel):
    deleted: bool
    task_address: str


def encode_cursor(record: JobRecord) -> str:
    return cursors.encode_cursor(record, _CURSOR_PREFIX)


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        return cursors.decode_cursor(cursor, _CURSOR_PREFIX)
    except cursors.BadCursor:
        raise ApiError.invalid([FieldError("cursor", "not a cursor from this API; use next_cursor")]) from None


def history_item(jobs: JobService, record: JobRecord, base: str) -> dict[str, Any]:
    status, progress = record.status, record.progress
    if status not in FINISHED:  # live state while it runs here
        view = jobs.task_by_id(record.id)
        if view is not None:
            record, status, progress = view.record, view.status, view.progress
    files = jobs.store.files_of(record.id) if status == "completed" else []
    images = [
        HistoryImage(
            url=jobs.file_url(base, f), width=f.width, height=f.height, seed=f.seed, content_type=f.content_type
        )
        for f in files
    ]
    error = TaskError(code=record.error_code, message=record.error) if status in ("failed", "cancelled") else None
    item = HistoryItem(
        task_address=record.task_address,
        status=status,
        progress=round(progress, 4),
        dialect=record.dialect,
        route=record.route,
        model=record.model,
        created_at=record.created_at,
        finished_at=record.finished_at,
        expires_at=record.expires_at,
        parameters=record.request_json or {},
        seeds=record.seeds,
        images=images,
        error=error,
    )
    return item.model_dump(mode="json")


def _page(jobs: JobService, base: str, owner: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    after = decode_cursor(cursor) if cursor else None
    records = jobs.list_jobs(owner=owner, limit=limit + 1, after=after)  # one more: is there a next page?
    has_more = len(records) > limit
    records = records[:limit]
    return {
        "items": [history_item(jobs, r, base) for r in records],
        "total": jobs.count_jobs(owner=owner),
        "limit": limit,
        "has_more": has_more,
        "next_cursor": encode_cursor(records[-1]) if has_more and records else None,
    }


def _find(request: Request, jobs: JobService, task_address: str) -> JobRecord:
    view = jobs.task(task_address)
    if view is None or not can_see(request, view.record.owner):
        raise ApiError(404, f"task '{task_address}' not found (unknown, or expired and deleted)", code="task_not_found")
    return view.record


def build_router() -> APIRouter:
    router = APIRouter(prefix=HISTORY_PATH, tags=["history"])

    @router.get("", response_model=HistoryPage)
    async def list_history(
        request: Request,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items per page (1-100)"),
        cursor: str | None = Query(None, max_length=200, description="next_cursor of the previous page"),
    ) -> Response:
        """The caller's jobs of every API, newest first; page with `cursor` (stable while new jobs arrive)."""
        jobs, base, owner = get_job_service(request), base_url(request), job_owner(request)
        return JSONResponse(await run_in_threadpool(_page, jobs, base, owner, limit, cursor))

    @router.get("/{task_address}", response_model=HistoryItem)
    async def get_history_item(request: Request, task_address: str) -> Response:
        """One job as the listing shows it (its image URLs once completed)."""
        jobs, base = get_job_service(request), base_url(request)

        def read() -> dict[str, Any]:
            return history_item(jobs, _find(request, jobs, task_address), base)

        return JSONResponse(await run_in_threadpool(read))

    @router.delete("/{task_address}", response_model=Deleted)
    async def delete_history_item(request: Request, task_address: str) -> Response:
        """Delete the job's record and its images (their URLs then answer 404); a job still running is cancelled."""
        jobs = get_job_service(request)

        def delete() -> None:
            if not jobs.delete(_find(request, jobs, task_address).id):
                raise ApiError(404, f"task '{task_address}' not found", code="task_not_found")

        await run_in_threadpool(delete)
        return JSONResponse({"deleted": True, "task_address": task_address})

    return router
