"""`/v2/image/*`: FLUX, Qwen, GPT-Image and Gemini routes served by the local models models.yaml maps them to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from pipelines.errors import InvalidRequest
from server import imagework
from server.api.gateway import adapter
from server.api.gateway.schemas import (
    FluxRequest,
    GatewayRequest,
    GeminiRequest,
    GptImageEditRequest,
    GptImageRequest,
    ImagesResponse,
    QwenEditRequest,
    QwenRequest,
    UrlsResponse,
)
from server.api.gateway.submit import run_job, wire_field
from server.jobs.http import TaskAccepted

Body = TypeVar("Body", bound=GatewayRequest)
ASYNC_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {"model": TaskAccepted, "description": '`"async": true`: poll `poll_url` (GET /v2/tasks/{task_address})'},
    504: {"description": "not ready within sync_timeout_s: the error names the task address to poll"},
}


async def _run(request: Request, body: Body, plan_for: Callable[[Body, adapter.Context], adapter.Plan]) -> Response:
    ctx = adapter.Context(request.app.state.registry, request.app.state.settings)

    def planned() -> adapter.Plan:
        # Decodes (and may fetch) images: under the preparation limit, off the loop; large inputs leave it resized.
        plan = plan_for(body, ctx)
        try:
            plan.spec.request = imagework.checked_and_presized(ctx.settings, plan.spec.request)
        except InvalidRequest as e:
            raise wire_field(e, plan) from None
        return plan

    plan = await imagework.prepare(request, planned)
    return await run_job(request, plan, body.async_)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2/image", tags=["gateway"])

    @router.post("/flux/generate", response_model=ImagesResponse, responses=ASYNC_RESPONSE)
    async def flux_generate(request: Request, body: FluxRequest) -> Response:
        """FLUX: text to image; `input_image`..`input_image_4` as references. `images`: base64."""
        return await _run(request, body, adapter.flux)

    @router.post("/qwen/generate", response_model=UrlsResponse, responses=ASYNC_RESPONSE)
    async def qwen_generate(request: Request, body: QwenRequest) -> Response:
        """Qwen-Image: text to image. `urls`: served by this server, expiring after 7 days (configurable)."""
        return await _run(request, body, adapter.qwen)

    @router.post("/qwen/edit", response_model=UrlsResponse, responses=ASYNC_RESPONSE)
    async def qwen_edit(request: Request, body: QwenEditRequest) -> Response:
        """Qwen-Image-Edit: edit `image` (http(s) URL or base64) by instruction. `urls` as for generate."""
        return await _run(request, body, adapter.qwen_edit)

    @router.post("/gpt-image/generate", response_model=ImagesResponse, responses=ASYNC_RESPONSE)
    async def gpt_image_generate(request: Request, body: GptImageRequest) -> Response:
        """GPT-Image style: fixed sizes, `quality` -> steps, `n` images. `images`: URLs."""
        return await _run(request, body, adapter.gpt_image)

    @router.post("/gpt-image/edit", response_model=ImagesResponse, responses=ASYNC_RESPONSE)
    async def gpt_image_edit(request: Request, body: GptImageEditRequest) -> Response:
        """Edit `image`; with `mask` (white = edit area) only that area changes. `images`: URLs."""
        return await _run(request, body, adapter.gpt_image_edit)

    @router.post("/gemini-3/generate", response_model=ImagesResponse, responses=ASYNC_RESPONSE)
    async def gemini_generate(request: Request, body: GeminiRequest) -> Response:
        """Gemini style: `aspect_ratio` and `image_size` (1K/2K/4K) pick the size. `images`: base64."""
        return await _run(request, body, adapter.gemini)

    return router
