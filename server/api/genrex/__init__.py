"""Genrex-style job API (seed 000): /image/create, /image/status/{uuid} (also under /v1).

Errors under these paths answer `{"success": false, "message", "error": {"code", "message", "field"}}` (plus
FastAPI's `detail` list on a 422), so a client that checks `success` and shows `message` reads every failure.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.api.genrex import routes
from server.errors import ErrorInfo, add_error_renderer, render_default

__all__ = ["install", "render_genrex"]

_DEFAULT_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def render_genrex(info: ErrorInfo) -> dict[str, Any]:
    code = info.code or _DEFAULT_CODES.get(info.status, "server_error" if info.status >= 500 else "error")
    body: dict[str, Any] = {
        "success": False,
        "message": info.message,
        "error": {"code": code, "message": info.message, "field": info.field},
    }
    if info.status == 422 and info.field_errors:
        body["detail"] = render_default(info)["detail"]
    return body


def install(app: FastAPI) -> None:
    for prefix in routes.PREFIXES:
        app.include_router(routes.build_router(prefix))
        add_error_renderer(app, f"{prefix}/image/", render_genrex)
