"""R1: the admission queue is bounded. When it is full, new generation work gets 429 + Retry-After at once, in the
dialect's own error shape, before its body is read or any image decoded (server.middleware.AdmissionGate)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import QueueFull
from pipelines.registry import Registry
from server.app import create_app
from server.errors import error_info, renderer_for
from server.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.engine_helpers import busy, demo_registry, release, req, start_engine
from tests.reliability.http_helpers import RawPost, with_gate

GENERATION_POSTS = [
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/v2/automatic1111/sdapi/v1/txt2img",
    "/v2/image/flux/generate",
    "/v2/image/gpt-image/edit",
    "/v1/images/generations",
    "/v1/images/edits",
    "/api/v1/images/generations",
    "/v1/generate",
    "/image/create",
    "/v1/image/create",
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return demo_registry(tmp_path_factory)


def png_b64(size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every PIL.Image.open call (every image decode of every dialect goes through it)."""
    calls: list[object] = []
    original = Image.open

    def spy(fp, *args, **kwargs):
        calls.append(fp)
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return calls


# The real engine: exactly queue_size jobs are admitted, the overflow is refused at once ----------------------------


def test_parallel_submits_admit_exactly_the_free_slots(data_dir: Path, registry: Registry) -> None:
    engine = start_engine(data_dir, registry, queue_size=1)
    try:
        blocker = busy(engine)  # running: it no longer holds an admission slot
        assert engine.free_slots == 1 and engine.admission_error() is None

        n = 8
        barrier = threading.Barrier(n)
        admitted, refused = [], []
        lock = threading.Lock()

        def submit(i: int) -> None:
            barrier.wait()
            try:
                job = engine.submit(req(prompt=f"parallel {i}", seed=i))
                with lock:
                    admitted.append(job)
            except QueueFull as e:
                with lock:
                    refused.append(e)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Exactly the overflow, refused at once: a submit that waited for a slot would still be blocked here.
        assert len(admitted) == 1 and len(refused) == n - 1
        assert engine.free_slots == 0 and isinstance(engine.admission_error(), QueueFull)
        info = error_info(refused[0])
        assert info.status == 429 and info.code == "queue_full" and int(info.headers["Retry-After"]) > 0

        release(blocker)
        assert admitted[0].wait_sync(60).images  # the admitted one runs; its slot was freed when it started
        assert engine.free_slots == 1
    finally:
        engine.stop()


def test_real_engine_full_queue_is_429_before_the_body_is_read(
    data_dir: Path, registry: Registry, tmp_path: Path, decoded: list[object]
) -> None:
    engine = start_engine(data_dir, registry, queue_size=1)
    app = with_gate(create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry))
    with TestClient(app) as client:
        blocker = busy(engine)
        queued = engine.submit(req(prompt="queued"))
        status, headers, body = RawPost(app, "/sdapi/v1/img2img").run()  # answered: it never waited
        assert status == 429 and int(headers["retry-after"]) > 0
        assert body.startswith(b'{"error":"QueueFull"')
        r = client.post("/sdapi/v1/img2img", json={"init_images": [png_b64()], "width": 64, "height": 64, "steps": 1})
        assert r.status_code == 429 and r.json()["error"] == "QueueFull" and r.headers["Retry-After"]
        assert decoded == []  # the init image was never decoded
        release(blocker)
        queued.wait_sync(60)


# The gate over every dialect, with the fake engine ----------------------------------------------------------------


@pytest.fixture
def full_app(registry: Registry, tmp_path: Path) -> Iterator[tuple[FastAPI, FakeEngine, TestClient]]:
    """An app whose engine holds one running and one queued job with queue_size=1: no free slot."""
    engine = FakeEngine(registry)
    engine.queue_size = 1
    app = with_gate(create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry))
    with TestClient(app) as client:
        engine.block()
        engine.submit(req(prompt="running"))
        engine.wait_for_running()
        engine.submit(req(prompt="queued"))
        assert engine.free_slots == 0
        yield app, engine, client
        engine.release()


@pytest.mark.parametrize("path", GENERATION_POSTS)
def test_full_queue_answers_429_without_reading_the_body(full_app, path: str) -> None:
    app, _, client = full_app
    client.get("/livez")  # the middleware stack is built: the timing below is the gate's own
    post = RawPost(app, path)
    status, headers, body = post.run()  # answered within the run's timeout: no body read, no queue wait
    assert status == 429 and not post.body_read  # answered before a single body byte was asked for
    assert int(headers["retry-after"]) > 0
    expected = renderer_for(app, path)(error_info(QueueFull()))
    assert json.loads(body) == expected  # the dialect's own error shape
    if path.startswith(("/sdapi/", "/v2/automatic1111/")):
        assert expected["error"] == "QueueFull" and set(expected) == {"error", "detail", "body", "errors"}
    if path.startswith("/v2/image/"):
        assert expected["error"]["code"] == "queue_full"


def test_full_queue_never_decodes_images_and_control_routes_stay_open(full_app, decoded: list[object]) -> None:
    _, engine, client = full_app
    body = {"init_images": [png_b64()], "prompt": "x", "width": 64, "height": 64, "steps": 1}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 429 and r.headers["Retry-After"] and decoded == []
    # A huge body that is not even JSON is refused the same way: nothing parses it.
    r = client.post("/sdapi/v1/txt2img", content=b"\x00" * 5_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 429 and r.json()["error"] == "QueueFull"
    # Progress and interrupt are never gated: a busy server is exactly when they are needed.
    assert client.get("/sdapi/v1/progress").status_code == 200
    assert client.post("/sdapi/v1/interrupt").status_code == 200

    engine.release()
    deadline = time.monotonic() + 10
    while engine.free_slots == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.post("/sdapi/v1/img2img", json=body)  # a free slot: the same request goes through and is decoded
    assert r.status_code == 200 and len(decoded) >= 1
