"""The ingress deployment: the same FastAPI app as `easel serve` (`create_app`), one per replica, whose engine is a
`RemoteEngine` over the worker deployment. Jobs, result files, API keys, rate limits and webhook deliveries live in
the shared database and data directory, so any ingress replica answers any task or result URL."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from pipelines.registry import load_registry
from server.ray_serve.remote_engine import RemoteEngine
from server.settings import Settings


class ReplicaApp:
    """The ASGI app Serve wraps (`serve.ingress` takes an app when the class is defined, before any replica exists):
    it forwards HTTP and lifespan events to the app this process's `EaselIngress` built in its constructor, which
    Serve runs first. A Serve replica is a process of its own, so one slot per process is enough. (Ray 2.60's
    late-bound `__serve_build_asgi_app__` does the same; this works with older Ray too.)"""

    built: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = ReplicaApp.built
        if app is None:
            raise RuntimeError("the Easel ingress replica has not built its app")
        await app(scope, receive, send)


@serve.deployment
@serve.ingress(ReplicaApp())
class EaselIngress:
    def __init__(self, worker: DeploymentHandle, settings_overrides: dict[str, Any]):
        from server.app import create_app
        from server.cli import open_server_refusal

        # Ingress replicas share the job database: none may fail another's running jobs when it starts.
        self.settings = Settings(**{**settings_overrides, "shared_database": True})
        refusal = open_server_refusal(self.settings)  # `host` says what the Serve proxy binds (deploy/ray-serve.yaml)
        if refusal:
            raise RuntimeError(refusal)
        self.registry = load_registry(self.settings.models)
        self.engine = RemoteEngine(
            worker,
            self.registry,
            max_in_flight=self.settings.queue_size * max(1, self.settings.ray_worker_max_replicas),
            accept_timeout_s=self.settings.ray_accept_timeout_s,
        )
        ReplicaApp.built = create_app(self.settings, engine=self.engine, registry=self.registry)
