"""R5, the engine's part: `Engine.drain(timeout_s)` stops admitting, lets queued and running work finish for up to
`timeout_s`, then cancels the rest (queued jobs never run, running ones stop at their next step), each with a
JobCancelled that says the server shut down. The HTTP side (SIGTERM -> drain) is tested with the process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.engine_api import JobStatus
from pipelines.errors import EngineNotReady, JobCancelled
from pipelines.registry import Registry
from server.app import create_app
from server.settings import Settings
from tests.engine_helpers import (
    busy,
    demo_registry,
    record_calls,
    req,
    start_engine,
    wait_for_step,
    wait_until,
)
from tests.reliability.http_helpers import RawPost, with_gate


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return demo_registry(tmp_path_factory)


def test_drain_lets_queued_and_running_work_finish(data_dir: Path, registry: Registry) -> None:
    engine = start_engine(data_dir, registry, max_batch=1)
    running = engine.submit(req(prompt="running", steps=30))
    wait_for_step(running, 1)
    queued = [engine.submit(req(prompt=f"queued {i}", seed=i)) for i in range(2)]

    report = engine.drain(timeout_s=120)
    assert report.finished and report.cancelled == 0
    assert all(j.status == JobStatus.COMPLETED for j in [running, *queued])
    assert running.wait_sync(1).images and running.progress.sampling_step == 30  # it ran to the end
    # Draining: not ready, still alive, no new work.
    assert not engine.ready and engine.alive
    with pytest.raises(EngineNotReady, match="shutting down"):
        engine.submit(req())
    engine.stop()
    assert not engine._worker.is_alive()  # stop() still ends the worker after a drain


def test_drain_cancels_what_does_not_finish_in_time(
    data_dir: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = start_engine(data_dir, registry, max_batch=1)
    calls = record_calls(monkeypatch)
    running = busy(engine)  # 2000 steps: far longer than the drain timeout
    queued = engine.submit(req(prompt="never runs"))
    started = time.monotonic()
    report = engine.drain(timeout_s=0.5)
    took = time.monotonic() - started

    assert not report.finished and report.cancelled == 2
    assert 0.5 <= took < 10  # the timeout, plus at most the running step and the decode
    for job in (running, queued):
        assert job.status == JobStatus.CANCELLED
        with pytest.raises(JobCancelled, match="server shut down"):
            job.wait_sync(1)
    assert running.progress.sampling_step < 2000  # stopped at its next step, not run to the end
    assert queued.progress.started_at is None and "never runs" not in [p for c in calls for p, _ in c]
    assert engine.running_jobs() == []  # drain returned once the device let go of the cancelled call
    engine.stop()
    assert not engine._worker.is_alive()


def test_drain_with_nothing_to_do_returns_at_once(data_dir: Path, registry: Registry) -> None:
    engine = start_engine(data_dir, registry)
    report = engine.drain(timeout_s=30)
    assert report.finished and report.cancelled == 0 and report.waited_s < 1
    engine.stop()


def test_a_draining_engine_is_refused_with_503_before_the_body_is_read(
    data_dir: Path, registry: Registry, tmp_path: Path
) -> None:
    engine = start_engine(data_dir, registry)
    app = with_gate(create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry))
    with TestClient(app) as client:
        engine.drain(timeout_s=5)
        post = RawPost(app, "/sdapi/v1/txt2img")
        status, headers, body = post.run()
        assert status == 503 and not post.body_read and int(headers["retry-after"]) > 0
        assert body.startswith(b'{"error":"EngineNotReady"') and b"shutting down" in body
        r = client.post("/v2/image/flux/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"


def test_a_synchronous_caller_cancelled_by_the_shutdown_is_told_to_retry(
    data_dir: Path, registry: Registry, tmp_path: Path
) -> None:
    """Issue #14: the drain deadline cancelling a job is no fault of its caller: 503 + Retry-After, not 409."""
    import threading

    engine = start_engine(data_dir, registry, max_batch=1)
    app = create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)
    answers = []
    with TestClient(app) as client:
        running = busy(engine)  # 2000 steps: far past the drain deadline
        waiter = threading.Thread(
            target=lambda: answers.append(
                client.post("/sdapi/v1/txt2img", json={"prompt": "sync", "steps": 2, "width": 64, "height": 64})
            )
        )
        waiter.start()
        wait_until(lambda: engine.queued_count() == 1, what="the synchronous job queued")
        engine.drain(timeout_s=0.2)
        waiter.join(30)
        assert running.status == JobStatus.CANCELLED
    (answer,) = answers
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) > 0 and "shut down" in answer.json()["detail"]
    assert answer.json()["error"] == "ShutdownCancelled"
