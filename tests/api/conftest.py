"""The API tests' shared fixtures: the fake engine over the A1111 test registry (MODELS_YAML) and a client of the whole
app with A1111's limits (a module that needs another `engine` or `client` defines its own: pytest uses the nearest),
and `open_app`, whole apps over fake engines that the job-API dialects' modules wrap in their own small drivers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.registry import Registry, load_registry
from server.app import create_app
from server.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import MODELS_YAML, client_with


@pytest.fixture
def a1111_registry(tmp_path: Path) -> Registry:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    return load_registry(path)


@pytest.fixture
def engine(a1111_registry: Registry) -> Iterator[FakeEngine]:
    eng = FakeEngine(a1111_registry)
    yield eng
    eng.release()


@pytest.fixture
def client(engine: FakeEngine, a1111_registry: Registry) -> Iterator[TestClient]:
    with client_with(engine, a1111_registry) as c:
        yield c


@dataclass
class OpenApp:
    client: TestClient
    engine: FakeEngine
    app: FastAPI
    settings: Settings


@pytest.fixture
def open_app(tmp_path: Path, registry: Registry) -> Iterator[Callable[..., OpenApp]]:
    """`open_app(reg, engine_type, **settings)`: the whole app over a new fake engine (on `registry` unless `reg`),
    its client entered so the lifespan (job store start-up and shut-down) runs, each app with its own data dir unless
    the settings name one. Every app is closed and its engine released at teardown."""
    opened: list[OpenApp] = []

    def open_(reg: Registry | None = None, engine_type: type[FakeEngine] = FakeEngine, **overrides: Any) -> OpenApp:
        reg = reg or registry
        settings = Settings(**{"data_dir": tmp_path / f"data{len(opened)}", **overrides})
        engine = engine_type(reg)
        app = create_app(settings, engine=engine, registry=reg)
        client = TestClient(app)
        client.__enter__()
        opened.append(OpenApp(client, engine, app, settings))
        return opened[-1]

    yield open_
    for opened_app in opened:
        opened_app.engine.release()
        opened_app.client.__exit__(None, None, None)
