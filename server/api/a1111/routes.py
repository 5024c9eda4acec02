"""A1111 `/sdapi/v1/*` routes. Control endpoints always answer JSON (`{}` / `null`), never 204: webuiapi calls
`.json()` on every response."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from starlette.concurrency import run_in_threadpool

from pipelines import embedding_files
from pipelines.lora import registry_for
from server import imagework
from server.access.principal import can_see, is_admin, owner_filter
from server.api.a1111 import catalog, extras, generation, scripts
from server.api.a1111 import options as opts
from server.api.a1111.adapter import check_image_count, unknown_model
from server.api.a1111.infotext import parse_generation_parameters
from server.api.a1111.schemas import (
    GatewayImg2ImgRequest,
    GatewayTxt2ImgRequest,
    GenerationResponse,
    Img2ImgRequest,
    InterrogateRequest,
    NameItem,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    PromptStyleItem,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
    UpscalerItem,
)
from server.api.a1111.state import A1111State, Session, get_session, get_state, require_admin
from server.errors import ApiError
from server.images import decode_image, read_png_info
from server.jobs.http import TaskAccepted

# Keys Pillow puts in `img.info` that are not text chunks (A1111 drops the same ones from png-info `items`).
IGNORED_INFO_KEYS = {
    "jfif",
    "jfif_version",
    "jfif_unit",
    "jfif_density",
    "dpi",
    "exif",
    "loop",
    "background",
    "timestamp",
    "duration",
    "progressive",
    "progression",
    "icc_profile",
    "chromaticity",
    "photoshop",
    "parameters",
}


# The captioners A1111's /interrogate knows; any other name is its 404 "Model not found".
INTERROGATE_MODELS = ("clip", "deepdanbooru")


def _not_supported(feature: str) -> ApiError:
    return ApiError(501, f"{feature} is not supported by this server", code="not_implemented")


def build_router(*, gateway: bool = False) -> APIRouter:
    """The A1111 routes; `gateway=True` builds the /v2/automatic1111 copy whose txt2img takes `model`."""
    router = APIRouter(tags=["automatic1111 (gateway)" if gateway else "automatic1111"])
    _add_generation_routes(router, gateway)
    _add_model_routes(router)
    _add_control_routes(router)
    _add_listing_routes(router)
    return router


def _add_generation_routes(router: APIRouter, gateway: bool) -> None:
    if gateway:

        @router.post("/txt2img", response_model=GenerationResponse, responses={202: {"model": TaskAccepted}})
        async def txt2img_gateway(
            request: Request, body: GatewayTxt2ImgRequest, session: Session = Depends(get_session)
        ) -> Any:
            """Gateway txt2img: `model` picks any models.yaml id/alias/title; defaults steps 20, 512x512, cfg 7.
            `"async": true` answers 202 with a task address (GET /v2/tasks/{task_address})."""
            if body.async_:
                return await generation.run_async(request, body, session)
            return await generation.run(request, body, session)

    else:

        @router.post("/txt2img", response_model=GenerationResponse)
        async def txt2img(
            request: Request, body: Txt2ImgRequest, session: Session = Depends(get_session)
        ) -> dict[str, Any]:
            """A1111 txt2img with A1111's API defaults (steps 50, Euler, 512x512, cfg 7)."""
            return await generation.run(request, body, session)

    if gateway:

        @router.post("/img2img", response_model=GenerationResponse, responses={202: {"model": TaskAccepted}})
        async def img2img_gateway(
            request: Request, body: GatewayImg2ImgRequest, session: Session = Depends(get_session)
        ) -> Any:
            """Gateway img2img; a `mask` (white = repaint, or RGBA alpha) makes it inpainting. `model` and `"async":
            true` as for the gateway txt2img."""
            if body.async_:
                return await generation.run_async(request, body, session)
            return await generation.run(request, body, session)

    else:

        @router.post("/img2img", response_model=GenerationResponse)
        async def img2img(
            request: Request, body: Img2ImgRequest, session: Session = Depends(get_session)
        ) -> dict[str, Any]:
            """img2img; a `mask` (white = repaint, or RGBA alpha) makes it inpainting."""
            return await generation.run(request, body, session)

    @router.post("/png-info", response_model=PNGInfoResponse)
    async def png_info(request: Request, body: PNGInfoRequest) -> PNGInfoResponse:
        settings = request.app.state.settings
        img = await imagework.prepare(
            request, decode_image, body.image, "image", settings.max_body_bytes, settings.max_image_pixels
        )
        info = read_png_info(img) or ""
        items = {k: v for k, v in img.info.items() if k not in IGNORED_INFO_KEYS and isinstance(v, str)}
        return PNGInfoResponse(info=info, items=items, parameters=parse_generation_parameters(info) if info else {})

    @router.post("/extra-single-image", response_model=extras.ExtrasSingleImageResponse)
    async def extra_single_image(
        request: Request, body: extras.ExtrasSingleImageRequest, session: Session = Depends(get_session)
    ) -> extras.ExtrasSingleImageResponse:
        """Upscale one image with the built-in upscalers (see /upscalers); face restoration is not installed."""
        extras.check(body)
        settings = request.app.state.settings
        images, html_info = await imagework.prepare(
            request, extras.run, body, [("image", body.image)], settings, session.options
        )
        return extras.ExtrasSingleImageResponse(html_info=html_info, image=images[0])

    @router.post("/extra-batch-images", response_model=extras.ExtrasBatchImagesResponse)
    async def extra_batch_images(
        request: Request, body: extras.ExtrasBatchImagesRequest, session: Session = Depends(get_session)
    ) -> extras.ExtrasBatchImagesResponse:
        """Upscale each of `imageList` ([{data, name}]), at most max_images_per_request of them."""
        extras.check(body)
        settings = request.app.state.settings
        check_image_count("imageList", len(body.imageList), settings)
        sources = [(f"imageList[{i}].data", item.data) for i, item in enumerate(body.imageList)]
        images, html_info = await imagework.prepare(request, extras.run, body, sources, settings, session.options)
        return extras.ExtrasBatchImagesResponse(html_info=html_info, images=images)

    @router.post("/interrogate")
    async def interrogate(body: InterrogateRequest) -> None:
        """A1111's answers for a missing image or an unknown model (404); its two captioners are not installed."""
        if not body.image:
            raise ApiError(404, "Image not found", field="image", code="image_not_found")
        if body.model not in INTERROGATE_MODELS:
            raise ApiError(404, "Model not found", field="model", code="model_not_found")
        raise _not_supported(f"interrogate with {body.model!r} (image captioning)")


