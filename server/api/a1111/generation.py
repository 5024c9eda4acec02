"""txt2img / img2img: validate, decode, submit, wait, encode. CPU-heavy steps run in the threadpool."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from pipelines import log_context
from pipelines.engine_api import EngineClient, JobHandle, JobStatus
from pipelines.errors import EngineNotReady, InvalidRequest
from pipelines.lora import registry_for
from pipelines.prompts import extract_loras, is_composable, merge_loras
from pipelines.request import GenerationRequest, GenerationResult
from server import imagework
from server.access.principal import job_owner
from server.api.a1111 import adapter, controlnet, controlnet_units, paste, scripts
from server.api.a1111 import options as opts
from server.api.a1111.adapter import InputImages, Prepared
from server.api.a1111.schemas import GenerationBase, Img2ImgRequest, Txt2ImgRequest
from server.api.a1111.state import Session
from server.errors import ApiError, FieldError
from server.images import b64, decode_image, encode_image
from server.jobs import JobSpec, StoredImage
from server.jobs.http import accepted, cancel_on_disconnect, submit
from server.settings import Settings
from server.timing import record_engine

log = logging.getLogger("easel.a1111")

# The gateway's documented default checkpoint for /v2/automatic1111/sdapi/v1/txt2img (any models.yaml alias).
GATEWAY_DEFAULT_MODEL = "Realistic_Vision_V5.1.safetensors"
# The job record's route (and result_ttl_s_by_route key) of async gateway txt2img and img2img.
ASYNC_ROUTE = "txt2img"
ASYNC_IMG2IMG_ROUTE = "img2img"
# Its own infotext key: A1111 reads "Face restoration" back as "restore faces on".
FACE_RESTORATION_KEY = "Face restoration not applied"
FACE_RESTORATION_NOT_APPLIED = "no face-restoration model is installed"
# A1111 `AND` composable prompts need a CFG term per part; SD1.5/SDXL combine them (pipelines.composable).
COMPOSABLE_FAMILIES = frozenset({"sd15", "sdxl"})
COMPOSABLE_KEY = "AND not applied"
COMPOSABLE_NOT_APPLIED = "composable prompts are combined on SD1.5 and SDXL only; the prompt was encoded as one text"


def require_engine(request: Request) -> EngineClient:
    engine = request.app.state.engine
    if engine is None:
        raise EngineNotReady(
            getattr(request.app.state, "engine_error", None) or "the engine is starting; retry shortly"
        )
    return engine


def clip_skip_of(options: dict[str, Any]) -> int:
    """A1111's `CLIP_stop_at_last_layers` (checked 1-12 when set; anything else reads as 1)."""
    try:
        return max(1, int(options.get("CLIP_stop_at_last_layers") or 1))
    except (TypeError, ValueError):
        return 1


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
        if (why := adapter.resize_problem(img.size, (body.width, body.height), body.resize_mode)) is not None:
            raise ApiError(422, f"init_images[{i}]: {why}", field="init_images", code="invalid_request")
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


def face_restoration_requested(body: GenerationBase, options: dict[str, Any]) -> bool:
    """A1111: `restore_faces` when sent, else the `face_restoration` option."""
    return bool(body.restore_faces if body.restore_faces is not None else options.get("face_restoration"))


def missing_loras(prompt: str, lora_dir: Path | None) -> list[str]:
    """The LoRAs the prompt's `<lora:...>` tags name that the Lora folder does not have (all, without a folder)."""
    names = [ref.name for ref in merge_loras(extract_loras(prompt)[1])]
    if not names:
        return []
    registry = registry_for(lora_dir) if lora_dir is not None else None
    return [name for name in names if registry is None or registry.get(name) is None]


async def warnings_for(request: Request, body: GenerationBase, generation: GenerationRequest, options: dict[str, Any],
                       family: str = "sd15") -> dict[str, str]:  # fmt: skip
    """What A1111 does without refusing the request but this server must say: LoRAs it cannot find (left out, as
    A1111 does), face restoration it cannot apply, and `AND` composable prompts on FLUX / Qwen-Image (encoded as one
    text). Infotext keys, logged too."""
    notes: dict[str, str] = {}
    if family not in COMPOSABLE_FAMILIES and is_composable(extract_loras(generation.prompt)[0]):
        notes[COMPOSABLE_KEY] = COMPOSABLE_NOT_APPLIED
        log.warning("%s: AND (composable prompt) not applied on family %s", request.url.path, family)
    missing = await run_in_threadpool(missing_loras, generation.prompt, request.app.state.settings.lora_dir)
    if missing:
        notes["Lora not found"] = ", ".join(missing)
        log.warning("%s: Lora not found: %s (generating without)", request.url.path, ", ".join(missing))
    if face_restoration_requested(body, options):
        notes[FACE_RESTORATION_KEY] = FACE_RESTORATION_NOT_APPLIED
        log.warning("%s: restore_faces not applied: %s", request.url.path, FACE_RESTORATION_NOT_APPLIED)
    return notes


