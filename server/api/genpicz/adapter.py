"""GenPicz wire request -> `JobSpec`, and job records -> GenPicz bodies. Pure functions, no I/O.

The model is the one models.yaml's `routes: genpicz` names; guidance is its default, `quality` scales its default
steps. The style preset is applied to the prompt before the engine sees it, and the job's `request_json` records
the wire request plus the prompts the engine got.

The stored result body (what `/v2/tasks` shows as `result`) holds what only the finished job knows (image URL,
size, seed); `generation_body` adds what the record knows (id, status, style, created_at), so a queued, running,
failed or completed job answers in the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult
from server.access.principal import Principal
from server.api.gateway.adapter import require_text_to_image, route_model, seed_of
from server.api.gateway.sizes import check_size
from server.api.genpicz.schemas import GenerateRequest
from server.errors import ApiError, FieldError
from server.jobs import JobSpec, StoredImage, cursors
from server.jobs.db import JobRecord
from server.settings import Settings
from server.styles import Style, StyleBook
from server.upscale import upscaler
from server.webhooks.policy import check_webhook_url

DIALECT = "genpicz"
ROUTE = "genpicz"  # models.yaml `routes:` key, job route and result_ttl_s_by_route key
ID_PREFIX = "gen_"
AUTO_STYLE = "auto"
UPSCALE_FACTOR = 4
UPSCALE_PLAN = "studio"  # seed 001: "Upscale output to 4x resolution. Studio plan only."
CREDITS_PER_IMAGE = 1
# Job statuses -> GenPicz statuses. A cancelled job (only a shutdown or a delete cancels one) reads as failed.
STATUSES = {"queued": "queued", "running": "processing", "completed": "completed", "failed": "failed"}
# GenerationRequest field -> the wire field, for engine refusals.
WIRE_FIELDS = {"steps": "quality", "guidance": "quality"}


@dataclass(frozen=True)
class Context:
    registry: Registry
    settings: Settings
    styles: StyleBook


# Request -----------------------------------------------------------------------------------------------------------


def resolve_style(style_id: str, styles: StyleBook) -> Style | None:
    """The preset, or None for `auto` when styles.yaml does not define it (auto means "as written")."""
    style = styles.get(style_id)
    if style is None and style_id != AUTO_STYLE:
        known = ", ".join(styles.ids()) or "none defined"
        raise ApiError.invalid([FieldError("style", f"unknown style '{style_id}'; one of: {known} (GET /v1/styles)")])
    return style


def quality_steps(quality: str, spec: ModelSpec, settings: Settings) -> int:
    """quality -> steps: the model's default steps times the configured factor, within 1..max_steps."""
    factor = settings.genpicz_quality_steps.get(quality, 1.0)
    return max(1, min(round(spec.defaults.steps * factor), settings.max_steps))


def check_upscale(body: GenerateRequest, settings: Settings) -> None:
    if not body.upscale:
        return
    width, height = body.width * UPSCALE_FACTOR, body.height * UPSCALE_FACTOR
    if width * height > settings.genpicz_max_upscaled_pixels:
        raise ApiError.invalid(
            [
                FieldError(
                    "upscale",
                    f"{UPSCALE_FACTOR}x of {body.width}x{body.height} is {width}x{height} = {width * height} pixels, "
                    f"above this server's genpicz_max_upscaled_pixels={settings.genpicz_max_upscaled_pixels}; "
                    "ask for a smaller size or leave upscale off",
                )
            ]
        )


def check_upscale_plan(body: GenerateRequest, principal: Principal | None, settings: Settings) -> None:
    """403 naming `upscale` for a key whose plan is not Studio (unless genpicz_upscale_all_plans). An open server has
    no plans, and an admin key may do anything."""
    if not body.upscale or settings.genpicz_upscale_all_plans or principal is None or principal.admin:
        return
    plan = principal.key.plan if principal.key is not None else "basic"
    if plan != UPSCALE_PLAN:
        message = f"upscale is available on the Studio plan only; this key's plan is '{plan}'"
        raise ApiError(403, message, field="upscale", code="plan_not_allowed")


