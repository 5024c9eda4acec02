"""The read-only listings of the A1111 API: models, samplers, schedulers, upscalers, flags, progress."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.engine_api import EngineClient
from pipelines.registry import Registry
from pipelines.request import Task
from pipelines.sampler_names import SAMPLERS, SCHEDULERS
from server.api.a1111.schemas import (
    NameItem,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    UpscalerItem,
)
from server.api.a1111.state import A1111State
from server.jobs.watch import preview_b64
from server.settings import Settings

LATENT_UPSCALE_MODES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
# A1111's built-in upscalers (modules/upscaler.py UpscalerNone/Lanczos/Nearest): no model, scale 4.
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
SECRET_SETTING = re.compile(r"(key|token|secret|pass(word|wd)?|auth|credential)", re.IGNORECASE)


def sd_models(registry: Registry) -> list[SDModelItem]:
    return [
        SDModelItem(
            title=m.title, model_name=m.model_name, hash=m.short_hash, sha256=m.sha256, filename=m.source, config=None
        )
        for m in registry
    ]


def samplers() -> list[SamplerItem]:
    return [SamplerItem(name=s["name"], aliases=list(s["aliases"]), options=dict(s["options"])) for s in SAMPLERS]


def schedulers() -> list[SchedulerItem]:
    return [SchedulerItem(**{**s, "aliases": list(s["aliases"]) if s["aliases"] else None}) for s in SCHEDULERS]


def upscalers() -> list[UpscalerItem]:
    return [UpscalerItem(name=n, model_name=None, model_path=None, model_url=None, scale=4) for n in BUILTIN_UPSCALERS]


def latent_upscale_modes() -> list[NameItem]:
    return [NameItem(name=n) for n in LATENT_UPSCALE_MODES]


def cmd_flags(settings: Settings) -> dict[str, Any]:
    """A1111-style flags plus our settings; anything that could be a credential is left out."""
    ours = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in settings.model_dump().items()
        if not SECRET_SETTING.search(k)
    }
    a1111_style = {
        "api": True,
        "nowebui": True,
        "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
        "server_name": settings.host,
        "port": settings.port,
        "ckpt_dir": None,
        "data_dir": str(settings.data_dir),
        "device_id": None,
        "api_log": False,
        "cors_allow_origins": ",".join(settings.cors_allow_origins) or None,
        "api_server_stop": False,
    }
    return {**ours, **a1111_style}


def progress(engine: EngineClient | None, state: A1111State, skip_current_image: bool = False) -> ProgressResponse:
    """A1111 /progress. Idle: progress 0 and job_count 0 (webuiapi's util_wait_for_ready waits for exactly that)."""
    queued = engine.queued_count() if engine is not None else 0
    job = engine.current_job() if engine is not None else None
    if job is None:
        return ProgressResponse(progress=0, eta_relative=0, state=ProgressState(), queued=queued)
    p = job.progress
    job_count = p.job_count or job.request.n_iter
    value = min(p.fraction + 0.01, 1.0)  # A1111 adds 0.01 so a started job never reads as idle
    elapsed = time.time() - p.started_at if p.started_at else 0.0
    task = "img2img" if job.request.task != Task.TXT2IMG else "txt2img"
    return ProgressResponse(
        progress=value,
        eta_relative=max(elapsed / value - elapsed, 0.0) if p.started_at else 0.0,
        state=ProgressState(
            skipped=state.skipped_job_id == job.id,
            interrupted=state.interrupted_job_id == job.id,
            job=f"Batch {min(p.job_no + 1, job_count)} out of {job_count}" if job_count > 1 else task,
            job_count=job_count,
            job_timestamp=datetime.fromtimestamp(p.started_at).strftime("%Y%m%d%H%M%S") if p.started_at else "0",
            job_no=p.job_no,
            sampling_step=p.sampling_step,
            sampling_steps=p.sampling_steps or job.request.steps,
        ),
        textinfo=f"Sampling step {p.sampling_step}/{p.sampling_steps}" if p.sampling_steps else None,
        current_image=None if skip_current_image or not state.options.get("live_previews_enable") else preview_b64(p),
        queued=queued,
    )
