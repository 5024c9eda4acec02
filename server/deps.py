"""FastAPI dependencies: the app-wide settings, registry and engine, set on `app.state` by `create_app`."""

from __future__ import annotations

from fastapi import Request

from pipelines.engine_api import EngineClient
from pipelines.registry import Registry
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine
