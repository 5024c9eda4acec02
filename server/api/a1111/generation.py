"""txt2img / img2img: validate, decode, submit, wait, encode. CPU-heavy steps run in the threadpool."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from pipelines.engine_api import EngineClient
from pipelines.errors import EngineNotReady, InvalidRequest
from pipelines.request import GenerationResult
from server.access.principal import job_owner
from server.api.a1111 import adapter
from server.api.a1111.adapter import InputImages, Prepared
from server.api.a1111.schemas import GenerationBase, Img2ImgRequest, Txt2ImgRequest
from server.api.a1111.state import A1111State
from server.errors import ApiError
from server.images import b64, decode_image, encode_image
from server.jobs import JobSpec, StoredImage
from server.jobs.http import accepted, cancel_on_disconnect, submit
from server.settings import Settings
from server.timing import record_engine

log = logging.getLogger("easel.a1111")

# The gateway's documented default checkpoint for /v2/automatic1111/sdapi/v1/txt2img (any models.yaml alias).
GATEWAY_DEFAULT_MODEL = "Realistic_Vision_V5.1.safetensors"
ASYNC_ROUTE = "txt2img"  # the job record's route (and result_ttl_s_by_route key) of async gateway txt2img


def require_engine(request: Request) -> EngineClient:
    engine = request.app.state.engine
    if engine is None:
        raise EngineNotReady(
            getattr(request.app.state, "engine_error", None) or "the engine is starting; retry shortly"
        )
    return engine


def ignored_features(body: GenerationBase) -> list[str]:
    """A1111 features accepted for compatibility but not applied (yet); logged so a surprised user can find out."""
    checks = {
        "restore_faces": body.restore_faces,
        "tiling": body.tiling,
        "subseed_strength (variation seeds)": body.subseed_strength,
        "refiner_checkpoint": body.refiner_checkpoint,
    }
    return [name for name, value in checks.items() if value]


def preview_interval(options: dict[str, Any]) -> int:
    """Steps between live previews from A1111's options (0: none)."""
    try:
        every = int(options.get("show_progress_every_n_steps") or 0)
    except (TypeError, ValueError):
        return 0
    return every if options.get("live_previews_enable") and every > 0 else 0


def decode_inputs(body: Img2ImgRequest, settings: Settings, background: str) -> InputImages:
    """Decode init_images and mask, refusing corrupt or oversized data with the field named."""
    limits = {"max_bytes": settings.max_body_bytes, "max_pixels": settings.max_image_pixels}
    images = []
    for i, data in enumerate(body.init_images or []):
        try:
            img = decode_image(data, "init_images", **limits)
        except ApiError as e:
            raise ApiError(
                e.status, e.message.replace("init_images:", f"init_images[{i}]:", 1), field="init_images", code=e.code
            ) from None
        images.append(adapter.flatten_rgb(img, background))
    mask = None
    if body.mask:
        mask = adapter.binary_mask(decode_image(body.mask, "mask", **limits), body.mask_round)
    return InputImages(images, mask)


def _engine_field(e: InvalidRequest, model_field: str | None) -> InvalidRequest:
    """Rename the engine's field to the A1111 one the client sent."""
    if e.field == "model":
        name = model_field or "sd_model_checkpoint"
    else:
        name = adapter.ENGINE_FIELD_NAMES.get(e.field, e.field)
    return e if name == e.field else InvalidRequest(name, e.message)


async def prepare(request: Request, body: GenerationBase, state: A1111State) -> tuple[Prepared, str | None]:
    settings: Settings = request.app.state.settings
    default = GATEWAY_DEFAULT_MODEL if request.url.path.startswith("/v2/") else None
    choice = adapter.choose_model(body, state.registry, state.current_model, default)
    errors = adapter.check_request(body, settings, choice.spec)
    if errors:
        raise ApiError.invalid(errors)
    if ignored := ignored_features(body):
        log.info("%s: not applied: %s", request.url.path, ", ".join(ignored))
    prompts = adapter.apply_styles(body, request.app.state.styles)
    if prompts.unknown:  # A1111 skips unknown style names silently; the log at least says so
        log.warning("%s: unknown styles ignored: %s", request.url.path, ", ".join(prompts.unknown))

    images = None
    extra: dict[str, Any] = {}
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise ApiError(404, "Init image not found", field="init_images", code="init_image_not_found")
        background = str(state.options.get("img2img_background_color") or "#ffffff")
        images = await run_in_threadpool(decode_inputs, body, settings, background)
        extra = adapter.img2img_extra_params(body, images.mask is not None)
    elif isinstance(body, Txt2ImgRequest):
        extra = adapter.txt2img_extra_params(body, choice.spec)

    request = adapter.to_generation_request(body, choice.spec, images, prompts)
    request.preview_every = preview_interval(state.options)
    prep = Prepared(
        body=body,
        spec=choice.spec,
        request=request,
        job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
        extra_generation_params=extra,
        subseed=adapter.resolve_subseed(body.subseed),
    )
    return prep, choice.field