async def with_controlnet(
    request: Request, body: GenerationBase, generation: GenerationRequest, settings: Settings
) -> tuple[GenerationRequest, list[controlnet_units.ParsedUnit]]:
    """The request with the ControlNet extension's enabled units (`alwayson_scripts.controlnet.args`): parsed and
    checked (422 naming the unit's field), then their images decoded and preprocessed under the preparation
    limit. Also the parsed units, for the infotext."""
    if controlnet_units.script_args(body.alwayson_scripts) is None:
        return generation, []
    cat = controlnet.catalog(request.app)

    def parse() -> list[controlnet_units.ParsedUnit]:
        models = controlnet_units.models_dir(settings)
        try:
            return controlnet_units.parse_units(body.alwayson_scripts, cat.entries(), models)
        except ApiError:  # a model added since the last scan is found after a fresh one
            return controlnet_units.parse_units(body.alwayson_scripts, cat.scan(), models)

    parsed = await run_in_threadpool(parse)
    if not parsed:
        return generation, []
    if isinstance(body, Img2ImgRequest) and scripts.select(body)[0] is not None:  # tiles / outpainting jobs
        why = "ControlNet units with an img2img script are not supported yet"
        raise ApiError.invalid([FieldError("alwayson_scripts.controlnet", why)])
    units = await imagework.prepare(request, controlnet_units.build_units, parsed, generation, settings)
    return controlnet_units.with_units(generation, units), parsed


async def prepare(request: Request, body: GenerationBase, session: Session) -> tuple[Prepared, str | None]:
    settings: Settings = request.app.state.settings
    body = paste.apply_infotext(body, session.options)
    default = GATEWAY_DEFAULT_MODEL if request.url.path.startswith("/v2/") else None
    choice = adapter.choose_model(body, session.registry, session.current_model, default)
    errors = adapter.check_request(body, settings, choice.spec)
    errors += opts.check(body.override_settings, prefix="override_settings.")
    if errors:
        raise ApiError.invalid(errors)
    prompts = adapter.apply_styles(body, request.app.state.styles)
    if prompts.unknown:  # A1111 skips unknown style names silently; the log at least says so
        log.warning("%s: unknown styles ignored: %s", request.url.path, ", ".join(prompts.unknown))

    extra: dict[str, Any] = {}
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise ApiError(404, "Init image not found", field="init_images", code="init_image_not_found")
        background = str(session.options.get("img2img_background_color") or "#ffffff")

        selected = scripts.select(body)[0]

        def build() -> tuple[GenerationRequest, bool]:
            # One call under the preparation limit: the decoded inputs are checked and, when large, resized to
            # the output before the limit is released (server.imagework). A script keeps the init image's own
            # size (it is upscaled or expanded, then cut to width x height): its sizes are checked instead.
            images = decode_inputs(body, settings, background)
            generation = adapter.to_generation_request(body, choice.spec, images, prompts)
            if selected is not None:
                scripts.check_sizes(selected, generation, settings)
                return generation, False
            return imagework.checked_and_presized(settings, generation), images.mask is not None

        try:
            generation, masked = await imagework.prepare(request, build)
        except InvalidRequest as e:
            raise _engine_field(e, choice.field) from None
        extra = adapter.img2img_extra_params(body, masked)
    else:
        generation = adapter.to_generation_request(body, choice.spec, None, prompts)
        if isinstance(body, Txt2ImgRequest):
            extra = adapter.txt2img_extra_params(body, choice.spec)

    generation, units = await with_controlnet(request, body, generation, settings)
    extra.update(controlnet_units.infotext_params(units))
    generation.preview_every = preview_interval(session.options)
    generation.clip_skip = clip_skip_of({**session.options, **body.override_settings})
    generation.subseed = adapter.resolve_subseed(body.subseed)
    generation.skip_missing_loras = True  # A1111 generates without a LoRA it cannot find
    extra.update(await warnings_for(request, body, generation, session.options, choice.spec.family))
    prep = Prepared(
        body=body,
        spec=choice.spec,
        request=generation,
        job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
        extra_generation_params=extra,
        subseed=generation.subseed,
    )
    return prep, choice.field


