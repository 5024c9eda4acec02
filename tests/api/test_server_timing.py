"""The `Server-Timing` header: where a generation request's time went, by stage (server/timing.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry
from server.app import create_app
from server.settings import Settings
from server.timing import StageTimes, record_engine, stage
from tests.api.fake_engine import FakeEngine


def stages(header: str) -> dict[str, float]:
    """`a;dur=1.5, b;dur=2` -> {"a": 1.5, "b": 2.0}, checking the W3C syntax on the way."""
    out = {}
    for part in header.split(", "):
        m = re.fullmatch(r"([a-z0-9_]+);dur=(\d+(?:\.\d+)?)", part)
        assert m, f"not a Server-Timing metric: {part!r}"
        out[m[1]] = float(m[2])
    return out


@pytest.fixture
def client(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    engine = FakeEngine(registry)
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=engine, registry=registry)
    with TestClient(app) as c:
        yield c
    engine.release()


def test_a1111_txt2img_reports_engine_and_http_stages(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "width": 64, "height": 64, "batch_size": 2})
    assert r.status_code == 200, r.text
    got = stages(r.headers["server-timing"])
    assert {"queue", "load", "run", "encode", "b64", "total"} <= set(got)
    assert got["run"] > 0  # the fake engine takes real time to "run"
    assert got["total"] >= got["queue"] + got["run"] + got["encode"] + got["b64"] - 0.5  # rounding to 0.1 ms


def test_stored_results_report_encode_and_store_from_the_jobs_pool(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "256x256", "response_format": "url"})
    assert r.status_code == 200, r.text
    got = stages(r.headers["server-timing"])
    assert {"queue", "run", "encode", "store", "total"} <= set(got)


def test_no_header_without_stages(client: TestClient) -> None:
    for path in ("/readyz", "/sdapi/v1/sd-models", "/nowhere"):
        assert "server-timing" not in client.get(path).headers


def test_repeated_stages_add_up_and_nothing_is_recorded_outside_a_request() -> None:
    with stage("encode"):  # no request: a no-op, not an error
        pass
    record_engine({"run_s": 1.0})
    times = StageTimes()
    times.add("encode", 0.010)
    times.add("encode", 0.005)
    assert stages(times.header(0.1)) == {"encode": 15.0, "total": 100.0}
