"""The sd-webui-controlnet extension's routes about models and settings: `GET /controlnet/version`,
`/controlnet/model_list` and `/controlnet/settings` (also under `/v2/automatic1111/controlnet/`). The preprocessor
routes (`module_list`, `detect`) live in their own module.

Models are listed as the extension lists them: "name [hash]" with A1111's short file hash, from the `ControlNet`
folder of the A1111 models directory (`checkpoints_dir`), plus the demo models' tiny ControlNets.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool

from pipelines import controlnet_models
from pipelines.controlnet_models import ControlNetEntry
from server.api.a1111.state import Session, get_session

API_VERSION = 3  # external_code.get_api_version() of v1.1.455
DEFAULT_UNIT_COUNT = 3  # the extension's `control_net_unit_count` option default
PREFIXES = ("/controlnet", "/v2/automatic1111/controlnet")


class ControlNetCatalog:
    """The listed models, scanned once and again on `?update=true` or when a request names one not seen yet."""

    def __init__(self, app: FastAPI):
        self.app = app
        self._lock = threading.Lock()
        self._entries: list[ControlNetEntry] | None = None

    def scan(self) -> list[ControlNetEntry]:
        settings = self.app.state.settings
        folder = settings.checkpoints_dir / "ControlNet" if settings.checkpoints_dir else None
        registry = self.app.state.registry
        demo_families = tuple(spec.demo_kind for spec in registry if spec.is_demo)
        entries = controlnet_models.scan(folder, demo_families)
        with self._lock:
            self._entries = entries
        return entries

    def entries(self) -> list[ControlNetEntry]:
        with self._lock:
            entries = self._entries
        return entries if entries is not None else self.scan()

    def find(self, name: str) -> ControlNetEntry | None:
        return controlnet_models.resolve(self.entries(), name) or controlnet_models.resolve(self.scan(), name)


def catalog(app: FastAPI) -> ControlNetCatalog:
    found = getattr(app.state, "controlnet_catalog", None)
    if found is None:
        found = app.state.controlnet_catalog = ControlNetCatalog(app)
    return found


def build_router() -> APIRouter:
    router = APIRouter(tags=["controlnet"])

    @router.get("/version")
    async def version() -> dict[str, int]:
        """The extension's API version."""
        return {"version": API_VERSION}

    @router.get("/model_list")
    async def model_list(request: Request, update: bool = Query(True)) -> dict[str, list[str]]:
        """ControlNet models as "name [hash]" (`update`: scan the folder again, as the extension does by default)."""
        cat = catalog(request.app)
        entries = await run_in_threadpool(cat.scan if update else cat.entries)
        return {"model_list": [e.title for e in entries]}

    @router.get("/settings")
    async def settings(session: Session = Depends(get_session)) -> dict[str, Any]:
        """The extension's settings route: how many units its UI shows."""
        count = session.options.get("control_net_unit_count", DEFAULT_UNIT_COUNT)
        return {"control_net_unit_count": count}

    return router


def install(app: FastAPI) -> None:
    for prefix in PREFIXES:
        app.include_router(build_router(), prefix=prefix)
