"""create_app(settings) -> FastAPI: routers, middleware, lifespan, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from pipelines.engine_api import EngineClient
from pipelines.registry import Registry, load_registry
from server.checkpoint_scan import checkpoint_rescanner
from server.errors import register_error_handlers
from server.jobs import create_job_service
from server.middleware import BodySizeLimit
from server.settings import Settings
from server.styles import load_styles

log = logging.getLogger("easel")


def _start_real_engine(app: FastAPI, settings: Settings, registry: Registry) -> None:
    """Build the torch-side engine in a thread so /livez answers while models and the worker come up."""

    def build() -> None:
        try:
            app.state.rescan_checkpoints()  # hashing new checkpoint files can take a while: not on the event loop
            # Imported here: the HTTP package itself never imports torch; only the composition root does.
            from pipelines.engine import Engine, EngineConfig

            engine = Engine(
                registry,
                EngineConfig(
                    data_dir=settings.data_dir,
                    device=settings.device,
                    queue_size=settings.queue_size,
                    cache_max_models=settings.cache_max_models,
                    cache_memory_budget_gb=settings.cache_memory_budget_gb,
                    max_batch=settings.max_batch,
                    max_batch_by_family=settings.max_batch_by_family,
                    max_wait_ms=settings.max_wait_ms,
                    configs_dir=settings.configs_dir,
                    allow_pickle=settings.allow_pickle,
                    lora_dir=settings.lora_dir,
                ),
            )
            engine.start()
            app.state.engine = engine
            log.info("engine ready on %s", engine.device)
        except Exception as e:  # surfaced by /readyz and the log; the process stays alive for /livez
            log.exception("engine failed to start")
            app.state.engine_error = f"{type(e).__name__}: {e}"

    threading.Thread(target=build, name="easel-engine-start", daemon=True).start()


def create_app(
    settings: Settings | None = None,
    *,
    engine: EngineClient | None = None,
    registry: Registry | None = None,
) -> FastAPI:
    """The Easel ASGI app. Tests may inject a ready `engine` (and `registry`); otherwise the real engine starts."""
    settings = settings or Settings()
    registry = registry or load_registry(settings.models)

    jobs = create_job_service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Before serving: tables exist, and jobs a previous process left unfinished are marked failed.
        await loop.run_in_executor(None, jobs.start_background)
        if app.state.engine is None:
            _start_real_engine(app, settings, registry)
        else:
            await loop.run_in_executor(None, app.state.rescan_checkpoints)
        yield
        eng = app.state.engine
        if eng is not None and hasattr(eng, "stop"):
            await loop.run_in_executor(None, eng.stop)
        await loop.run_in_executor(None, jobs.close)  # after the engine: its last done-callbacks get stored

    app = FastAPI(
        title="Easel",
        version="0.1.0",
        description="Self-hosted image generation: AUTOMATIC1111, gateway and OpenAI-style APIs over diffusers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    app.state.engine_error = None
    app.state.jobs = jobs
    app.state.rescan_checkpoints = checkpoint_rescanner(settings, registry)
    app.state.styles = load_styles(settings.styles)  # an invalid styles.yaml stops start-up with the field named

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.get("/livez", tags=["health"])
    async def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        eng = app.state.engine
        if eng is not None and eng.ready:
            return JSONResponse({"status": "ready", "models": len(registry)})
        reason = app.state.engine_error or "starting: loading the registry and starting the engine"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    from server.api import a1111, gateway, genpicz, genrex, indoxhub, openai_images

    a1111.install(app)
    gateway.install(app)
    openai_images.install(app)
    indoxhub.install(app)
    genpicz.install(app)
    genrex.install(app)
    register_error_handlers(app)
    return app
