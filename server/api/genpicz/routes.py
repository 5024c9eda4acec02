"""GenPicz-style routes: POST /v1/generate (synchronous), GET/DELETE /v1/generations/{id}, GET /v1/generations,
GET /v1/styles."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import EngineNotReady, InvalidRequest
from server.access.principal import can_see, current, owner_filter
from server.api.genpicz import adapter
from server.api.genpicz.errors import render_genpicz
from server.api.genpicz.schemas import (
    Deleted,
    ErrorBody,
    GenerateRequest,
    Generation,
    GenerationList,
    StyleItem,
    StyleList,
)
from server.errors import ApiError, ErrorInfo, FieldError, stored_job_error
from server.jobs import JobService, TaskView
from server.jobs.db import JobRecord
from server.jobs.http import base_url, submit, wait_watching
from server.jobs.store import FINISHED
from server.settings import Settings
from server.styles import StyleBook
from server.thumbnails import KEY_CHARS, Thumbnails

THUMBNAIL_KEY = re.compile(rf"[0-9a-f]{{{KEY_CHARS}}}")
IMMUTABLE = "public, max-age=31536000, immutable"  # an address always serves the same picture
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_PAGE = 1_000_000
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (403, "plan_not_allowed: `upscale` needs the Studio plan (genpicz_upscale_all_plans opens it)"),
        (404, "not_found"),
        (422, "invalid_request: `param` names the field"),
        (429, "rate_limit_exceeded: the queue is full; retry after `Retry-After` seconds"),
        (500, "generation_failed"),
        (504, "timeout: the image was not ready within sync_timeout_s; poll GET /v1/generations/{generation_id}"),
    )
}


def _thumbnails(request: Request) -> Thumbnails:
    state = request.app.state
    if getattr(state, "thumbnails", None) is None:
        state.thumbnails = Thumbnails(state.settings, state.registry, state.styles)
    return state.thumbnails


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


def _not_found(gen_id: str) -> ApiError:
    return ApiError(404, f"generation '{gen_id}' not found (unknown, deleted or expired)", code="not_found")


def _wire_field(error: BaseException) -> BaseException:
    """Engine refusals name GenerationRequest fields; name the field the client sent."""
    if isinstance(error, InvalidRequest) and error.field in adapter.WIRE_FIELDS:
        return InvalidRequest(adapter.WIRE_FIELDS[error.field], error.message)
    return error


def _body(jobs: JobService, record: JobRecord, base: str) -> dict[str, Any]:
    """The GenPicz body of a record: live status for unfinished jobs, resolved image URL for completed ones."""
    status = record.status
    if status not in FINISHED:
        view = jobs.task_by_id(record.id)
        if view is not None:
            record, status = view.record, view.status
    result = jobs.result_body(record, base) if status == "completed" else None
    return adapter.generation_body(record, status, result)


def _find(request: Request, jobs: JobService, gen_id: str) -> TaskView:
    address = adapter.task_address_of(gen_id)
    view = jobs.task(address) if address else None
    if view is None or view.record.dialect != adapter.DIALECT or not can_see(request, view.record.owner):
        raise _not_found(gen_id)
    return view


def _timeout(request: Request, gen_id: str, timeout_s: float) -> JSONResponse:
    url = f"{base_url(request)}/v1/generations/{gen_id}"
    message = (
        f"the image was not ready within {timeout_s:g} s (sync_timeout_s); it is still being made: "
        f"poll GET {url}, or pass webhook_url to be called when it is done"
    )
    body = render_genpicz(ErrorInfo(504, message, "Timeout", "timeout"))
    body["error"]["generation_id"] = gen_id
    return JSONResponse(body, status_code=504, headers={"Location": url})


def _list_page(
    jobs: JobService, base: str, owner: str | None, limit: int, cursor: str | None, page: int | None
) -> dict[str, Any]:
    after = adapter.decode_cursor(cursor) if cursor is not None else None
    offset = (page - 1) * limit if page else 0
    # One more than asked for: whether there is a next page, without a second query.
    records = jobs.list_jobs(dialect=adapter.DIALECT, owner=owner, limit=limit + 1, offset=offset, after=after)
    has_more = len(records) > limit
    records = records[:limit]
    return {
        "data": [_body(jobs, record, base) for record in records],
        "total": jobs.count_jobs(dialect=adapter.DIALECT, owner=owner),
        "limit": limit,
        "has_more": has_more,
        "next_cursor": adapter.encode_cursor(records[-1]) if has_more and records else None,
        "page": None if cursor is not None else (page or 1),
    }


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["genpicz"])

    @router.post("/generate", response_model=Generation, responses=ERRORS)
    async def generate(request: Request, body: GenerateRequest) -> Response:
        """Generate an image from a prompt and wait for it: `image_url` is served by this server."""
        settings: Settings = request.app.state.settings
        ctx = adapter.Context(request.app.state.registry, settings, request.app.state.styles)
        adapter.check_upscale_plan(body, current(request), settings)
        spec = adapter.plan_generation(body, ctx)
        try:
            ticket = await submit(request, spec)
        except InvalidRequest as e:
            raise _wire_field(e) from None
        gen_id = adapter.ID_PREFIX + ticket.task_address
        try:
            record = await wait_watching(request, ticket, settings.sync_timeout_s)
        except TimeoutError:
            return _timeout(request, gen_id, settings.sync_timeout_s)
        if record.status != "completed":
            if ticket.handle.error is not None:
                raise _wire_field(ticket.handle.error)
            raise stored_job_error(record.error_code, record.error)
        return JSONResponse(await run_in_threadpool(_body, _jobs(request), record, base_url(request)))

    @router.get("/generations/{generation_id}", response_model=Generation, responses=ERRORS)
    async def get_generation(request: Request, generation_id: str) -> Response:
        """A generation in any state: queued, processing, completed (with image_url) or failed (with error)."""
        jobs, base = _jobs(request), base_url(request)

        def read() -> dict[str, Any]:
            return _body(jobs, _find(request, jobs, generation_id).record, base)

        return JSONResponse(await run_in_threadpool(read))

    @router.delete("/generations/{generation_id}", response_model=Deleted, responses=ERRORS)
    async def delete_generation(request: Request, generation_id: str) -> Response:
        """Delete the record and its image (the image URL then answers 404)."""
        jobs = _jobs(request)

        def delete() -> None:
            if not jobs.delete(_find(request, jobs, generation_id).record.id):
                raise _not_found(generation_id)

        await run_in_threadpool(delete)
        return JSONResponse({"deleted": True, "id": generation_id})

    @router.get("/generations", response_model=GenerationList, responses=ERRORS)
    async def list_generations(
        request: Request,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items per page (1-100)"),
        cursor: str | None = Query(None, description="next_cursor of the previous page (newest first)"),
        page: int | None = Query(None, ge=1, le=MAX_PAGE, description="Page number (1-based), instead of cursor"),
    ) -> Response:
        """Generations newest first. Page with `cursor` (stable while new ones arrive) or `page`."""
        if cursor is not None and page is not None:
            raise ApiError.invalid([FieldError("cursor", "give either cursor or page, not both")])
        jobs, base = _jobs(request), base_url(request)
        return JSONResponse(await run_in_threadpool(_list_page, jobs, base, owner_filter(request), limit, cursor, page))

    @router.get("/styles", response_model=StyleList)
    async def styles(request: Request) -> StyleList:
        """The style presets `style` accepts, each with an example thumbnail's URL."""
        book: StyleBook = request.app.state.styles
        urls = _thumbnails(request).urls(base_url(request))
        items = [StyleItem(id=s.id, name=s.name, description=s.description, thumbnail_url=urls[s.id]) for s in book]
        return StyleList(styles=items)

    @router.get(
        "/style-thumbnails/{name}",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}, 404: ERRORS[404]},
    )
    async def style_thumbnail(request: Request, name: str) -> Response:
        """A style's example thumbnail (the URL GET /v1/styles gives). Public; the first fetch makes it."""
        key = name.removesuffix(".png")
        if not THUMBNAIL_KEY.fullmatch(key) or not name.endswith(".png"):
            raise ApiError(404, f"no style thumbnail '{name}'", code="not_found")
        engine = request.app.state.engine
        if engine is None:
            raise EngineNotReady("the engine is starting; retry shortly")
        path = await _thumbnails(request).get(key, engine)
        if path is None:
            raise ApiError(
                404, f"no style thumbnail '{name}' (unknown, or its style or model changed)", code="not_found"
            )
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": IMMUTABLE})

    return router
