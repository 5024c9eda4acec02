"""R2: every request has a deadline (queue wait + run). Expired queued work is dropped before it reaches the device;
running work stops at the next denoising step. Both fail with DeadlineExceeded: HTTP 504 `deadline_exceeded` on a
synchronous call, a failed job with that code on an asynchronous one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.engine import Engine
from pipelines.engine_api import JobStatus
from pipelines.errors import DeadlineExceeded
from pipelines.registry import Registry
from server.app import create_app
from server.errors import error_info
from server.settings import Settings
from tests.engine_helpers import (
    busy,
    demo_registry,
    record_calls,
    release,
    req,
    start_engine,
    wait_for_step,
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return demo_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(data_dir: Path, registry: Registry):
    eng = start_engine(data_dir, registry, queue_size=4, request_timeout_s=120)
    yield eng
    eng.stop()


def test_every_request_gets_a_deadline(engine: Engine) -> None:
    before = time.time()
    job = engine.submit(req())
    assert before + 120 <= job.request.deadline <= time.time() + 120  # the engine's request_timeout_s
    explicit = time.time() + 30
    assert engine.submit(req(deadline=explicit)).request.deadline == explicit  # a dialect's own deadline is kept
    job.wait_sync(60)
    with pytest.raises(DeadlineExceeded):  # already past: refused at submit
        engine.submit(req(deadline=time.time() - 1))
    info = error_info(DeadlineExceeded("x"))
    assert (info.status, info.code) == (504, "deadline_exceeded")


def test_expired_queued_work_never_reaches_the_device(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_calls(monkeypatch)
    blocker = busy(engine)
    doomed = engine.submit(req(prompt="doomed", deadline=time.time() + 0.5))
    # Its client hears while the device is still busy with the blocker: the worker sweeps the queue between steps.
    with pytest.raises(DeadlineExceeded, match="in the queue; it never ran"):
        doomed.wait_sync(10)
    assert not blocker.done and doomed.status == JobStatus.FAILED
    assert doomed.progress.started_at is None and engine.queued_count() == 0  # its admission slot is free again
    release(blocker)
    assert engine.submit(req(prompt="after")).wait_sync(60).images
    prompts = [p for call in calls for p, _ in call]
    assert "doomed" not in prompts and prompts[-1] == "after"


def test_expired_work_behind_a_model_load_is_dropped_when_it_comes_off_the_queue(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No sweep runs while the worker is stuck outside a denoising loop (here: a slow model load); the job is still
    dropped the moment the worker reaches it, before the pipeline is called."""
    calls = record_calls(monkeypatch)
    original_get = engine.cache.get

    def slow_get(spec):
        time.sleep(1.0)
        return original_get(spec)

    monkeypatch.setattr(engine.cache, "get", slow_get)
    job = engine.submit(req(prompt="slow load", deadline=time.time() + 0.3))
    with pytest.raises(DeadlineExceeded):
        job.wait_sync(10)
    assert calls == []


def test_running_work_stops_at_the_next_step(engine: Engine) -> None:
    job = engine.submit(req(prompt="too slow", steps=2000, deadline=time.time() + 1.0))
    with pytest.raises(DeadlineExceeded, match="stopped at step") as e:
        job.wait_sync(30)
    stopped_at = job.progress.sampling_step
    assert 0 < stopped_at < 2000 and f"stopped at step {stopped_at} of 2000" in str(e.value)
    # The pipeline call itself was interrupted: the device is free within a step or two, not after 2000 steps.
    deadline = time.monotonic() + 10
    while engine.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_jobs() == []
    assert job.progress.sampling_step <= stopped_at + 2
    assert engine.submit(req(prompt="next")).wait_sync(60).images


def test_a_batched_request_past_its_deadline_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_calls(monkeypatch)
    blocker = busy(engine)
    keeps = engine.submit(req(prompt="keeps", steps=60, seed=3))
    expires = engine.submit(req(prompt="expires", steps=60, seed=4))
    release(blocker)
    wait_for_step(expires, 2)
    assert {j.id for j in engine.running_jobs()} == {keeps.id, expires.id}
    expires.deadline = time.time()  # its deadline passes while it shares a running call
    with pytest.raises(DeadlineExceeded, match="stopped at step"):
        expires.wait_sync(60)
    assert not keeps.done  # answered while its companion still runs
    result = keeps.wait_sync(120)
    assert len(result.images) == 1 and keeps.progress.sampling_step == 60
    assert calls[-1] == [("keeps", [3]), ("expires", [4])]  # they shared the call


def test_http_sync_504_and_async_failed_job(data_dir: Path, registry: Registry, tmp_path: Path) -> None:
    """Through the server: the engine's default deadline (request_timeout_s) applies to a dialect that sets none."""
    engine = start_engine(data_dir, registry, request_timeout_s=1.0)
    app = create_app(
        Settings(data_dir=tmp_path, request_timeout_s=1.0, max_steps=2000), engine=engine, registry=registry
    )
    with TestClient(app) as client:
        body = {"prompt": "slow", "steps": 2000, "width": 64, "height": 64}
        started = time.monotonic()
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 504 and r.json()["error"] == "DeadlineExceeded", r.text
        assert time.monotonic() - started < 15

        r = client.post("/v2/automatic1111/sdapi/v1/txt2img", json={**body, "model": "demo-sd15", "async": True})
        assert r.status_code == 202, r.text
        url = r.json()["poll_url"].replace("http://testserver", "")
        deadline = time.monotonic() + 30
        while (task := client.get(url).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
        assert task["status"] == "failed" and task["error"]["code"] == "deadline_exceeded", task
