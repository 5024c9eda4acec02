"""GET /metrics at the HTTP layer (fake engine), X-Request-ID on every answer and on the job record, and log lines
naming the request (issue #17). The engine's own series (batches, steps, latency) are in
tests/unit/test_engine_metrics.py, on the real engine."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pipelines.registry import Registry
from server.app import create_app
from server.logs import make_handler
from server.request_id import MAX_LENGTH
from server.settings import Settings
from tests.api.fake_engine import FakeEngine

GPT = "/v2/image/gpt-image/generate"
SMALL = {"prompt": "a fox", "size": "auto", "quality": "low"}
A1111 = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse Prometheus' text format (prometheus-client's own parser): {(name, labels): value}."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


@pytest.fixture
def app_engine(registry: Registry, tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine(registry)
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=engine, registry=registry)
    with TestClient(app) as client:
        yield client, engine
    engine.release()


def test_requests_are_counted_by_route_template_dialect_and_status(app_engine) -> None:
    client, engine = app_engine
    before = client.get("/metrics").text
    task = client.post(GPT, json={**SMALL, "async": True}).json()["task_address"]
    assert client.get(f"/v2/tasks/{task}").status_code == 200
    assert client.get("/v2/tasks/no-such-task").status_code == 404
    assert client.post("/sdapi/v1/txt2img", json=A1111).status_code == 200
    assert client.get("/no/such/path").status_code == 404
    engine.queue_size = 0  # a full queue: the admission gate answers 429 before the body is read
    assert client.post("/sdapi/v1/txt2img", json=A1111).status_code == 429

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    route = dict(method="GET", route="/v2/tasks/{task_address}", dialect="gateway")
    assert value(after, "easel_http_requests_total", status="200", **route) == 1  # the template, not the raw path
    assert value(after, "easel_http_requests_total", status="404", **route) == 1
    txt2img = dict(method="POST", route="/sdapi/v1/txt2img", dialect="a1111")
    assert value(after, "easel_http_requests_total", status="200", **txt2img) == 1
    assert value(after, "easel_http_requests_total", status="429", **txt2img) == 1  # refused before routing
    assert value(after, "easel_http_requests_total", route="<unmatched>", status="404") == 1
    assert value(after, "easel_http_requests_total", dialect="openai") == 0
    assert value(after, "easel_http_request_duration_seconds_count", **txt2img) == 2
    assert value(before, "easel_http_requests_total", route="/metrics") == 0
    assert value(after, "easel_http_requests_total", route="/metrics", dialect="health", status="200") == 1
    assert value(after, "easel_queue_depth") == 0  # the fake engine reports its queue, nothing more
    assert value(after, "process_resident_memory_bytes") > 0  # the CPU-side memory figure


def test_503_while_the_engine_is_not_there_is_counted(registry: Registry, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=FakeEngine(registry), registry=registry)
    app.state.engine = None  # as while starting: generation routes answer 503
    client = TestClient(app)  # no lifespan: nothing starts a real engine
    assert client.post("/sdapi/v1/txt2img", json=A1111).status_code == 503
    text = client.get("/metrics").text
    assert value(text, "easel_http_requests_total", route="/sdapi/v1/txt2img", status="503") == 1
    assert "easel_queue_depth" not in text  # no engine, no engine series


def test_with_keys_only_admin_keys_read_metrics(app_engine) -> None:
    client, _ = app_engine
    keys = client.app.state.keys
    user = keys.create("alice")
    admin = keys.create("ops", admin=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/v2/tasks/some-task").status_code == 401  # refused before routing
    r = client.get("/metrics", headers={"Authorization": f"Bearer {user.secret}"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = client.get("/metrics", headers={"Authorization": f"Bearer {admin.secret}"})
    assert r.status_code == 200 and "easel_http_requests_total" in r.text
    assert value(r.text, "easel_http_requests_total", route="/metrics", status="401") == 1
    assert value(r.text, "easel_http_requests_total", route="/metrics", status="403") == 1
    assert value(r.text, "easel_http_requests_total", route="/v2/tasks/{task_address}", status="401") == 1


def test_request_id_is_echoed_generated_and_kept_on_the_job(app_engine) -> None:
    client, engine = app_engine
    r = client.get("/livez", headers={"X-Request-ID": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    generated = client.get("/livez").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/livez").headers["x-request-id"]
    for insane in ("has space", "x" * (MAX_LENGTH + 1), "tab\there", "é"):
        got = client.get("/livez", headers={"X-Request-ID": insane.encode("utf-8")}).headers["x-request-id"]
        assert got != insane and len(got) == 32
    assert client.get("/no/such/path").headers["x-request-id"]  # errors carry it too

    r = client.post(GPT, json={**SMALL, "async": True}, headers={"X-Request-ID": "job-req-1"})
    assert r.status_code == 202 and r.headers["x-request-id"] == "job-req-1"
    jobs = client.app.state.jobs
    record = jobs.store.get_by_address(r.json()["task_address"])
    assert record.request_id == "job-req-1"
    polled = client.get(f"/v2/tasks/{record.task_address}", headers={"X-Request-ID": "poll-1"})
    assert polled.headers["x-request-id"] == "poll-1"  # each call has its own; the record keeps the submitter's
    # The engine gets the id (and the record's id) in the request's tags, for its worker's log lines.
    assert engine.requests[-1].tags["request_id"] == "job-req-1"
    assert engine.requests[-1].tags["job_id"] == record.id
    assert client.post("/sdapi/v1/txt2img", json=A1111, headers={"X-Request-ID": "sync-1"}).status_code == 200
    assert engine.requests[-1].tags["request_id"] == "sync-1"  # A1111's synchronous calls keep no record


def test_unhandled_errors_answer_500_with_the_request_id_and_log_it(app_engine, monkeypatch) -> None:
    client, engine = app_engine

    def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "submit", broken)
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        r = client.post("/sdapi/v1/txt2img", json=A1111, headers={"X-Request-ID": "req-500"})
    finally:
        root.removeHandler(handler)
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert "error" in r.json()  # A1111's error shape
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [e for e in lines if e["level"] == "ERROR" and e.get("request_id") == "req-500"]
    assert failed, lines
    assert set(failed[0]) >= {"time", "level", "logger", "message", "request_id", "exc_info"}
    assert "RuntimeError: boom" in failed[0]["exc_info"]
    text = client.get("/metrics").text
    assert value(text, "easel_http_requests_total", route="/sdapi/v1/txt2img", status="500") == 1