async def run(request: Request, body: GenerationBase, state: A1111State) -> dict[str, Any]:
    """The whole synchronous A1111 call; the job keeps running if the wait times out (504)."""
    settings: Settings = request.app.state.settings
    engine = require_engine(request)
    prep, model_field = await prepare(request, body, state)
    owner = job_owner(request)
    prep.request.tags["owner"] = owner
    accounting = request.app.state.jobs.accounting
    credits = await run_in_threadpool(accounting.charge, owner, prep.request.total_images) if accounting else 0
    try:
        job = engine.submit(prep.request)
        async with cancel_on_disconnect(request, job.cancel):  # a client that hung up wants no images
            result = await job.wait(timeout=settings.sync_timeout_s)
        record_engine(result.timings)
    except InvalidRequest as e:
        await run_in_threadpool(refund, accounting, owner, credits)
        raise _engine_field(e, model_field) from None
    except TimeoutError:
        raise ApiError(
            504,
            f"the job did not finish within sync_timeout_s={settings.sync_timeout_s:g} s; it keeps running "
            "(watch /sdapi/v1/progress, stop it with /sdapi/v1/interrupt)",
            code="timeout",
        ) from None
    except BaseException:
        await run_in_threadpool(refund, accounting, owner, credits)
        raise
    if accounting:
        await run_in_threadpool(accounting.count_images, owner, len(result.images))

    keep_overrides(body, state, prep, model_field)
    return await run_in_threadpool(render, prep, result, dict(state.options), settings.a1111_version)


def refund(accounting: Any, owner: str | None, credits: int) -> None:
    if accounting is not None:
        accounting.refund(owner, credits)


def keep_overrides(body: GenerationBase, state: A1111State, prep: Prepared, model_field: str | None) -> None:
    if not body.override_settings_restore_afterwards and body.override_settings:
        # A1111 keeps the overrides as the new options when asked not to restore them.
        if model_field == "override_settings.sd_model_checkpoint":
            state.current_model_id = prep.spec.id
        state.store_options(body.override_settings)


async def run_async(request: Request, body: GenerationBase, state: A1111State) -> JSONResponse:
    """`"async": true` (gateway copy): a recorded job, answered 202 with its task address at once.

    GET /v2/tasks/{task_address} then returns, as `result`, the body the synchronous call would have returned.
    """
    settings: Settings = request.app.state.settings
    require_engine(request)
    prep, model_field = await prepare(request, body, state)
    options, version = dict(state.options), settings.a1111_version

    def render_body(result: GenerationResult, _images: list[StoredImage]) -> dict[str, Any]:
        return render(prep, result, options, version)

    spec = JobSpec(
        request=prep.request,
        dialect="a1111",
        route=ASYNC_ROUTE,
        request_json=adapter.echo_parameters(body),
        render=render_body,
        store_images=False,  # A1111 answers base64 with infotext; the body carries them
        ttl_s=settings.result_ttl_for(ASYNC_ROUTE),
    )
    try:
        ticket = await submit(request, spec)
    except InvalidRequest as e:
        raise _engine_field(e, model_field) from None
    keep_overrides(body, state, prep, model_field)
    return accepted(request, ticket)


def render(prep: Prepared, result: GenerationResult, options: dict[str, Any], version: str | None) -> dict[str, Any]:
    """The A1111 response: encoded images (grid first when A1111 would add one), echo, info JSON."""
    text_opts = adapter.InfotextOptions.from_options(options)
    seeds = adapter.all_seeds(result, prep.request.seed, prep.request.total_images)
    images: list[Image.Image] = list(result.images)
    infotexts = [
        adapter.image_infotext(prep, result, seeds[i] if i < len(seeds) else prep.request.seed, text_opts, version)
        for i in range(len(images))
    ]
    index_of_first_image = 0
    if adapter.wants_grid(prep.body, len(images), options):
        images.insert(0, adapter.image_grid(images, prep.request.batch_size, int(options.get("n_rows", -1))))
        infotexts.insert(0, infotexts[0])  # A1111 uses the main prompt and first seed for the grid
        index_of_first_image = 1

    encoded: list[str] = []
    if prep.body.send_images:
        fmt = str(options.get("samples_format") or "png").lower()
        fmt = fmt if fmt in ("png", "jpg", "jpeg", "webp") else "png"
        quality = int(options.get("jpeg_quality", 80))
        with_info = bool(options.get("enable_pnginfo", True))
        for img, text in zip(images, infotexts, strict=True):
            encoded.append(b64(encode_image(img, fmt, quality, text if with_info else None)))
    return {
        "images": encoded,
        "parameters": adapter.echo_parameters(prep.body),
        "info": adapter.build_info(prep, result, infotexts, index_of_first_image, version),
    }
