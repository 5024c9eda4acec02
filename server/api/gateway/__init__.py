"""The /v2 image gateway: `/v2/image/*` routes on local models, `/v2/tasks/*`, `/v2/results/*`, `/v2/history` and
`/v2/models`.

Errors under these paths answer `{"error": {"code", "message", "field"}}` (plus FastAPI's `detail` on a 422).
"""

from __future__ import annotations

from fastapi import FastAPI

from server.api.gateway import history, models, routes, tasks
from server.errors import GATEWAY_PREFIXES, add_error_renderer, render_gateway

__all__ = ["install"]


def install(app: FastAPI) -> None:
    app.include_router(routes.build_router())
    app.include_router(tasks.build_router())
    app.include_router(history.build_router())
    app.include_router(models.build_router())
    for prefix in GATEWAY_PREFIXES:
        add_error_renderer(app, prefix, render_gateway)
