"""POST /image/create (answers at once with the image id; the job runs in the background) and
GET /image/status/{uuid}; both also under /v1."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import InvalidRequest
from server.access.principal import can_see
from server.api.genrex import adapter
from server.api.genrex.schemas import CreateImageRequest, CreateImageResponse, ImageStatusResponse
from server.errors import ApiError
from server.jobs.http import base_url, submit

PREFIXES = ("", "/v1")


def _not_found(image_id: str) -> ApiError:
    return ApiError(404, f"image '{image_id}' not found (unknown, or expired and deleted)", code="image_not_found")


def build_router(prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["genrex"])

    @router.post("/image/create", response_model=CreateImageResponse)
    async def create_image(request: Request, body: CreateImageRequest) -> Response:
        """Queue an image; poll GET /image/status/{id} for its URL."""
        state = request.app.state
        spec = adapter.plan(body, adapter.Context(state.registry, state.settings, state.styles))
        try:
            ticket = await submit(request, spec)
        except InvalidRequest as e:  # the engine names GenerationRequest fields; the client needs its own
            raise InvalidRequest(adapter.WIRE_FIELDS.get(e.field, e.field), e.message) from None
        return JSONResponse({"success": True, "id": adapter.public_id(ticket.job_id)})

    @router.get("/image/status/{image_id}", response_model=ImageStatusResponse)
    async def image_status(request: Request, image_id: str) -> Response:
        """queued, processing, completed (with `data.url`) or failed (with `error`)."""
        jobs = request.app.state.jobs
        job_id = adapter.job_id_of(image_id)
        view = await run_in_threadpool(jobs.task_by_id, job_id) if job_id else None
        # Another key's images answer 404 too: their ids must not even be confirmed to exist.
        if view is None or view.record.dialect != adapter.DIALECT or not can_see(request, view.record.owner):
            raise _not_found(image_id)
        result = None
        if view.status == "completed":
            result = await run_in_threadpool(jobs.result_body, view.record, base_url(request))
        return JSONResponse(adapter.status_body(view, result))

    return router
