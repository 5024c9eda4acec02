"""IndoxHub wire request -> `JobSpec`, and the finished job -> IndoxHub's response envelope.

There is no upstream provider: every request runs on a local model. `model` names one (an id or alias; IndoxHub's
`provider/name` form resolves the full string first, then the name after the slash, so `openai/dall-e-3` runs the
model that answers to `dall-e-3`); without it, models.yaml's `routes: indoxhub` picks the model.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult
from server.api.background import check_transparent_background
from server.api.gateway import sizes
from server.api.gateway.adapter import EDIT_FAMILIES, require_text_to_image, route_model, seed_of
from server.api.indoxhub.schemas import IndoxHubRequest, parse_aspect_ratio
from server.api.model_names import resolve_name
from server.errors import ApiError, FieldError
from server.jobs import JobSpec, StoredImage
from server.jobs.db import JobRecord
from server.jobs.service import Renderer
from server.settings import Settings
from server.styles import StyleBook

DIALECT = "indoxhub"
ROUTE = "indoxhub"
DEFAULT_PROVIDER = "easel"
OPENAI_STYLES = ("vivid", "natural")  # dall-e-3's styles: accepted, no local equivalent
QUALITY_STEPS_NAME = {"standard": "medium", "hd": "high"}  # dall-e-3 names -> the gpt-image quality table
MAX_LISTED_MODELS = 20
BYOK_MESSAGE = (
    "byok_api_key ignored: this server runs its own models and calls no upstream provider; the key was neither used "
    "nor stored"
)
# GenerationRequest fields the engine may name -> the wire field the client sent.
WIRE_FIELDS = {
    "width": "size",
    "height": "size",
    "batch_size": "n",
    "steps": "quality",
    "guidance": "additional_params.guidance_scale",
    "seed": "additional_params.seed",
    "negative_prompt": "additional_params.negative_prompt",
    "model": "model",
}


@dataclass(frozen=True)
class Context:
    registry: Registry
    settings: Settings
    styles: StyleBook


@dataclass(frozen=True)
class Plan:
    """The job, and what the response envelope echoes."""

    spec: JobSpec
    provider: str
    model: str  # as the client named it (without a provider prefix), or the local id
    ignored: list[str]  # parameters accepted but not applied
    byok_ignored: bool = False  # a byok_api_key came (and went: it is never stored or logged)

    @property
    def message(self) -> str:
        parts = [f"accepted but not applied by this server: {', '.join(self.ignored)}"] if self.ignored else []
        if self.byok_ignored:
            parts.append(BYOK_MESSAGE)
        return "; ".join(parts)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError.invalid([FieldError(field, message)])


# Model -------------------------------------------------------------------------------------------------------------


def resolve_model(name: str | None, registry: Registry) -> tuple[ModelSpec, str, str | None]:
    """(model, the name the response echoes, the provider prefix of `provider/name`, if that is what resolved)."""
    if not name or not name.strip():
        spec = route_model(registry, ROUTE)
        require_text_to_image(spec, ROUTE)
        return spec, spec.id, None
    resolved = resolve_name(registry, name)
    spec, shown, prefix = resolved.spec, resolved.name, resolved.provider
    if spec is None:
        known = sorted(m.id for m in registry)
        listed = ", ".join(known[:MAX_LISTED_MODELS]) + (", ..." if len(known) > MAX_LISTED_MODELS else "")
        message = f"model '{name}' is not served here; models: {listed}"
        raise ApiError(404, message, field="model", code="model_not_found")
    if spec.family in EDIT_FAMILIES:
        raise _invalid("model", f"'{name}' (family {spec.family}) edits images; it cannot generate from text alone")
    return spec, shown, prefix


# Size and steps ----------------------------------------------------------------------------------------------------


def aspect_size(ratio: tuple[int, int], pixels: int, multiple: int, settings: Settings) -> tuple[int, int]:
    """The W:H shape at about `pixels` pixels, each side a multiple of `multiple`, within max_width/max_height
    (scaled down with the ratio kept) and at least the 64-pixel minimum."""
    a, b = ratio
    width = math.sqrt(pixels * a / b)
    height = width * b / a
    scale = min(1.0, settings.max_width / width, settings.max_height / height)

    def fit(value: float, limit: int) -> int:
        lowest = math.ceil(sizes.MIN_SIDE / multiple) * multiple
        return max(lowest, min(round(value * scale / multiple) * multiple, limit // multiple * multiple))

    return fit(width, settings.max_width), fit(height, settings.max_height)


def output_size(body: IndoxHubRequest, spec: ModelSpec, settings: Settings) -> tuple[int, int]:
    """`size` (WxH, checked against the model's multiple and the server caps; `auto`: the model's default size);
    `additional_params.aspect_ratio` then picks the shape at that many pixels."""
    if body.size.strip().lower() == "auto":
        width, height = spec.defaults.width, spec.defaults.height
    else:
        width, height = sizes.parse_wxh(body.size, "size")
        sizes.check_size(width, height, spec, settings)
    ratio = body.additional_params.aspect_ratio
    if ratio is None:
        return width, height
    parsed = parse_aspect_ratio(ratio)
    assert parsed is not None  # the schema validated it
    return aspect_size(parsed, width * height, spec.size_multiple, settings)


def steps_for(quality: str | None, spec: ModelSpec, settings: Settings) -> int:
    """No quality: the model's default steps; else the gpt-image table (standard = medium, hd = high)."""
    if quality is None:
        return spec.defaults.steps
    return sizes.quality_steps(QUALITY_STEPS_NAME.get(quality, quality), spec, settings)


