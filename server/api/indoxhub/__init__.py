"""IndoxHub-style POST /api/v1/images/generations (seed 002).

Errors under /api/v1/ answer `{"success": false, "message", "detail", "error": {"code", "message", "type", "param",
"field"}}`: IndoxHub's envelope (`success`, `message`), FastAPI's `detail` (a list naming each invalid field on a
422, as IndoxHub's FastAPI server answers), and an OpenAI-style `error` object for the OpenAI SDK clients the
document shows.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.api.indoxhub import routes
from server.errors import ErrorInfo, add_error_renderer, render_default

__all__ = ["install", "render_indoxhub"]

ERROR_PREFIX = "/api/v1/"
_DEFAULT_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def render_indoxhub(info: ErrorInfo) -> dict[str, Any]:
    code = info.code or _DEFAULT_CODES.get(info.status, "server_error" if info.status >= 500 else "error")
    kind = "server_error" if info.status >= 500 else "invalid_request_error"
    return {
        "success": False,
        "message": info.message,
        "detail": render_default(info)["detail"],
        "error": {"code": code, "message": info.message, "type": kind, "param": info.field, "field": info.field},
    }


def install(app: FastAPI) -> None:
    app.include_router(routes.build_router())
    add_error_renderer(app, ERROR_PREFIX, render_indoxhub)
