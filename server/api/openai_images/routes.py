"""`POST /v1/images/generations`, `/edits`, `/variations`, `GET /v1/models`, `GET /v1/models/{id}`.

Calls are synchronous, as OpenAI's: the job runs through the JobService (recorded, result files stored, so `url`
responses are this server's /v2/results URLs) and the answer is the stored body. A call that outlives
`sync_timeout_s` answers 504 naming the task address; the job goes on and GET /v2/tasks/{address} has its result.
With `stream: true` the answer is OpenAI's event stream (server.api.openai_images.streaming).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import EngineError, InvalidRequest
from pipelines.registry import ModelSpec, Registry
from server import imagework
from server.api.gateway.adapter import Context
from server.api.model_names import resolve_name
from server.api.openai_images import adapter
from server.api.openai_images.multipart import MAX_FIELDS, MAX_FILES, read_edit_form, read_variation_form
from server.api.openai_images.schemas import (
    ErrorResponse,
    GenerateRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    edit_form_openapi,
    variation_form_openapi,
)
from server.api.openai_images.streaming import stream_plan
from server.errors import ApiError, stored_job_error
from server.jobs import get_job_service
from server.jobs.http import base_url, submit, task_url, wait_watching

OWNER = "easel"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # A1111 file-name aliases are not listed
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid input; `param` names the field"},
    404: {"model": ErrorResponse, "description": "Unknown model (`code`: model_not_found)"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after `Retry-After` seconds"},
    504: {"model": ErrorResponse, "description": "Not ready within sync_timeout_s; the message names the task"},
}


def _context(request: Request) -> Context:
    return Context(request.app.state.registry, request.app.state.settings)


async def run_plan(request: Request, plan: adapter.Plan) -> Response:
    """Submit, wait, answer with the stored body; engine errors about internal fields name the wire field. With
    `stream`, the answer is OpenAI's event stream instead."""
    if plan.stream:
        return await stream_plan(request, plan)
    jobs = get_job_service(request)
    try:
        ticket = await submit(request, plan.spec)
    except InvalidRequest as e:
        raise InvalidRequest(plan.wire_field(e.field), e.message) from None
    timeout_s = request.app.state.settings.sync_timeout_s
    try:
        record = await wait_watching(request, ticket, timeout_s)
    except TimeoutError:
        url = task_url(request, ticket.task_address)
        message = (
            f"the image was not ready within {timeout_s:g} s (sync_timeout_s); it is still being made: "
            f"GET {url} returns it when done"
        )
        raise ApiError(504, message, code="timeout", headers={"Location": url}) from None
    if record.status != "completed":
        error = ticket.handle.error
        if isinstance(error, InvalidRequest):
            raise InvalidRequest(plan.wire_field(error.field), error.message) from None
        if isinstance(error, EngineError):  # queue full, cancelled, generation failed...: their own status
            raise error
        raise stored_job_error(record.error_code, record.error)
    body = await run_in_threadpool(jobs.result_body, record, base_url(request))
    return JSONResponse(body)


# Models ------------------------------------------------------------------------------------------------------------


def _created(spec: ModelSpec, registry: Registry) -> int:
    """Unix time of the weights (a file or folder), else of models.yaml; 0 if neither can be read."""
    for path in (None if spec.is_demo else spec.source, registry.source):
        if path is None:
            continue
        try:
            return int(os.stat(path).st_mtime)
        except OSError:
            continue
    return 0


def model_cards(registry: Registry) -> Iterator[ModelCard]:
    """Every model id, then its aliases that are model names (OpenAI names such as gpt-image-1), not file names."""
    for spec in registry:
        created = _created(spec, registry)
        yield ModelCard(id=spec.id, created=created, owned_by=OWNER, root=spec.id)
        for alias in spec.aliases:
            if not alias.lower().endswith(CHECKPOINT_SUFFIXES):
                yield ModelCard(id=alias, created=created, owned_by=OWNER, root=spec.id)


def find_card(registry: Registry, name: str) -> ModelCard:
    cards = {card.id.lower(): card for card in model_cards(registry)}
    card = cards.get(name.lower())
    if card is None:
        spec = resolve_name(registry, name).spec  # a hash, an A1111 title or `provider/name` also names a model
        if spec is None:
            raise ApiError(404, f"The model '{name}' does not exist", field="model", code="model_not_found")
        card = cards[spec.id.lower()]
    return card


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.post("/images/generations", response_model=ImagesResponse, responses=ERRORS)
    async def generations(request: Request, body: GenerateRequest) -> Response:
        """OpenAI `images.generate`: text to image on a local model. Extensions: `negative_prompt`, `seed`, `steps`,
        `guidance_scale`."""
        plan = await run_in_threadpool(adapter.generation_plan, body, _context(request))
        return await run_plan(request, plan)

    @router.post("/images/edits", response_model=ImagesResponse, responses=ERRORS, openapi_extra=edit_form_openapi())
    async def edits(request: Request) -> Response:
        """OpenAI `images.edit` (multipart): `image` (one or several; `image[]`), optional `mask` whose transparent
        pixels mark the area to edit. Same extensions as generations."""
        async with request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS) as form:
            parsed = await read_edit_form(form, request.headers.get("content-type"))
        ctx = _context(request)

        def planned() -> adapter.Plan:
            # Decoding and stitching under the preparation limit; large inputs leave it resized to the output.
            plan = adapter.edit_plan(parsed.fields, parsed.images, parsed.mask, ctx)
            try:
                plan.spec.request = imagework.checked_and_presized(ctx.settings, plan.spec.request)
            except InvalidRequest as e:
                raise InvalidRequest(plan.wire_field(e.field), e.message) from None
            return plan

        plan = await imagework.prepare(request, planned)
        return await run_plan(request, plan)

    @router.post(
        "/images/variations", response_model=ImagesResponse, responses=ERRORS, openapi_extra=variation_form_openapi()
    )
    async def variations(request: Request) -> Response:
        """OpenAI `images.create_variation` (multipart): `image`, `n`, `size`, `response_format`, `model`, `user`.
        Image-to-image from the image on the generations model; extensions `prompt`, `negative_prompt`, `seed`,
        `steps`, `guidance_scale`, `strength`."""
        async with request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS) as form:
            parsed = await read_variation_form(form, request.headers.get("content-type"))
        plan = await run_in_threadpool(adapter.variation_plan, parsed.fields, parsed.image, _context(request))
        return await run_plan(request, plan)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """The image models: models.yaml ids and the model-name aliases that map to them."""
        return ModelList(data=list(model_cards(request.app.state.registry)))

    @router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: ERRORS[404]})
    async def get_model(request: Request, model_id: str) -> ModelCard:
        return find_card(request.app.state.registry, model_id)

    return router