# Plan --------------------------------------------------------------------------------------------------------------


def _check_plain_fields(body: IndoxHubRequest, settings: Settings) -> None:
    if len(body.prompt) > settings.max_prompt_chars:
        raise _invalid("prompt", f"longer than max_prompt_chars={settings.max_prompt_chars}")
    if body.n > settings.max_images_per_request:
        raise _invalid("n", f"{body.n} is above this server's max_images_per_request={settings.max_images_per_request}")


def _styled_prompt(body: IndoxHubRequest, styles: StyleBook, ignored: list[str]) -> tuple[str, str]:
    negative = body.additional_params.negative_prompt or ""
    if body.style is None:
        return body.prompt, negative
    preset = styles.get(body.style)
    if preset is not None:
        return preset.apply(body.prompt, negative)
    if body.style.lower() in OPENAI_STYLES:
        ignored.append(f"style={body.style}")
        return body.prompt, negative
    options = ", ".join([*styles.ids(), *OPENAI_STYLES])
    raise _invalid("style", f"unknown style '{body.style}'; use one of: {options}")


def _renderer(response_format: str) -> Renderer:
    def render(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
        if response_format == "b64_json":
            return {"data": [{"url": None, "b64_json": im.as_base64()} for im in images]}
        return {"data": [{"url": im.as_url(), "b64_json": None} for im in images]}

    return render


def plan(body: IndoxHubRequest, ctx: Context) -> Plan:
    settings = ctx.settings
    _check_plain_fields(body, settings)
    spec, shown_model, prefix = resolve_model(body.model, ctx.registry)
    width, height = output_size(body, spec, settings)
    params = body.additional_params
    transparent = check_transparent_background(
        params.background,
        params.output_format,
        spec,
        ctx.registry,
        settings,
        background_field="additional_params.background",
        format_field="additional_params.output_format",
    )
    ignored = body.ignored()
    prompt, negative = _styled_prompt(body, ctx.styles, ignored)
    guidance = params.guidance_scale if params.guidance_scale is not None else spec.defaults.cfg
    request = GenerationRequest(
        model=spec.id,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps_for(body.quality, spec, settings),
        guidance=guidance,
        seed=seed_of(params.seed),
        batch_size=body.n,
        tags={"dialect": DIALECT, "route": ROUTE},
        transparent_background=transparent,
    )
    recorded = body.model_dump(mode="json", exclude={"byok_api_key"})
    if (prompt, negative) != (body.prompt, params.negative_prompt or ""):
        recorded.update(final_prompt=prompt, final_negative_prompt=negative)
    job = JobSpec(
        request=request,
        dialect=DIALECT,
        route=ROUTE,
        request_json=recorded,
        render=_renderer(body.response_format),
        output_format=params.output_format or "png",
        ttl_s=settings.result_ttl_for(ROUTE),
    )
    if params.output_compression is not None:
        job.quality = params.output_compression
    byok = bool(body.byok_api_key and body.byok_api_key.strip())
    return Plan(job, body.provider or prefix or DEFAULT_PROVIDER, shown_model, ignored, byok)


# Response ----------------------------------------------------------------------------------------------------------


def iso_z(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def response_body(plan: Plan, record: JobRecord, result: dict[str, Any] | None, duration_ms: float) -> dict[str, Any]:
    """The envelope of the document: the job id as `request_id`, no tokens, no cost, latency = duration_ms."""
    return {
        "request_id": str(uuid.UUID(record.id)),
        "created_at": iso_z(record.created_at),
        "duration_ms": duration_ms,
        "provider": plan.provider,
        "model": plan.model,
        "success": True,
        "message": plan.message,
        "data": (result or {}).get("data", []),
        "usage": {"tokens_prompt": 0, "tokens_completion": 0, "tokens_total": 0, "cost": 0.0, "latency": duration_ms},
    }
