"""The /v2 image gateway: `/v2/image/*` routes on local models, `/v2/tasks/*` and `/v2/results/*`.

Errors under these paths answer `{"error": {"code", "message", "field"}}` (plus FastAPI's `detail` on a 422).
"""

from __future__ import annotations

from fastapi import FastAPI

from server.api.gateway import routes, tasks
from server.errors import GATEWAY_PREFIXES, add_error_renderer, render_gateway

__all__ = ["install"]


def install(app: FastAPI) -> None:
    app.include_router(routes.build_router())
    app.include_router(tasks.build_router())
    for prefix in GATEWAY_PREFIXES:
        add_error_renderer(app, prefix, render_gateway)
