"""server/jobs: the job store (SQLAlchemy on SQLite), result files, and the JobService on a fake engine (no torch)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines.engine_api import JobStatus
from pipelines.errors import InvalidRequest, JobCancelled
from pipelines.registry import Registry
from pipelines.request import GenerationRequest, GenerationResult
from server.jobs import JobService, JobSpec, StoredImage
from server.jobs.db import utcnow
from server.jobs.files import ResultFiles
from server.jobs.store import RESTART_ERROR, JobStore, NewFile, NewJob
from tests.api.fake_engine import FakeEngine, FakeJob, seed_color


class CancellableFakeJob(FakeJob):
    """The fake finishes a cancelled job as completed; the real engine ends it CANCELLED with JobCancelled."""

    @property
    def status(self) -> JobStatus:
        return JobStatus.CANCELLED if self.cancel_requested and self._done.is_set() else super().status

    @property
    def error(self) -> BaseException | None:
        if self.cancel_requested and self._done.is_set():
            return JobCancelled(f"job {self.id} was cancelled")
        return super().error


class CancellingFakeEngine(FakeEngine):
    def submit(self, request: GenerationRequest) -> FakeJob:
        job = super().submit(request)
        job.__class__ = CancellableFakeJob  # before it can finish: tests that cancel hold jobs with block()
        return job


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    s.create_tables()
    yield s
    s.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[JobService]:
    svc = JobService(JobStore(f"sqlite:///{tmp_path / 'jobs.db'}"), ResultFiles(tmp_path / "results"), default_ttl_s=60)
    yield svc
    svc.close()


@pytest.fixture
def engine(registry: Registry) -> Iterator[CancellingFakeEngine]:
    eng = CancellingFakeEngine(registry)
    yield eng
    eng.release()


def new_job(job_id: str = "j1", **overrides: Any) -> NewJob:
    values: dict[str, Any] = dict(
        id=job_id,
        task_address=f"addr-{job_id}",
        dialect="gateway",
        route="qwen",
        model="demo-qwen-image",
        request_json={"prompt": "p"},
        ttl_s=60.0,
    )
    return NewJob(**{**values, **overrides})


def urls_body(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    return {"urls": [im.as_url() for im in images], "first": images[0].as_base64() if images else None}


def spec(**overrides: Any) -> JobSpec:
    request = GenerationRequest(model="demo-qwen-image", prompt="a cat", width=64, height=48, steps=2, seed=7)
    values: dict[str, Any] = dict(
        request=request, dialect="gateway", route="qwen", request_json={"prompt": "a cat"}, render=urls_body
    )
    return JobSpec(**{**values, **overrides})


def finished(service: JobService, ticket: Any, timeout: float = 10.0) -> Any:
    return ticket.finished.result(timeout=timeout)


# Store ----------------------------------------------------------------------------------------------------------------


def test_store_roundtrip_and_finish_is_final(store: JobStore) -> None:
    now = utcnow()
    store.add(new_job(), now)
    record = store.get_by_address("addr-j1")
    assert record is not None and record.status == "queued" and record.created_at == now
    store.mark_running("j1", now, 0.5)
    assert store.get("j1").status == "running"
    f = NewFile("tok", 0, "to/tok.png", "image/png", 10, 64, 48, 7)
    assert store.finish_completed("j1", seeds=[7], result_json={"urls": []}, files=[f], now=now)
    # A finished job never changes again: no second finish, no late progress write.
    assert not store.finish_failed("j1", status="failed", error_code="x", error="late", now=now)
    store.mark_running("j1", now, 0.1)
    record = store.get("j1")
    assert (record.status, record.progress, record.seeds) == ("completed", 1.0, [7])
    assert record.expires_at == now + timedelta(seconds=60)
    assert store.file("tok").expires_at == record.expires_at


def test_recover_interrupted_marks_unfinished_jobs_failed(store: JobStore) -> None:
    now = utcnow()
    for job_id in ("queued", "running", "done"):
        store.add(new_job(job_id), now)
    store.mark_running("running", now, 0.3)
    store.finish_completed("done", seeds=[1], result_json={}, files=[], now=now)
    assert store.recover_interrupted(now) == 2
    for job_id in ("queued", "running"):
        record = store.get(job_id)
        assert (record.status, record.error_code, record.error) == ("failed", "interrupted", RESTART_ERROR)
        assert record.finished_at is not None
    assert store.get("done").status == "completed"


def test_delete_expired_returns_file_paths(store: JobStore) -> None:
    now = utcnow()
    store.add(new_job("old", ttl_s=1.0), now)
    store.add(new_job("new", ttl_s=3600.0), now)
    for job_id in ("old", "new"):
        f = NewFile(f"t-{job_id}", 0, f"x/{job_id}.png", "image/png", 1, 1, 1, None)
        store.finish_completed(job_id, seeds=[], result_json={}, files=[f], now=now)
    assert store.delete_expired(now + timedelta(seconds=2)) == ["x/old.png"]
    assert store.get("old") is None and store.file("t-old") is None
    assert store.get("new") is not None and store.file("t-new") is not None


def test_list_jobs_filters(store: JobStore) -> None:
    now = utcnow()
    store.add(new_job("a", dialect="gateway", owner="alice"), now)
    store.add(new_job("b", dialect="openai", owner="alice"), now + timedelta(seconds=1))
    store.add(new_job("c", dialect="openai", owner="bob"), now + timedelta(seconds=2))
    assert [r.id for r in store.list_jobs(owner="alice")] == ["b", "a"]  # newest first
    assert [r.id for r in store.list_jobs(dialect="openai")] == ["c", "b"]
    assert [r.id for r in store.list_jobs(dialect="openai", owner="bob", status="queued")] == ["c"]
    assert [r.id for r in store.list_jobs(limit=1, offset=1)] == ["b"]


# Files ----------------------------------------------------------------------------------------------------------------


def test_files_are_written_whole_under_unguessable_names(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    a, b = files.write(b"one", "image/png"), files.write(b"two", "image/jpeg")
    assert a.token != b.token and len(a.token) >= 32
    assert a.path.endswith(".png") and b.path.endswith(".jpg")
    assert files.read(a.path) == b"one"
    assert not list((tmp_path / "results").glob("*/.*.tmp"))
    with pytest.raises(ValueError, match="escapes"):
        files.resolve("../../etc/passwd")
    assert files.read("../outside.png") is None
    assert files.remove([a.path, a.path]) == 1


# Service --------------------------------------------------------------------------------------------------------------


def test_completed_job_stores_files_and_body(service: JobService, engine: FakeEngine) -> None:
    ticket = service.submit(engine, spec())
    record = finished(service, ticket)
    assert record.status == "completed" and record.seeds == [7] and record.model == "demo-qwen-image"
    assert record.request_json == {"prompt": "a cat"}
    files = service.store.files_of(record.id)
    assert [(f.width, f.height, f.seed, f.content_type) for f in files] == [(64, 48, 7, "image/png")]
    body = service.result_body(record, "https://img.example/")
    assert body["urls"] == [f"https://img.example/v2/results/{files[0].token}.png"]
    png = Image.open(io.BytesIO(base64.b64decode(body["first"])))
    assert png.size == (64, 48) and png.getpixel((0, 0)) == seed_color(7)
    stored, data = service.file(files[0].token)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_jpeg_output_and_batch(service: JobService, engine: FakeEngine) -> None:
    request = GenerationRequest(model="demo-flux", prompt="x", width=32, height=32, steps=1, seed=3, batch_size=3)
    record = finished(service, service.submit(engine, spec(request=request, output_format="jpeg")))
    files = service.store.files_of(record.id)
    assert [f.seed for f in files] == [3, 4, 5] and {f.content_type for f in files} == {"image/jpeg"}
    assert all(f.path.endswith(".jpg") for f in files)


def test_refused_submission_leaves_no_record(service: JobService, engine: FakeEngine) -> None:
    engine.submit_error = InvalidRequest("width", "must be a multiple of 16")
    with pytest.raises(InvalidRequest):
        service.submit(engine, spec())
    assert service.list_jobs() == []


def test_failed_job_records_a_client_safe_error(service: JobService, engine: FakeEngine) -> None:
    from pipelines.errors import GenerationFailed

    engine.fail_with = GenerationFailed("generation failed: RuntimeError: boom")
    record = finished(service, service.submit(engine, spec()))
    assert (record.status, record.error_code, record.error) == (
        "failed",
        "generation_failed",
        "generation failed: RuntimeError: boom",
    )
    assert service.store.files_of(record.id) == []


def test_render_failure_fails_the_job_and_removes_its_files(service: JobService, engine: FakeEngine) -> None:
    def broken(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
        raise KeyError("oops")

    record = finished(service, service.submit(engine, spec(render=broken)))
    assert record.status == "failed" and record.error_code == "result_storage_failed"
    assert "KeyError" in record.error and "oops" not in record.error
    assert not [p for p in (service.files.root).rglob("*") if p.is_file()]


def test_cancel_queued_and_running(service: JobService, engine: CancellingFakeEngine) -> None:
    engine.block()
    running = service.submit(engine, spec())
    engine.wait_for_running()
    queued = service.submit(engine, spec())
    assert service.task(running.task_address).status == "running"
    assert service.task(queued.task_address).status == "queued"
    assert service.cancel(queued.task_address) is queued
    assert service.cancel(running.task_address) is running
    assert service.task(running.task_address).cancel_requested
    for ticket in (running, queued):
        record = finished(service, ticket)
        assert (record.status, record.error_code) == ("cancelled", "cancelled")
    view = service.cancel(running.task_address)  # already cancelled: its view, unchanged
    assert view.status == "cancelled"
    assert service.cancel("unknown") is None


def test_engine_side_cancellation_is_a_failure_not_a_cancel(service: JobService, engine: FakeEngine) -> None:
    """Jobs the engine drops at shutdown were not cancelled by their client: they failed."""
    engine.fail_with = JobCancelled("the server is shutting down")
    record = finished(service, service.submit(engine, spec()))
    assert (record.status, record.error_code, record.error) == ("failed", "interrupted", "the server is shutting down")


def test_wait_times_out_and_the_job_goes_on(service: JobService, engine: FakeEngine) -> None:
    engine.block()
    ticket = service.submit(engine, spec())
    with pytest.raises(TimeoutError):
        asyncio.run(service.wait(ticket, 0.05))
    engine.release()
    assert asyncio.run(service.wait(ticket, 10)).status == "completed"


def test_progress_is_persisted_while_running(service: JobService, engine: FakeEngine) -> None:
    engine.block()
    ticket = service.submit(engine, spec())
    engine.wait_for_running()
    service.start_background()
    deadline = time.monotonic() + 5
    while service.store.get(ticket.job_id).status != "running":
        assert time.monotonic() < deadline, "running never persisted"
        time.sleep(0.05)
    assert service.store.get(ticket.job_id).started_at is not None
    engine.release()
    assert finished(service, ticket).status == "completed"


def test_startup_recovery_and_shutdown(tmp_path: Path, engine: FakeEngine) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = JobService(JobStore(url), ResultFiles(tmp_path / "results"), default_ttl_s=60)
    done = finished(first, first.submit(engine, spec()))
    engine.block()
    left = first.submit(engine, spec())
    engine.wait_for_running()
    first.close()  # the engine never stopped the job: the service marks it
    assert first_status(url, left.job_id) == ("failed", "interrupted by a server shutdown")

    # A process killed mid-job leaves `running` behind; the next one marks it failed before serving.
    store = JobStore(url)
    store.add(new_job("ghost"), utcnow())
    store.mark_running("ghost", utcnow(), 0.4)
    store.close()
    second = JobService(JobStore(url), ResultFiles(tmp_path / "results"), default_ttl_s=60)
    second.ensure_started()
    assert first_status(url, "ghost") == ("failed", RESTART_ERROR)
    record = second.store.get(done.id)
    assert record.status == "completed" and second.result_body(record, "http://h")["urls"][0].startswith("http://h/")
    engine.release()
    second.close()


def first_status(url: str, job_id: str) -> tuple[str, str | None]:
    store = JobStore(url)
    try:
        record = store.get(job_id)
        return record.status, record.error
    finally:
        store.close()


def test_sweep_deletes_expired_results_and_orphans(service: JobService, engine: FakeEngine) -> None:
    record = finished(service, service.submit(engine, spec(ttl_s=0.2)))
    keep = finished(service, service.submit(engine, spec()))
    token = service.store.files_of(record.id)[0].token
    orphan = service.files.root / "zz" / "orphan.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left over by a crash")
    time.sleep(0.3)
    assert service.file(token) is None  # expired: unreachable at once, before any sweep
    assert service.sweep() == 1
    assert service.store.get(record.id) is None
    assert service.store.get(keep.id) is not None and service.store.files_of(keep.id)
    assert orphan.exists()  # too young to be called an orphan (a write may be under way)
    service.files.stored = lambda older_than_s=0: ["zz/orphan.png"]  # type: ignore[method-assign]
    service.sweep()
    assert not orphan.exists()
    assert len([p for p in service.files.root.rglob("*.png")]) == 1


def test_file_references_resolve_only_to_the_jobs_own_files(service: JobService, engine: FakeEngine) -> None:
    other = finished(service, service.submit(engine, spec()))
    foreign = service.store.files_of(other.id)[0].token

    def sneaky(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
        return {"mine": images[0].as_url(), "theirs": {"$easel_file": foreign, "as": "base64"}}

    record = finished(service, service.submit(engine, spec(render=sneaky)))
    body = service.result_body(record, "http://h")
    assert body["mine"].startswith("http://h/v2/results/") and body["theirs"] is None


def test_listeners_see_each_finished_job(service: JobService, engine: FakeEngine) -> None:
    seen: list[str] = []
    service.add_listener(lambda record: seen.append(record.status))
    finished(service, service.submit(engine, spec(webhook_url="https://hooks.example/x", owner="alice")))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["completed"]
    record = service.list_jobs(owner="alice")[0]
    assert record.webhook_url == "https://hooks.example/x"


def reopened_without(tmp_path: Path, column: str) -> JobStore:
    """A store opened (tables created) on a database made before `column` existed: made today, the column dropped."""
    import contextlib
    import sqlite3

    path = tmp_path / "old.db"
    store = JobStore(f"sqlite:///{path}")
    store.create_tables()
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        con.commit()
    store = JobStore(f"sqlite:///{path}")
    store.create_tables()
    return store


def test_missing_nullable_columns_are_added_to_an_older_database(tmp_path: Path) -> None:
    store = reopened_without(tmp_path, "timings")
    store.add(new_job(), utcnow())
    assert store.finish_completed("j1", seeds=[1], result_json={}, files=[], now=utcnow(), timings={"run_s": 1.5})
    assert store.get("j1").timings == {"run_s": 1.5}
    store.close()


def test_request_id_column_is_added_to_an_older_database(tmp_path: Path) -> None:
    store = reopened_without(tmp_path, "request_id")
    store.add(new_job(request_id="req-42"), utcnow())
    assert store.get("j1").request_id == "req-42"
    store.close()