def plan_generation(body: GenerateRequest, ctx: Context) -> JobSpec:
    """The job for POST /v1/generate. Every refusal is a 422 naming the wire field."""
    spec = route_model(ctx.registry, ROUTE)
    require_text_to_image(spec, ROUTE)
    style = resolve_style(body.style, ctx.styles)
    check_size(body.width, body.height, spec, ctx.settings, ("width", "height"))
    check_upscale(body, ctx.settings)
    webhook_url = check_webhook_url(body.webhook_url, ctx.settings)
    prompt, negative = style.apply(body.prompt, body.negative_prompt) if style else (body.prompt, body.negative_prompt)
    steps = quality_steps(body.quality, spec, ctx.settings)
    request = GenerationRequest(
        model=spec.id,
        prompt=prompt,
        negative_prompt=negative,
        width=body.width,
        height=body.height,
        steps=steps,
        guidance=spec.defaults.cfg,
        seed=seed_of(body.seed),
        tags={"dialect": DIALECT, "route": ROUTE},
    )
    # The webhook URL is on the record (JobSpec.webhook_url); not copied here, it may carry a secret.
    request_json: dict[str, Any] = body.model_dump(exclude={"webhook_url"})
    request_json.update(final_prompt=prompt, final_negative_prompt=negative, steps=steps, model=spec.id)
    return JobSpec(
        request=request,
        dialect=DIALECT,
        route=ROUTE,
        request_json=request_json,
        render=render_result,
        output_format="png",
        ttl_s=ctx.settings.result_ttl_for(ROUTE),
        webhook_url=webhook_url,
        postprocess=upscaler(ctx.settings.genpicz_upscaler, UPSCALE_FACTOR) if body.upscale else None,
    )


# Response ----------------------------------------------------------------------------------------------------------


def render_result(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    """The stored body: what only the finished job knows. `image_url` resolves to an absolute URL when read."""
    image = images[0]
    seed = image.seed if image.seed is not None else (result.seeds[0] if result.seeds else None)
    return {
        "status": "completed",
        "image_url": image.as_url(),
        "width": image.width,
        "height": image.height,
        "seed": seed,
        "credits_used": CREDITS_PER_IMAGE * len(images),
    }


def iso_z(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def generation_id(record: JobRecord) -> str:
    return ID_PREFIX + record.task_address


def task_address_of(gen_id: str) -> str | None:
    """The job's task address, or None if `gen_id` is not a GenPicz id."""
    address = gen_id[len(ID_PREFIX) :] if gen_id.startswith(ID_PREFIX) else ""
    return address or None


def generation_body(record: JobRecord, status: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """The GenPicz body of a job in any state. `status` is the job's (live) status, `result` its resolved body."""
    wire = record.request_json
    factor = UPSCALE_FACTOR if wire.get("upscale") else 1
    done = result if status == "completed" and result else {}
    body: dict[str, Any] = {
        "generation_id": generation_id(record),
        "status": STATUSES.get(status, "failed"),
        "image_url": done.get("image_url"),
        "width": done.get("width", int(wire.get("width", 0)) * factor),
        "height": done.get("height", int(wire.get("height", 0)) * factor),
        "style": wire.get("style", AUTO_STYLE),
        "seed": done["seed"] if done else (record.seeds[0] if record.seeds else wire.get("seed")),
        "created_at": iso_z(record.created_at),
        "credits_used": done.get("credits_used", 0),
    }
    if body["status"] == "failed":
        body["error"] = {
            "code": record.error_code or "generation_failed",
            "message": record.error or "the generation failed",
        }
    return body


# Cursors -----------------------------------------------------------------------------------------------------------

_CURSOR_PREFIX = "c2:"  # versioned, so the encoding can change without misreading old cursors


def encode_cursor(record: JobRecord) -> str:
    return cursors.encode_cursor(record, _CURSOR_PREFIX)


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        return cursors.decode_cursor(cursor, _CURSOR_PREFIX)
    except cursors.BadCursor:
        message = "not a cursor from this API; use next_cursor of a listing"
        raise ApiError.invalid([FieldError("cursor", message)]) from None