def _add_model_routes(router: APIRouter) -> None:
    @router.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models(state: A1111State = Depends(get_state)) -> list[SDModelItem]:
        return catalog.sd_models(state.registry)

    @router.get("/options")
    async def get_options(session: Session = Depends(get_session)) -> dict[str, Any]:
        """The caller's options: with keys, its own values over the server-wide ones (admins see those)."""
        return session.options_view()

    @router.post("/options")
    async def set_options(
        request: Request, values: dict[str, Any] = Body(...), session: Session = Depends(get_session)
    ) -> None:
        """Check and store options (422 naming each bad one, nothing stored then); `sd_model_checkpoint` (any
        alias) loads that model before answering, as A1111 does. With keys, a non-admin caller changes its own
        session only; admins change the server-wide options."""
        if errors := opts.check(values):
            raise ApiError.invalid(errors)
        model_id = None
        name = values.get("sd_model_checkpoint")
        if name is not None:
            spec = session.registry.resolve(str(name))
            if spec is None:
                raise unknown_model(session.registry, str(name), "sd_model_checkpoint")
            await generation.require_engine(request).load_model(spec.id)
            model_id = spec.id
        await run_in_threadpool(session.update, values, model_id)
        return None

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints(request: Request, state: A1111State = Depends(get_state)) -> None:
        """Rescan the checkpoints folder (models.yaml entries stay as they are). Admins only, with keys."""
        require_admin(request, "refresh-checkpoints")
        await run_in_threadpool(request.app.state.rescan_checkpoints)
        if state.current_model_id not in state.registry.models:  # its file went away
            state.current_model_id = state.registry.default_model
        return None

    @router.post("/unload-checkpoint")
    async def unload_checkpoint(request: Request) -> dict[str, Any]:
        require_admin(request, "unload-checkpoint")
        await run_in_threadpool(generation.require_engine(request).unload_models)
        return {}

    @router.post("/reload-checkpoint")
    async def reload_checkpoint(request: Request, state: A1111State = Depends(get_state)) -> dict[str, Any]:
        require_admin(request, "reload-checkpoint")
        await generation.require_engine(request).load_model(state.current_model.id)
        return {}


