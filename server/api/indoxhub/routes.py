"""POST /api/v1/images/generations: synchronous, answered with IndoxHub's envelope once the images exist."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import InvalidRequest
from server.api.indoxhub import adapter
from server.api.indoxhub.schemas import IndoxHubRequest, IndoxHubResponse
from server.errors import ApiError
from server.jobs.http import base_url, run_to_completion

PATH = "/api/v1/images/generations"


def _wire_field(error: InvalidRequest) -> InvalidRequest:
    """The engine names GenerationRequest fields; the client needs the field it sent."""
    return InvalidRequest(adapter.WIRE_FIELDS.get(error.field, error.field), error.message)


def build_router() -> APIRouter:
    router = APIRouter(tags=["indoxhub"])

    @router.post(PATH, response_model=IndoxHubResponse)
    async def generate_images(request: Request, body: IndoxHubRequest) -> Response:
        """Generate images from a prompt on a local model. `data[].url`: served by this server (expiring) or
        `data[].b64_json`, per `response_format`; parameters accepted but not applied are listed in `message`."""
        started = time.perf_counter()
        state = request.app.state
        plan = adapter.plan(body, adapter.Context(state.registry, state.settings, state.styles))
        try:
            record = await run_to_completion(request, plan.spec)
        except InvalidRequest as e:
            raise _wire_field(e) from None
        except TimeoutError:
            message = f"the images were not ready within {state.settings.sync_timeout_s:g} s (sync_timeout_s)"
            raise ApiError(504, message, code="timeout") from None
        result = await run_in_threadpool(state.jobs.result_body, record, base_url(request))
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        return JSONResponse(adapter.response_body(plan, record, result, duration_ms))

    return router
