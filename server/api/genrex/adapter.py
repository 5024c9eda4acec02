"""Genrex wire request -> `JobSpec`, and a job record -> Genrex's status body.

The tier picks the model (models.yaml `routes: genrex-basic|standard|advanced`), the named size the output size,
`quality` the steps (a factor of the model's default steps, `genrex_quality_steps`), and the style preset
(styles.yaml) rewrites the prompt before it reaches the engine; the job records the style and the final prompt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult
from server.api.background import check_transparent_background
from server.api.gateway import sizes
from server.api.gateway.adapter import RANDOM_SEED, require_text_to_image, route_model
from server.api.genrex.schemas import CreateImageRequest
from server.errors import ApiError, FieldError
from server.jobs import JobSpec, StoredImage, TaskView
from server.settings import Settings
from server.styles import StyleBook
from server.webhooks.policy import check_webhook_url

DIALECT = "genrex"
SIZES = {"landscape": (1536, 1024), "square": (1024, 1024), "portrait": (1024, 1536), "auto": (1536, 1024)}
# The job store's states -> Genrex's: a running job is "processing", a cancelled one "failed".
STATUSES = {"queued": "queued", "running": "processing", "completed": "completed", "failed": "failed"}
# GenerationRequest fields the engine may name -> the wire field the client sent.
WIRE_FIELDS = {"width": "size", "height": "size", "steps": "quality", "prompt": "prompt", "model": "model"}


@dataclass(frozen=True)
class Context:
    registry: Registry
    settings: Settings
    styles: StyleBook


def _invalid(field: str, message: str) -> ApiError:
    return ApiError.invalid([FieldError(field, message)])


def tier_route(tier: str) -> str:
    return f"genrex-{tier}"


def quality_steps(quality: str, spec: ModelSpec, settings: Settings) -> int:
    factor = settings.genrex_quality_steps.get(quality, 1.0)
    return max(1, min(round(spec.defaults.steps * factor), settings.max_steps))


def _recorded(body: CreateImageRequest, prompt: str, negative: str) -> dict[str, Any]:
    """The wire request and the final prompts the style made. The webhook URL is on the record
    (JobSpec.webhook_url), not copied here: it may carry a secret."""
    data = body.model_dump(mode="json", exclude={"webhook_url"})
    data.update(final_prompt=prompt, final_negative_prompt=negative)
    return data


def render(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    return {"url": images[0].as_url()}


def plan(body: CreateImageRequest, ctx: Context) -> JobSpec:
    settings = ctx.settings
    if len(body.prompt) > settings.max_prompt_chars:
        raise _invalid("prompt", f"longer than max_prompt_chars={settings.max_prompt_chars}")
    style = ctx.styles.get(body.style)
    if style is None:
        raise _invalid("style", f"unknown style '{body.style}'; use one of: {', '.join(ctx.styles.ids())}")
    route = tier_route(body.model)
    spec = route_model(ctx.registry, route)
    require_text_to_image(spec, route)
    width, height = SIZES[body.size]
    sizes.check_size(width, height, spec, settings)
    transparent = check_transparent_background(
        body.background, body.format, spec, ctx.registry, settings, format_field="format"
    )
    webhook_url = check_webhook_url(body.webhook_url or None, settings)
    prompt, negative = style.apply(body.prompt)
    request = GenerationRequest(
        model=spec.id,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=quality_steps(body.quality, spec, settings),
        guidance=spec.defaults.cfg,
        seed=RANDOM_SEED,
        tags={"dialect": DIALECT, "route": route, "style": style.id},
        transparent_background=transparent,
    )
    return JobSpec(
        request=request,
        dialect=DIALECT,
        route=route,
        request_json=_recorded(body, prompt, negative),
        render=render,
        output_format=body.format,
        ttl_s=settings.result_ttl_for(route),
        webhook_url=webhook_url,
    )


# Ids and status ----------------------------------------------------------------------------------------------------


def public_id(job_id: str) -> str:
    """The job id (32 hex digits) as the dashed UUID Genrex clients see."""
    return str(uuid.UUID(job_id))


def job_id_of(public: str) -> str | None:
    """The job id a public id names, or None if it is not a UUID."""
    try:
        return uuid.UUID(public.strip()).hex
    except ValueError:
        return None


def status_body(view: TaskView, result: dict[str, Any] | None) -> dict[str, Any]:
    record = view.record
    status = STATUSES.get(view.status, "failed")
    body: dict[str, Any] = {"success": True, "id": public_id(record.id), "status": status, "data": None}
    if status == "completed" and result is not None:
        body["data"] = {"url": result["url"]}
    elif status == "failed":
        message = record.error or ("the image was cancelled" if view.status == "cancelled" else "generation failed")
        body["error"] = {"code": record.error_code or "generation_failed", "message": message}
    return body
