"""The engine's metrics and log context on the real demo SD pipeline, read through GET /metrics (issue #17): batch
sizes, steps, job latency, model loads, pipeline- and text-cache hits move as jobs run; worker log lines name the
job's request."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.engine import Engine, EngineConfig
from pipelines.errors import ModelLoadError
from pipelines.registry import load_registry
from pipelines.request import GenerationRequest
from server.app import create_app
from server.logs import make_handler
from server.settings import Settings
from tests.api.test_observability import value


@pytest.fixture(scope="module")
def served(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Engine]]:
    root = tmp_path_factory.mktemp("metrics")
    yaml = root / "models.yaml"
    (root / "empty").mkdir()  # a folder with no pipeline in it: loading fails inside diffusers, and is logged
    yaml.write_text(
        "models:\n"
        "  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"
        f"  broken:\n    family: sd15\n    source: {root / 'empty'}\n"
    )
    registry = load_registry(yaml)
    engine = Engine(registry, EngineConfig(data_dir=data_dir, max_wait_ms=0))
    app = create_app(Settings(data_dir=root / "data", models=yaml), engine=engine, registry=registry)
    engine.start()
    with TestClient(app) as client:
        yield client, engine
    engine.stop()


def test_batches_steps_latency_loads_and_cache_hits_move_as_jobs_run(served) -> None:
    client, _ = served
    before = client.get("/metrics").text
    body = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "batch_size": 2, "seed": 1}
    for _ in range(2):  # the same prompt twice: the second skips the text encoder
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    after = client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = dict(model="demo-sd15")
    assert moved("easel_batch_images_count", **model) == 2  # one pipeline call per request
    assert moved("easel_batch_images_sum", **model) == 4  # of two images each
    assert moved("easel_denoising_steps_total", **model) == 4
    assert moved("easel_denoising_steps_per_second_count", **model) == 2
    assert value(after, "easel_denoising_steps_per_second_sum", **model) > 0
    job = dict(model="demo-sd15", kind="txt2img")
    for name in ("easel_job_queued_seconds", "easel_job_running_seconds", "easel_job_total_seconds"):
        assert moved(f"{name}_count", **job) == 2, name
        assert moved(f"{name}_bucket", le="+Inf", **job) == 2, name
    assert moved("easel_jobs_finished_total", status="completed", **job) == 2
    assert value(after, "easel_model_loads_total", **model) == 1  # preloaded once, then cache hits
    assert value(after, "easel_model_load_seconds_total", **model) > 0
    assert value(after, "easel_models_loaded", **model) == 1
    assert moved("easel_cache_requests_total", cache="pipeline", result="hit") >= 2
    text = dict(cache="text_embedding", model="demo-sd15")
    assert moved("easel_cache_requests_total", result="miss", **text) >= 1  # the first time
    assert moved("easel_cache_requests_total", result="hit", **text) >= 2  # prompt and negative, the second time
    assert value(after, "easel_jobs", state="queued") == 0 and value(after, "easel_jobs", state="running") == 0
    assert value(after, "easel_queue_free_slots") > 0
    assert "easel_device_memory_bytes" not in after  # CPU: no CUDA series; process_resident_memory_bytes instead
    assert value(after, "process_resident_memory_bytes") > 0


def test_failed_jobs_are_counted_and_the_worker_log_names_the_request(served) -> None:
    client, engine = served
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        request = GenerationRequest(model="broken", prompt="x", width=64, height=64, steps=1)
        request.tags.update(request_id="req-broken", job_id="job-7")
        job = engine.submit(request)
        with pytest.raises(ModelLoadError):
            job.wait_sync(60)
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    about = [e for e in lines if e["logger"] == "easel.cache" and "broken" in e["message"]]
    assert about and about[0]["request_id"] == "req-broken" and about[0]["job_id"] == "job-7", lines
    assert "exc_info" in about[0]
    text = client.get("/metrics").text
    assert value(text, "easel_jobs_finished_total", model="broken", status="failed") == 1
    assert value(text, "easel_job_queued_seconds_count", model="broken") == 1
    assert value(text, "easel_job_total_seconds_count", model="broken") == 0  # latency: completed jobs only
