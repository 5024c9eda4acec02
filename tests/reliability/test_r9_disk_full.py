"""R9: a full disk while serving is a 507 Insufficient Storage (with Retry-After) in the dialect's own error shape,
never a 500, and the server serves again once space is back. The full disk is simulated: the result-file write
and the database writes raise what they raise on a full disk (OSError ENOSPC; SQLite's "database or disk is
full"); nothing fills a real disk."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from pipelines.registry import Registry
from server.app import create_app
from server.settings import Settings
from tests.api.fake_engine import FakeEngine

QWEN = ("/v2/image/qwen/generate", {"prompt": "a fox", "size": "64x64"})
OPENAI = ("/v1/images/generations", {"prompt": "a fox", "size": "64x64", "response_format": "url"})
GENPICZ = ("/v1/generate", {"prompt": "a fox", "width": 512, "height": 512})


def enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def sqlite_full(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("INSERT INTO jobs ...", {}, sqlite3.OperationalError("database or disk is full"))


@pytest.fixture
def app(tmp_path: Path, registry: Registry) -> Iterator[tuple[TestClient, Any]]:
    engine = FakeEngine(registry)
    application = create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)
    with TestClient(application) as client:
        yield client, application
    engine.release()


def post(client: TestClient, route: tuple[str, dict[str, Any]]) -> Any:
    return client.post(route[0], json=route[1])


def test_results_disk_full_is_507_in_each_shape_then_recovers(
    app: tuple[TestClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, application = app
    files = application.state.jobs.files
    with monkeypatch.context() as m:
        m.setattr(files, "write", enospc)
        r = post(client, QWEN)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage" and "disk is full" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "60"
        r = post(client, OPENAI)
        assert r.status_code == 507, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "insufficient_storage"
        r = post(client, GENPICZ)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage"
    # Space is back: the same requests work, nothing needs a restart.
    for route in (QWEN, OPENAI, GENPICZ):
        assert post(client, route).status_code == 200


def test_database_full_is_507_at_submission_and_when_storing(
    app: tuple[TestClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, application = app
    store = application.state.jobs.store
    with monkeypatch.context() as m:
        m.setattr(store, "add", sqlite_full)  # the job record cannot be written
        r = post(client, QWEN)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage"
    with monkeypatch.context() as m:
        # The image file is written but neither the result nor the failure can be recorded.
        m.setattr(store, "finish_completed", sqlite_full)
        m.setattr(store, "finish_failed", sqlite_full)
        r = post(client, OPENAI)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage"
    assert post(client, QWEN).status_code == 200