async def run(request: Request, body: GenerationBase, session: Session) -> dict[str, Any]:
    """The whole synchronous A1111 call; the job keeps running if the wait times out (504)."""
    settings: Settings = request.app.state.settings
    engine = require_engine(request)
    prep, model_field = await prepare(request, body, session)
    owner = job_owner(request)
    prep.request.tags["owner"] = owner
    prep.request.tags[log_context.REQUEST_ID_TAG] = log_context.request_id.get()
    selected = scripts.select(prep.body)[0]
    if selected is not None:
        return await run_script(request, engine, prep, model_field, session, selected)
    jobs = request.app.state.jobs
    accounting = jobs.accounting
    reservation = None
    if accounting is not None:
        reserve = accounting.reserve
        reservation = await run_in_threadpool(reserve, owner, prep.request.total_images, None, jobs.runner_id)
    try:
        job = engine.submit(prep.request)
    except InvalidRequest as e:
        await run_in_threadpool(release, accounting, reservation)
        raise _engine_field(e, model_field) from None
    except BaseException:
        await run_in_threadpool(release, accounting, reservation)
        raise
    settle = _SettleOnce(accounting, reservation, job)
    if accounting is not None:  # charged when it completes, given back otherwise; also after a 504 (it runs on)
        job.add_done_callback(lambda _: threading.Thread(target=settle, name="easel-credits", daemon=True).start())
    try:
        async with cancel_on_disconnect(request, job.cancel):  # a client that hung up wants no images
            result = await job.wait(timeout=settings.sync_timeout_s)
        record_engine(result.timings)
    except InvalidRequest as e:
        raise _engine_field(e, model_field) from None
    except TimeoutError:
        raise ApiError(
            504,
            f"the job did not finish within sync_timeout_s={settings.sync_timeout_s:g} s; it keeps running "
            "(watch /sdapi/v1/progress, stop it with /sdapi/v1/interrupt)",
            code="timeout",
        ) from None
    if accounting is not None:
        await run_in_threadpool(settle)  # settled before the answer: /v1/account right after it is up to date

    await run_in_threadpool(keep_overrides, prep.body, session, prep, model_field)
    return await run_in_threadpool(render, prep, result, session.options, settings.a1111_version)


async def run_script(request: Request, engine: EngineClient, prep: Prepared, model_field: str | None, session: Session,
                     selected: scripts.Selected) -> dict[str, Any]:  # fmt: skip
    """An img2img `script_name`: the script's jobs one after another through the engine (server.img2img_scripts),
    answered as one A1111 response. Credits are held for the images the script answers with."""
    settings: Settings = request.app.state.settings
    jobs = request.app.state.jobs
    accounting = jobs.accounting
    reservation = None
    if accounting is not None:
        count = scripts.output_count(selected, prep.body)
        owner = prep.request.tags["owner"]
        reservation = await run_in_threadpool(accounting.reserve, owner, count, None, jobs.runner_id)
    try:
        outcome = await scripts.run(
            request, engine, selected, prep.request, prep.spec.size_multiple, settings.sync_timeout_s
        )
    except InvalidRequest as e:
        await run_in_threadpool(release, accounting, reservation)
        raise _engine_field(e, model_field) from None
    except TimeoutError:
        await run_in_threadpool(release, accounting, reservation)
        raise ApiError(
            504,
            f"the script {selected.title!r} did not finish within sync_timeout_s={settings.sync_timeout_s:g} s; "
            "its running job was cancelled",
            code="timeout",
        ) from None
    except BaseException:
        await run_in_threadpool(release, accounting, reservation)
        raise
    if accounting is not None:
        await run_in_threadpool(accounting.complete, reservation, len(outcome.images))
    await run_in_threadpool(keep_overrides, prep.body, session, prep, model_field)
    first = outcome.first
    result = GenerationResult(
        images=outcome.images,
        seeds=outcome.seeds,
        model=first.model,
        model_hash=first.model_hash,
        sampler=first.sampler,
        schedule=first.schedule,
        width=(outcome.reported_size or outcome.images[0].size)[0],
        height=(outcome.reported_size or outcome.images[0].size)[1],
        steps=first.steps,
        interrupted=outcome.interrupted,
    )
    log.info("%s: script %r ran %d job(s)", request.url.path, selected.title, outcome.jobs)
    prep.extra_generation_params.update(outcome.extra_params)
    # What the answer describes: the script's images, one call's worth (A1111's Processed of the script).
    prep.request = dataclasses.replace(
        prep.request, batch_size=len(outcome.images), n_iter=1, init_images=[], mask=None
    )
    grid = scripts.returns_grid(selected, len(outcome.images), session.options)
    return await run_in_threadpool(render, prep, result, session.options, settings.a1111_version, grid)


