"""create_app(settings) -> FastAPI: routers, middleware, lifespan, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.engine_api import EngineClient
from pipelines.registry import Registry, load_registry
from server import studio
from server.access import install_access
from server.access.config import check_access_settings
from server.checkpoint_scan import checkpoint_rescanner
from server.engine_factory import build_engine
from server.errors import client_safe, register_error_handlers
from server.jobs import create_job_service
from server.logs import debugging
from server.metrics import install_metrics
from server.middleware import AdmissionGate, BodySizeLimit, TextGuard
from server.request_id import RequestId
from server.settings import Settings
from server.styles import load_styles
from server.timing import ServerTiming
from server.webhooks import WebhookService

log = logging.getLogger("easel")

PROBE_RETRY_AFTER_S = 5
# /docs and /redoc load Swagger UI and ReDoc from here (fastapi-offline's bundled copies), never from a CDN, so the
# API pages work on an air-gapped box. Open without a key, as the pages themselves are.
DOCS_ASSETS_PATH = "/docs-assets"


def begin_draining(app: FastAPI) -> None:
    """Start the graceful shutdown now (at SIGTERM under `easel serve`, else at lifespan shutdown): /readyz answers
    503, and the engine refuses new work, finishes what it holds until `drain_timeout_s` and cancels the rest."""
    if app.state.draining:
        return
    app.state.draining = True
    timeout = app.state.settings.drain_timeout_s
    app.state.drain_deadline = time.monotonic() + timeout
    eng = app.state.engine
    if eng is not None and hasattr(eng, "drain"):
        # A thread: this may run in a signal handler, and the wait must not hold up the event loop.
        app.state.drain_thread = threading.Thread(target=eng.drain, args=(timeout,), name="easel-drain", daemon=True)
        app.state.drain_thread.start()


def not_ready_reason(app: FastAPI) -> str | None:
    """Why the server takes no new work now (loading, draining, engine failed), or None when it does."""
    if app.state.draining:
        return "draining: the server is shutting down"
    eng = app.state.engine
    if eng is None:
        return app.state.engine_error or "starting: loading the registry and starting the engine"
    if not getattr(eng, "alive", True):
        return f"the engine failed: {client_safe(str(getattr(eng, 'failure', None) or 'unknown fault'))}"
    if not eng.ready:
        return "the engine is not running"
    return None


async def shut_down(app: FastAPI) -> None:
    """Lifespan shutdown (on SIGTERM uvicorn has stopped accepting and waited for open requests): readiness 503, the
    engine finishes what it holds until the drain deadline and cancels the rest, then every job still unfinished is
    recorded as interrupted."""
    loop = asyncio.get_running_loop()
    begin_draining(app)
    eng = app.state.engine
    if eng is not None:
        thread: threading.Thread | None = app.state.drain_thread
        if thread is not None:
            await loop.run_in_executor(None, thread.join)
        elif hasattr(eng, "drain"):  # the engine came up after the signal
            await loop.run_in_executor(None, eng.drain, max(0.0, app.state.drain_deadline - time.monotonic()))
        if hasattr(eng, "stop"):
            await loop.run_in_executor(None, eng.stop)
    await loop.run_in_executor(None, app.state.jobs.close)  # after the engine: its last done-callbacks get stored


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every answer: browsers never render a body as another type than the one
    declared (images stay images)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_header)


def _start_real_engine(app: FastAPI, settings: Settings, registry: Registry) -> None:
    """Build the torch-side engine in a thread so /livez answers while models and the worker come up."""

    def build() -> None:
        try:
            app.state.rescan_checkpoints()  # hashing new checkpoint files can take a while: not on the event loop
            engine = build_engine(registry, settings)  # torch is imported there, not by the HTTP package
            app.state.metrics.attach(engine)
            engine.start()
            app.state.engine = engine
            log.info("engine running on %s", engine.device)
        except Exception as e:  # surfaced by /readyz and the log; the process stays alive for /livez
            app.state.engine_error = client_safe(f"{type(e).__name__}: {e}")
            log.error("the engine failed to start: %s", " ".join(str(e).split()) or type(e).__name__,
                      exc_info=debugging())  # fmt: skip

    threading.Thread(target=build, name="easel-engine-start", daemon=True).start()


def create_app(
    settings: Settings | None = None,
    *,
    engine: EngineClient | None = None,
    registry: Registry | None = None,
) -> FastAPI:
    """The Easel ASGI app. Tests may inject a ready `engine` (and `registry`); otherwise the real engine starts."""
    settings = settings or Settings()
    check_access_settings(settings)  # fail closed: a malformed auth setting builds no app at all
    registry = registry or load_registry(settings.models)

    jobs = create_job_service(settings)
    webhooks = WebhookService(settings, jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Before serving: tables exist, and jobs a previous process left unfinished are marked failed.
        await loop.run_in_executor(None, jobs.start_background)
        await loop.run_in_executor(None, webhooks.start)  # also resumes deliveries a previous process left
        if app.state.engine is None:
            _start_real_engine(app, settings, registry)
        else:
            await loop.run_in_executor(None, app.state.rescan_checkpoints)
        yield
        # Webhooks first: attempts in flight end (bounded by webhook_timeout_s); jobs finishing during the drain
        # still get their delivery rows, sent by the next start.
        await loop.run_in_executor(None, webhooks.close)
        await shut_down(app)

    app = FastAPIOffline(
        static_url=DOCS_ASSETS_PATH,
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask validator.swagger.io for a badge
        title="Easel",
        version="0.1.0",
        description="Self-hosted image generation: AUTOMATIC1111, gateway and OpenAI-style APIs over diffusers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    app.state.engine_error = None
    app.state.draining = False  # set on SIGTERM: /readyz 503, then the drain (begin_draining, shut_down)
    app.state.drain_thread = None
    app.state.jobs = jobs
    webhooks.install(app)  # app.state.webhooks, and the job listener that records deliveries
    app.state.rescan_checkpoints = checkpoint_rescanner(settings, registry)
    app.state.styles = load_styles(settings.styles)  # an invalid styles.yaml stops start-up with the field named

    app.add_middleware(TextGuard)  # lone surrogates in JSON bodies: 422 naming the field (inside the size limit)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionGate)  # a full queue answers 429 before the body is read (after access checks)
    install_access(app, settings, jobs)  # the outermost layer but two, before any body is read
    if settings.cors_allow_origins or settings.cors_allow_origin_regex:  # no CORS unless configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_origin_regex=settings.cors_allow_origin_regex,
            allow_methods=settings.cors_allow_methods,
            allow_headers=settings.cors_allow_headers,
            allow_credentials=settings.cors_allow_credentials,
        )
    app.add_middleware(NoSniff)
    app.add_middleware(ServerTiming)  # its total covers every layer below
    metrics = install_metrics(app)  # counts every answer, the refusals of the layers above included; GET /metrics
    if engine is not None:
        metrics.attach(engine)
    app.add_middleware(RequestId)  # outermost: every answer carries X-Request-ID, every log line of it names it

    @app.get("/livez", tags=["health"])
    async def livez() -> Response:
        """Liveness: 503 only once the engine is dead (restart the process); loading and draining are alive."""
        eng = app.state.engine
        if eng is not None and not getattr(eng, "alive", True):
            reason = client_safe(str(getattr(eng, "failure", None) or "the engine failed"))
            return JSONResponse({"status": "dead", "reason": reason}, status_code=503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """Readiness: 200 while new work is taken; 503 while loading, draining or after an engine failure."""
        reason = not_ready_reason(app)
        if reason is None:
            return JSONResponse({"status": "ready", "models": len(registry)})
        headers = {"Retry-After": str(PROBE_RETRY_AFTER_S)}
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503, headers=headers)

    from server.api import a1111, gateway, genpicz, genrex, indoxhub, openai_images

    a1111.install(app)
    gateway.install(app)
    openai_images.install(app)
    indoxhub.install(app)
    genpicz.install(app)
    genrex.install(app)
    studio.install(app)  # the web page at / and /studio
    register_error_handlers(app)
    return app
