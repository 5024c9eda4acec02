"""R4: `/readyz` is 503 while loading, draining or after an engine failure; `/livez` is 503 only when the engine is
dead. Probes answer without credentials and without waiting behind generation work.

The state machine is driven with the fake engine (HTTP layer only) and once with the real engine on the demo model:
held before it is ready, ready, then dead after a device fault in the pipeline call.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry, load_registry
from server.app import create_app, not_ready_reason
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def models() -> Registry:
    return load_registry(REPO_ROOT / "models.yaml")


def probe(client: TestClient, path: str) -> tuple[int, dict]:
    r = client.get(path)
    return r.status_code, r.json()


def test_probe_state_machine_with_the_fake_engine(models: Registry, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), registry=models)
    client = TestClient(app)  # no lifespan: nothing starts an engine

    # Loading: not ready, but alive (a liveness restart would only make the load start over).
    status, body = probe(client, "/readyz")
    assert status == 503 and body["status"] == "not ready" and body["reason"].startswith("starting")
    assert client.get("/readyz").headers["retry-after"]
    assert probe(client, "/livez") == (200, {"status": "alive"})

    # The start failed (e.g. the default model does not load): not ready, with the reason; still alive.
    app.state.engine_error = "ModelLoadError: model 'demo-sd15' failed to load"
    status, body = probe(client, "/readyz")
    assert status == 503 and "demo-sd15" in body["reason"]
    assert probe(client, "/livez")[0] == 200
    app.state.engine_error = None

    engine = FakeEngine(models)
    app.state.engine = engine
    assert probe(client, "/readyz") == (200, {"status": "ready", "models": len(models)})
    assert not_ready_reason(app) is None

    # Draining (SIGTERM): not ready, alive.
    app.state.draining = True
    status, body = probe(client, "/readyz")
    assert status == 503 and body["reason"].startswith("draining")
    assert probe(client, "/livez")[0] == 200
    app.state.draining = False
    assert probe(client, "/readyz")[0] == 200

    # Dead (device fault): neither ready nor alive, and the reason says why without server paths.
    engine.failure = f"device fault while reading {tmp_path}/weights/unet.safetensors"
    status, body = probe(client, "/readyz")
    assert status == 503 and "device fault" in body["reason"]
    status, body = probe(client, "/livez")
    assert status == 503 and body["status"] == "dead" and "unet.safetensors" in body["reason"]
    assert str(tmp_path) not in client.get("/livez").text + client.get("/readyz").text


def test_probes_need_no_credentials(models: Registry, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_auth="admin:correct-horse")
    with TestClient(create_app(settings, engine=FakeEngine(models), registry=models)) as client:
        assert client.get("/sdapi/v1/samplers").status_code == 401  # the API itself is locked
        assert client.get("/v2/tasks/abc").status_code == 401
        assert probe(client, "/readyz")[0] == 200
        assert probe(client, "/livez")[0] == 200
        basic = base64.b64encode(b"admin:correct-horse").decode()
        assert client.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_probes_answer_while_generation_work_is_stuck(models: Registry, tmp_path: Path) -> None:
    """A held job and a full queue do not delay or fail the probes (they never enter the queue)."""
    engine = FakeEngine(models)
    engine.block()
    engine.queue_size = 1
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=engine, registry=models)) as client:
        results: list[int] = []

        def generate() -> None:
            results.append(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code)

        worker = threading.Thread(target=generate)
        worker.start()
        try:
            engine.wait_for_running()
            for _ in range(5):
                started = time.monotonic()
                assert probe(client, "/readyz")[0] == 200
                assert probe(client, "/livez")[0] == 200
                assert time.monotonic() - started < 10  # generous: a blocked probe would hang, not run late
        finally:
            engine.release()
            worker.join(30)
        assert results == [200]


def test_engine_death_watchdog_ends_the_server_with_a_failure_code() -> None:
    """`easel serve` leaves its main loop with exit status 1 once the engine is dead, so its supervisor restarts it;
    a healthy engine, or one stopped by a shutdown under way, keeps it running."""
    import uvicorn

    from server.cli import DrainingServer

    async def asgi(scope: object, receive: object, send: object) -> None:
        pass

    engine = SimpleNamespace(alive=True, failure=None)
    app = SimpleNamespace(state=SimpleNamespace(engine=engine, draining=False))
    server = DrainingServer(uvicorn.Config(asgi), app)  # type: ignore[arg-type]
    assert asyncio.run(server.on_tick(10)) is False and server.exit_code == 0
    engine.alive, engine.failure = False, "CUDA error: an illegal memory access was encountered"
    app.state.draining = True  # shutting down anyway: the engine stopping is not a death
    assert asyncio.run(server.on_tick(10)) is False and server.exit_code == 0
    app.state.draining = False
    assert asyncio.run(server.on_tick(10)) is True and server.exit_code == 1


# Real engine ---------------------------------------------------------------------------------------------------------


def test_readiness_follows_the_real_engine(models: Registry, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """503 while the engine builds (held here until released), 200 once it runs, 503 while draining, and 503 on both
    probes after a device fault kills it."""
    from pipelines import engine as engine_module
    from pipelines.families import adapter_for

    gate = threading.Event()
    original_start = engine_module.Engine.start

    def held_start(self: engine_module.Engine) -> None:
        assert gate.wait(120), "test never released the engine start"
        original_start(self)

    monkeypatch.setattr(engine_module.Engine, "start", held_start)
    app = create_app(Settings(data_dir=data_dir, device="cpu"), registry=models)
    with TestClient(app) as client:
        status, body = probe(client, "/readyz")
        assert status == 503 and body["reason"].startswith("starting")
        assert probe(client, "/livez")[0] == 200
        gate.set()
        deadline = time.monotonic() + 120
        while probe(client, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.1)

        app.state.draining = True
        assert probe(client, "/readyz")[0] == 503 and probe(client, "/livez")[0] == 200
        app.state.draining = False
        assert probe(client, "/readyz")[0] == 200

        # A device fault (not an out-of-memory) in the pipeline call kills the engine.
        def device_fault(*args: object, **kwargs: object) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(type(adapter_for("sd15")), "run_batch", device_fault)
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 503 and "Traceback" not in r.text
        status, body = probe(client, "/livez")
        assert status == 503 and "illegal memory access" in body["reason"]
        status, body = probe(client, "/readyz")
        assert status == 503 and "illegal memory access" in body["reason"]
        # New work is refused at once with the same answer, instead of queueing for a dead device.
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 503


def test_not_ready_reason_is_a_plain_function_of_app_state(models: Registry, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), engine=FakeEngine(models), registry=models)
    assert not_ready_reason(app) is None
    app.state.draining = True
    assert "draining" in (not_ready_reason(app) or "")
