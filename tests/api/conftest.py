"""The A1111 API tests' shared fixtures: the fake engine over the A1111 test registry (MODELS_YAML) and a client of
the whole app with A1111's limits. A module that needs another `engine` or `client` defines its own (pytest uses the
nearest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry, load_registry
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
