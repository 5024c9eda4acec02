"""The Ray Serve application: ingress replicas (the FastAPI app) over GPU worker replicas, and how to run it.

- `build_app(settings)`: the bound application (`serve.run(build_app(settings))`).
- `app_builder(args)`: the same for a Serve config file (deploy/ray-serve.yaml: `import_path:
  server.ray_serve.app:app_builder`, `args:` are settings, as EASEL_* variables are).
- `run(settings, address)`: `easel serve --ray`: start (or join) Ray, deploy, serve until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from server.ray_serve.ingress import EaselIngress
from server.ray_serve.worker import EaselWorker
from server.settings import Settings

log = logging.getLogger("easel.ray")

APP_NAME = "easel"
INGRESS_MAX_ONGOING = 1000  # HTTP requests per ingress replica: a synchronous call holds one for its job's life
SHUTDOWN_GRACE_S = 15.0  # beyond drain_timeout_s for a replica to stop (a running step, answers going out)
PATH_SETTINGS = ("data_dir", "models", "styles", "checkpoints_dir", "configs_dir")


def settings_overrides(settings: Settings) -> dict[str, Any]:
    """Every setting, as deployment arguments: replicas run with exactly the deploying process's settings. Paths are
    made absolute (replicas do not share its working directory)."""
    values = settings.model_dump()
    for name in PATH_SETTINGS:
        if values.get(name) is not None:
            values[name] = Path(values[name]).resolve()
    return values


def _worker_scaling(settings: Settings) -> dict[str, Any]:
    low = settings.ray_worker_min_replicas
    high = max(low, settings.ray_worker_max_replicas)
    if low == high:
        return {"num_replicas": high}
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": settings.ray_worker_target_ongoing_requests,
        }
    }


def build_app(settings: Settings, overrides: dict[str, Any] | None = None) -> Application:
    """The application for `settings`. Replicas build their settings from `overrides` (default: every setting of
    `settings`) over their own EASEL_* environment."""
    overrides = settings_overrides(settings) if overrides is None else overrides
    graceful_s = settings.drain_timeout_s + SHUTDOWN_GRACE_S
    worker = EaselWorker.options(
        ray_actor_options={"num_gpus": settings.ray_worker_num_gpus, "num_cpus": settings.ray_worker_num_cpus},
        # A job is one request for its whole life: a replica holds its admission queue plus a running batch.
        max_ongoing_requests=settings.queue_size + settings.max_batch,
        max_queued_requests=settings.queue_size,  # beyond: BackPressureError, answered 429 like a full queue
        graceful_shutdown_timeout_s=graceful_s,
        **_worker_scaling(settings),
    ).bind(overrides)
    return EaselIngress.options(
        num_replicas=settings.ray_ingress_replicas,
        ray_actor_options={"num_cpus": settings.ray_ingress_num_cpus},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=graceful_s,
    ).bind(worker, overrides)


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files: `args` are settings. Only they travel to the replicas, which read the rest (secrets
    such as EASEL_DATABASE_URL included) from their own environment."""
    args = dict(args or {})
    return build_app(Settings(**args), overrides=args)


def init_ray(settings: Settings, address: str | None = None, **kwargs: Any) -> None:
    """Join the cluster at `address` (or `ray_address`): that cluster's `ray start` flags decide where its dashboard
    listens and whether it requires a token. Or start a local Ray instance with its dashboard and job-submission API
    on `ray_dashboard_host` (127.0.0.1 unless configured): Ray's job API runs any code it is sent. (Ray >= 2.59 also
    requires a token of local instances; RAY_AUTH_MODE=token in the environment turns that on from 2.52.)"""
    address = address or settings.ray_address
    if address:
        ray.init(address=address, **kwargs)
        return
    ray.init(include_dashboard=settings.ray_include_dashboard, dashboard_host=settings.ray_dashboard_host, **kwargs)


def deploy(settings: Settings) -> None:
    """Start Serve's HTTP proxy on the settings' host and port, and deploy (or update) the application."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)


def _gpu_shortfall(settings: Settings) -> str | None:
    """Why the worker replicas could never start on this Ray instance (it has fewer GPUs than they ask for)."""
    wanted = settings.ray_worker_num_gpus * max(1, settings.ray_worker_min_replicas)
    have = ray.cluster_resources().get("GPU", 0.0)
    if wanted <= have:
        return None
    return (
        f"the worker replicas need {wanted:g} GPU(s) and this machine has {have:g}: set EASEL_RAY_WORKER_NUM_GPUS "
        "(0 runs the workers on CPU) or EASEL_RAY_WORKER_MIN_REPLICAS"
    )


def run(settings: Settings, address: str | None = None) -> int:
    """`easel serve --ray`: deploy, then serve until SIGINT/SIGTERM; the application is deleted on the way out (the
    replicas drain their jobs), and a Ray instance started here is stopped."""
    started_here = not (address or settings.ray_address)
    init_ray(settings, address)
    shortfall = _gpu_shortfall(settings) if started_here else None
    if shortfall:
        log.error(shortfall)
        ray.shutdown()
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deploy(settings)
        log.info("easel on Ray Serve: http://%s:%d (Ctrl-C to stop)", settings.host, settings.port)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(APP_NAME)
            if started_here:
                serve.shutdown()
        finally:
            if started_here:
                ray.shutdown()
    return 0