def release(accounting: Any, reservation: Any) -> None:
    if accounting is not None and reservation is not None:
        accounting.release(reservation)


class _SettleOnce:
    """Charge (completed) or give back (anything else) a synchronous call's credits once the job is done: from the
    route when it answers, or from the job's done-callback when the caller is gone (504, hang-up). Whoever comes
    second waits for the first to finish, then does nothing."""

    def __init__(self, accounting: Any, reservation: Any, job: JobHandle):
        self.accounting, self.reservation, self.job = accounting, reservation, job
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done or self.accounting is None:
                return
            self._done = True
            try:
                if self.job.status == JobStatus.COMPLETED and self.job.error is None:
                    images = len(asyncio.run(self.job.wait(timeout=None)).images)  # done: returns at once
                    self.accounting.complete(self.reservation, images)
                else:
                    self.accounting.release(self.reservation)
            except Exception:  # the reservation stays open; the next start-up closes it
                log.exception("settling the credits of an A1111 call failed")


def keep_overrides(body: GenerationBase, session: Session, prep: Prepared, model_field: str | None) -> None:
    if not body.override_settings_restore_afterwards and body.override_settings:
        # A1111 keeps the overrides as the new options when asked not to restore them (checked in `prepare`).
        model_id = prep.spec.id if model_field == "override_settings.sd_model_checkpoint" else None
        try:
            session.update(body.override_settings, model_id, field="override_settings")
        except ApiError as e:  # over the total size bound: the images are made, the options stay as they were
            log.warning("override_settings not kept: %s", e.message)


async def run_async(request: Request, body: GenerationBase, session: Session) -> JSONResponse:
    """`"async": true` (gateway copy): a recorded job, answered 202 with its task address at once.

    GET /v2/tasks/{task_address} then returns, as `result`, the body the synchronous call would have returned.
    """
    settings: Settings = request.app.state.settings
    require_engine(request)
    prep, model_field = await prepare(request, body, session)
    options, version = session.options, settings.a1111_version

    def render_body(result: GenerationResult, _images: list[StoredImage]) -> dict[str, Any]:
        return render(prep, result, options, version)

    route = ASYNC_IMG2IMG_ROUTE if isinstance(body, Img2ImgRequest) else ASYNC_ROUTE
    spec = JobSpec(
        request=prep.request,
        dialect="a1111",
        route=route,
        request_json=adapter.echo_parameters(prep.body),
        render=render_body,  # the A1111 body: base64 images with their infotext, as the synchronous call answers
        # Also kept as result files: a task's and the history's signed image URLs (GET /v2/history) link them.
        store_images=True,
        ttl_s=settings.result_ttl_for(route),
    )
    try:
        ticket = await submit(request, spec)
    except InvalidRequest as e:
        raise _engine_field(e, model_field) from None
    await run_in_threadpool(keep_overrides, prep.body, session, prep, model_field)
    return accepted(request, ticket)


def render(prep: Prepared, result: GenerationResult, options: dict[str, Any], version: str | None,
           grid: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """The A1111 response: encoded images (grid first when A1111 would add one, or when `grid` says so), echo,
    info JSON."""
    text_opts = adapter.InfotextOptions.from_options(options)
    seeds = adapter.all_seeds(result, prep.request.seed, prep.request.total_images)
    images: list[Image.Image] = list(result.images)
    infotexts = [
        adapter.image_infotext(
            prep, result, seeds[i] if i < len(seeds) else prep.request.seed, text_opts, version, index=i
        )
        for i in range(len(images))
    ]
    index_of_first_image = 0
    if adapter.wants_grid(prep.body, len(images), options) if grid is None else grid and bool(images):
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
        # The ControlNet extension appends each unit's detected map after the images (no infotext of their own).
        for img in detected_maps(prep, options):
            encoded.append(b64(encode_image(img, fmt, quality, None)))
    return {
        "images": encoded,
        "parameters": adapter.echo_parameters(prep.body),
        "info": adapter.build_info(prep, result, infotexts, index_of_first_image, version),
    }


def detected_maps(prep: Prepared, options: dict[str, Any]) -> list[Image.Image]:
    """The detected maps the response carries: each unit's, unless the unit's `save_detected_map` is false or the
    `control_net_no_detectmap` option is set (also as an override_setting, which A1111 applies while it runs)."""
    if {**options, **prep.body.override_settings}.get("control_net_no_detectmap"):
        return []
    return [unit.image for unit in prep.request.control_units if unit.save_detected_map]