def _add_control_routes(router: APIRouter) -> None:
    @router.get("/progress", response_model=ProgressResponse)
    async def progress(
        request: Request,
        skip_current_image: bool = False,
        state: A1111State = Depends(get_state),
        session: Session = Depends(get_session),
    ) -> ProgressResponse:
        engine = request.app.state.engine
        if engine is not None and owner_filter(request) is not None:
            engine = OwnJobsView(engine, request)  # another key's job (and its preview) is not shown
        previews = not skip_current_image and bool(session.options.get("live_previews_enable"))
        return await run_in_threadpool(catalog.progress, engine, state, previews)

    @router.post("/interrupt")
    async def interrupt(request: Request, state: A1111State = Depends(get_state)) -> dict[str, Any]:
        """Stop the running job at its next step; its request returns the images finished so far."""
        engine = request.app.state.engine
        if engine is not None:
            job = _stop_own_jobs(request, engine, "interrupt")
            state.interrupted_job_id = job.id if job is not None else None
        return {}

    @router.post("/skip")
    async def skip(request: Request, state: A1111State = Depends(get_state)) -> None:
        engine = request.app.state.engine
        if engine is not None:
            job = _stop_own_jobs(request, engine, "skip")
            state.skipped_job_id = job.id if job is not None else None
        return None

    @router.get("/memory")
    async def memory(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(generation.require_engine(request).memory_stats)


def _add_listing_routes(router: APIRouter) -> None:
    router.add_api_route("/samplers", catalog.samplers, methods=["GET"], response_model=list[SamplerItem])
    router.add_api_route("/schedulers", catalog.schedulers, methods=["GET"], response_model=list[SchedulerItem])
    router.add_api_route("/upscalers", catalog.upscalers, methods=["GET"], response_model=list[UpscalerItem])
    router.add_api_route(
        "/latent-upscale-modes", catalog.latent_upscale_modes, methods=["GET"], response_model=list[NameItem]
    )

    @router.get("/cmd-flags")
    async def cmd_flags(request: Request) -> dict[str, Any]:
        return catalog.cmd_flags(request.app.state.settings, show_paths=is_admin(request))

    @router.get("/scripts")
    async def scripts_list() -> dict[str, list[str]]:
        """The selectable scripts `script_name` takes (A1111's built-in img2img ones that need no extra model)."""
        return scripts.names()

    @router.get("/script-info")
    async def script_info() -> list[dict[str, Any]]:
        """Each script's `script_args`, in order, as A1111 describes them (label, default value, range, choices)."""
        return scripts.script_info()

    @router.get("/prompt-styles", response_model=list[PromptStyleItem])
    async def prompt_styles(request: Request) -> list[PromptStyleItem]:
        """The presets of styles.yaml; `styles` in txt2img/img2img takes these names (or the preset ids)."""
        book = request.app.state.styles
        return [PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt) for s in book]

    @router.get("/embeddings")
    async def embeddings(request: Request, session: Session = Depends(get_session)) -> dict[str, dict]:
        folder, family = request.app.state.settings.embeddings_dir, session.current_model.family
        return await run_in_threadpool(embedding_files.listing, folder, family)

    # Features this server does not have yet answer with empty lists / null, like an A1111 without them.
    for path in (
        "/sd-vae",
        "/hypernetworks",
        "/face-restorers",
        "/realesrgan-models",
        "/extensions",
    ):
        router.add_api_route(path, _empty_list, methods=["GET"], name=f"list{path.replace('-', '_').replace('/', '_')}")

    @router.get("/loras")
    async def loras(request: Request) -> list[dict[str, Any]]:
        lora_dir = request.app.state.settings.lora_dir
        return await run_in_threadpool(lambda: registry_for(lora_dir).list()) if lora_dir else []

    @router.post("/refresh-loras")
    async def refresh_loras(request: Request) -> None:
        require_admin(request, "refresh-loras")
        lora_dir = request.app.state.settings.lora_dir
        if lora_dir:
            await run_in_threadpool(registry_for(lora_dir).scan)
        return None

    for path in ("/refresh-vae", "/refresh-embeddings"):
        router.add_api_route(path, _null, methods=["POST"], name=f"post{path.replace('-', '_').replace('/', '_')}")


async def _empty_list() -> list:
    return []


async def _null() -> None:
    return None


class OwnJobsView:
    """The engine as a caller with an API key sees it: only its own running job."""

    def __init__(self, engine: Any, request: Request):
        self._engine = engine
        self._request = request

    def current_job(self) -> Any:
        own = _own_running(self._request, self._engine)
        return own[0] if own else None

    def queued_count(self) -> int:
        """Only the caller's own queued jobs: how busy other keys are is theirs to know."""
        owners = self._engine.queued_owners() if hasattr(self._engine, "queued_owners") else []
        return sum(1 for owner in owners if can_see(self._request, owner))


def _own_running(request: Request, engine: Any) -> list[Any]:
    running = engine.running_jobs() if hasattr(engine, "running_jobs") else [engine.current_job()]
    return [job for job in running if job is not None and can_see(request, job.request.tags.get("owner"))]


def _stop_own_jobs(request: Request, engine: Any, how: str) -> Any:
    """A1111's interrupt/skip stop whatever runs; with keys, a caller stops only its own jobs (a batch can hold
    several keys' requests). Returns the first job stopped."""
    if owner_filter(request) is None:
        job = engine.current_job()
        getattr(engine, how)()
        return job
    own = _own_running(request, engine)
    for job in own:
        setattr(job, f"{how}_requested", True)
    return own[0] if own else None
