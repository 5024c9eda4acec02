"""OpenAI Images: /v1/images/generations, /edits, /variations, /v1/models (errors in OpenAI's shape).

The official `openai` SDK works unchanged with `base_url=http://<host>:7860/v1`. See README "OpenAI Images API".
"""

from __future__ import annotations

from fastapi import FastAPI

from server.api.openai_images import routes
from server.api.openai_images.errors import PREFIXES, render_openai
from server.errors import add_error_renderer

__all__ = ["install"]


def install(app: FastAPI) -> None:
    app.include_router(routes.build_router())
    for prefix in PREFIXES:
        add_error_renderer(app, prefix, render_openai)
