"""GenPicz-style API (seed 001): /v1/generate, /v1/generations, /v1/styles.

Errors under these paths (and /v1/account, which a later issue adds) answer `{"error": {"code", "message",
"status"}}`, with `param` naming the field of an invalid request (422).
"""

from __future__ import annotations

from fastapi import FastAPI

from server.api.genpicz import routes
from server.api.genpicz.errors import render_genpicz
from server.errors import add_error_renderer

__all__ = ["install", "GENPICZ_PREFIXES"]

GENPICZ_PREFIXES = ("/v1/generate", "/v1/generations", "/v1/styles", "/v1/style-thumbnails/", "/v1/account")


def install(app: FastAPI) -> None:
    app.include_router(routes.build_router())
    for prefix in GENPICZ_PREFIXES:
        add_error_renderer(app, prefix, render_genpicz)
