"""Credits: reserved at submission, charged on completion, given back on failure, cancellation, and when a restart
finds the work interrupted (a crash left it running), on a real SQLite file. Synchronous A1111 calls, which keep
no job record, are covered the same way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from pipelines.errors import GenerationFailed
from pipelines.registry import Registry
from pipelines.request import GenerationRequest
from server.access.db import CreditReservation
from server.access.keys import KeyStore
from server.app import create_app
from server.jobs import JobSpec, create_job_service
from server.jobs.db import utcnow
from server.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.unit.test_jobs import CancellingFakeEngine

GPT = "/v2/image/gpt-image/generate"
SMALL = {"prompt": "a fox", "size": "auto", "quality": "low"}


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def open_reservations(keys: KeyStore) -> int:
    with keys._session() as session:
        return int(session.scalar(select(func.count()).select_from(CreditReservation)) or 0)


class App:
    def __init__(self, tmp_path: Path, registry: Registry):
        self.settings = Settings(data_dir=tmp_path)
        self.engine = CancellingFakeEngine(registry)  # a cancelled job ends cancelled, as on the real engine
        self.app = create_app(self.settings, engine=self.engine, registry=registry)
        self.client = TestClient(self.app)
        self.client.__enter__()
        self.keys: KeyStore = self.app.state.keys
        self.key = self.keys.create("alice", quota=10)
        self.headers = {"Authorization": f"Bearer {self.key.secret}"}

    def used(self) -> int:
        return self.keys.get(self.key.id).credits_used

    def close(self) -> None:
        self.engine.release()
        self.client.__exit__(None, None, None)


@pytest.fixture
def app(tmp_path: Path, registry: Registry) -> Iterator[App]:
    a = App(tmp_path, registry)
    yield a
    a.close()


def test_reserved_at_submission_charged_on_completion(app: App) -> None:
    app.engine.block()
    r = app.client.post(GPT, json={**SMALL, "n": 2, "async": True}, headers=app.headers)
    assert r.status_code == 202, r.text
    app.engine.wait_for_running()
    assert app.used() == 2 and open_reservations(app.keys) == 1  # held while it runs
    app.engine.release()
    wait_until(lambda: open_reservations(app.keys) == 0)
    key = app.keys.get(app.key.id)
    assert key.credits_used == 2 and key.images_generated == 2  # charged, kept


def test_failure_and_cancellation_give_credits_back(app: App) -> None:
    app.engine.fail_with = GenerationFailed("boom")
    assert app.client.post(GPT, json=SMALL, headers=app.headers).status_code >= 500
    wait_until(lambda: app.used() == 0)
    app.engine.fail_with = None

    app.engine.block()
    r = app.client.post(GPT, json={**SMALL, "async": True}, headers=app.headers)
    app.engine.wait_for_running()
    assert app.used() == 1
    task = r.json()["task_address"]
    assert app.client.post(f"/v2/tasks/{task}/cancel", headers=app.headers).status_code < 300
    app.engine.release()  # the fake job sees the cancel at its next step
    wait_until(lambda: app.used() == 0 and open_reservations(app.keys) == 0)
    assert app.keys.get(app.key.id).images_generated == 0


def test_a1111_sync_call_reserves_then_charges_or_gives_back(app: App) -> None:
    body = {"prompt": "a fox", "width": 64, "height": 64, "steps": 1, "batch_size": 2}
    assert app.client.post("/sdapi/v1/txt2img", json=body, headers=app.headers).status_code == 200
    # Settled before the answer: the account is up to date as soon as the call returns.
    assert open_reservations(app.keys) == 0
    assert app.used() == 2 and app.keys.get(app.key.id).images_generated == 2
    app.engine.fail_with = GenerationFailed("boom")
    assert app.client.post("/sdapi/v1/txt2img", json=body, headers=app.headers).status_code >= 500
    wait_until(lambda: open_reservations(app.keys) == 0)
    assert app.used() == 2  # the failed call's two came back


def test_restart_gives_back_what_a_crash_left_running(tmp_path: Path, registry: Registry) -> None:
    """A process reserves credits for a queued job and for a synchronous A1111 call, completes a third job but dies
    before closing its reservation; the next start on the same SQLite file returns the first two, charges the third."""
    settings = Settings(data_dir=tmp_path)
    crashed = create_job_service(settings)
    crashed.ensure_started()
    keys: KeyStore = crashed.accounting.keys  # type: ignore[union-attr]
    key = keys.create("alice", quota=10)
    engine = FakeEngine(registry)
    engine.block()  # nothing finishes before the "crash"

    def spec(n: int) -> JobSpec:
        request = GenerationRequest(model="demo-sd15", prompt="x", width=64, height=64, steps=1, batch_size=n)
        return JobSpec(request, "gateway", "qwen", {}, lambda result, images: {}, owner=key.id)

    running = crashed.submit(engine, spec(3))
    crashed.accounting.reserve(key.id, 2, None, crashed.runner_id)  # an A1111 call in flight
    done = crashed.submit(engine, spec(1))
    # The third job completed and was stored, but the process died before its credits were settled.
    crashed.store.finish_completed(done.job_id, seeds=[1], result_json={}, files=[], now=utcnow())
    assert keys.get(key.id).credits_used == 6 and open_reservations(keys) == 3
    # The crash: nothing closes the service; the database file is all that is left.
    del crashed

    restarted = create_job_service(settings)
    restarted.ensure_started()
    assert restarted.store.get(running.job_id).status == "failed"
    assert restarted.store.get(running.job_id).error_code == "interrupted"
    assert KeyStore(restarted.store.engine).get(key.id).credits_used == 1  # 3 + 2 back, the completed 1 charged
    assert open_reservations(keys) == 0
    restarted.close()
    engine.release()
