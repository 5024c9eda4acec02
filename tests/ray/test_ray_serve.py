"""Easel on Ray Serve: a local Ray instance (2 CPUs, loopback, no dashboard) started for this module, the real
application deployed with two CPU worker replicas and two ingress replicas over the demo models.

- requests for demo-sd15 and demo-sdxl land on different worker replicas, each the one that holds its model;
- cancel and A1111 interrupt reach the replica running the job;
- through the ingress over HTTP: async jobs answered consistently by the task endpoint (whichever ingress replica
  answers), a synchronous call whose seed reproduces identical pixels, a cancel through the ingress.

About 30-45 s on two cores (Ray and four replicas start once for the module, ~18 s of it). Skipped without Ray.
Also: deploy/ray-serve.yaml is a valid Serve config whose builder makes the application.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")

import httpx  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from pipelines.engine_api import JobStatus  # noqa: E402
from pipelines.errors import InvalidRequest, JobCancelled, ModelNotFound  # noqa: E402
from pipelines.registry import Registry, load_registry  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402
from server.ray_serve.app import APP_NAME, deploy, init_ray  # noqa: E402
from server.ray_serve.remote_engine import RemoteEngine, RemoteJob  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 120


class Cluster:
    def __init__(self, settings: Settings, registry: Registry):
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.worker = serve.get_deployment_handle("EaselWorker", app_name=APP_NAME)
        self.engine = RemoteEngine(self.worker, registry)  # the ingress's engine client, driven from the test

    def info(self, model: str) -> dict[str, Any]:
        return self.worker.options(multiplexed_model_id=model).info.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ray-easel")
    (root / "demo-models").symlink_to(data_dir / "demo-models", target_is_directory=True)  # built once a session
    (data_dir / "demo-models").mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=root,
        models=REPO_ROOT / "models.yaml",
        host="127.0.0.1",
        port=free_port(),
        # One database for both ingress replicas: PostgreSQL when the test run has one (as a cluster would), else
        # SQLite, which replicas on one host can share.
        database_url=os.environ.get("EASEL_TEST_POSTGRES_URL") or f"sqlite:///{root / 'easel.db'}",
        max_steps=1000,
        queue_size=8,
        cache_max_models=2,
        max_wait_ms=0,
        ray_include_dashboard=False,
        ray_worker_num_gpus=0,
        ray_worker_num_cpus=0.5,
        ray_worker_min_replicas=2,
        ray_worker_max_replicas=2,
        ray_ingress_replicas=2,
        ray_ingress_num_cpus=0,
    )
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_ray(settings, num_cpus=2, object_store_memory=150 * 2**20, log_to_driver=False)
    try:
        started = time.monotonic()
        deploy(settings)  # returns once every replica is up
        assert time.monotonic() - started < START_TIMEOUT_S
        yield Cluster(settings, load_registry(settings.models))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def request(model: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(**{**dict(model=model, prompt="a cat", width=64, height=64, steps=2, seed=5), **kw})


def run(engine: RemoteEngine, req: GenerationRequest) -> RemoteJob:
    job = engine.submit(req)  # from a thread: returns once a worker replica admitted the job
    job.wait_sync(JOB_TIMEOUT_S)
    assert job.status == JobStatus.COMPLETED
    return job


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def test_requests_go_to_the_replica_that_holds_their_model(cluster: Cluster):
    engine = cluster.engine
    sd = run(engine, request("demo-sd15"))
    assert sd.worker_job_id and sd.replica and sd.seed == 5
    result = sd.result_or_raise()
    assert [im.size for im in result.images] == [(64, 64)] and result.extra["replica"] == sd.replica
    # Serve learns which replica holds demo-sd15 (pushed while it loads); wait until routing uses it.
    wait_until(lambda: all(cluster.info("demo-sd15")["replica"] == sd.replica for _ in range(4)), what="routing")

    xl = run(engine, request("gpt-image-1"))  # an alias: the ingress routes by the canonical id, demo-sdxl
    assert xl.request.model == "demo-sdxl"
    assert xl.replica != sd.replica  # the replica with the fewest models took the new model
    wait_until(lambda: all(cluster.info("demo-sdxl")["replica"] == xl.replica for _ in range(4)), what="routing")

    again = [run(engine, request(m, seed=9)) for m in ("demo-sd15", "demo-sdxl", "demo-sd15", "demo-sdxl")]
    assert [j.replica for j in again] == [sd.replica, xl.replica, sd.replica, xl.replica]
    sd_info, xl_info = cluster.info("demo-sd15"), cluster.info("demo-sdxl")
    assert sd_info["loaded"] == ["demo-sd15"] and xl_info["loaded"] == ["demo-sdxl"]  # neither loaded the other
    # Same seed, same model, same replica or not: identical pixels.
    assert again[0].result_or_raise().images[0].tobytes() == again[2].result_or_raise().images[0].tobytes()
    assert set(engine.loaded_models()) == {"demo-sd15", "demo-sdxl"}


def test_refusals_cancel_and_interrupt_reach_the_worker(cluster: Cluster):
    engine = cluster.engine
    with pytest.raises(ModelNotFound):
        engine.submit(request("no-such-model"))
    with pytest.raises(InvalidRequest) as refused:  # validated by the worker's engine, raised here, nothing runs
        engine.submit(request("demo-sd15", width=65))
    assert refused.value.field == "width"

    job = engine.submit(request("demo-sd15", steps=800))
    wait_until(lambda: job.progress.sampling_step >= 2, what="the job to run")
    assert job.status == JobStatus.RUNNING and engine.current_job() is job
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait_sync(JOB_TIMEOUT_S)
    assert job.status == JobStatus.CANCELLED and job.progress.sampling_step < 800

    job = engine.submit(request("demo-sd15", steps=800, n_iter=2))
    wait_until(lambda: job.progress.sampling_step >= 2, what="the job to run")
    engine.interrupt()  # A1111 /interrupt: the running call stops, its image comes back, the second call never runs
    result = job.wait_sync(JOB_TIMEOUT_S)
    assert result.interrupted and len(result.images) == 1 and job.progress.job_no == 0
    assert engine.current_job() is None


def test_job_status_is_consistent_through_the_ingress(cluster: Cluster):
    gw = f"{cluster.url}/v2/automatic1111/sdapi/v1/txt2img"
    with httpx.Client(timeout=JOB_TIMEOUT_S) as client:
        assert client.get(f"{cluster.url}/readyz").json()["status"] == "ready"
        addresses = {}
        for model in ("demo-sd15", "demo-sdxl"):
            body = {"model": model, "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 11, "async": True}
            answer = client.post(gw, json=body)
            assert answer.status_code == 202, answer.text
            addresses[model] = answer.json()["task_address"]

        bodies = {}
        for model, address in addresses.items():
            seen: set[str] = set()

            def completed(address: str = address, seen: set[str] = seen) -> bool:
                status = client.get(f"{cluster.url}/v2/tasks/{address}").json()["status"]
                seen.add(status)
                return status == "completed"

            wait_until(completed, JOB_TIMEOUT_S, f"task {model}")
            assert seen <= {"queued", "running", "completed"}
            # Asked again and again (the proxy spreads the calls over both ingress replicas): the same answer.
            answers = [client.get(f"{cluster.url}/v2/tasks/{address}").json() for _ in range(8)]
            assert all(a == answers[0] for a in answers)
            bodies[model] = answers[0]
        for model, task in bodies.items():
            assert task["model"] == model and task["seeds"] == [11]
            image = decode_png(task["result"]["images"][0])
            assert image.size == (64, 64)

        # Synchronous A1111 call through the ingress: the same seed makes the same pixels as the async job.
        sync = client.post(
            f"{cluster.url}/sdapi/v1/txt2img",
            json={
                "prompt": "a cat",
                "steps": 2,
                "width": 64,
                "height": 64,
                "seed": 11,
                "override_settings": {"sd_model_checkpoint": "demo-sd15"},
            },
        )
        assert sync.status_code == 200, sync.text
        same = decode_png(sync.json()["images"][0])
        assert same.tobytes() == decode_png(bodies["demo-sd15"]["result"]["images"][0]).tobytes()

        # A long job cancelled through the ingress ends `cancelled`, and stays so for every replica that answers.
        long = {"model": "demo-sd15", "prompt": "a cat", "steps": 900, "width": 64, "height": 64, "async": True}
        address = client.post(gw, json=long).json()["task_address"]
        wait_until(
            lambda: client.get(f"{cluster.url}/v2/tasks/{address}").json()["status"] == "running", what="the job"
        )
        assert client.post(f"{cluster.url}/v2/tasks/{address}/cancel").status_code in (200, 202)
        wait_until(
            lambda: client.get(f"{cluster.url}/v2/tasks/{address}").json()["status"] == "cancelled", what="cancel"
        )
        answers = [client.get(f"{cluster.url}/v2/tasks/{address}").json() for _ in range(6)]
        assert {a["status"] for a in answers} == {"cancelled"} and all(a["result"] is None for a in answers)


def test_the_serve_config_file_builds_the_application():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.parse_obj(yaml.safe_load((REPO_ROOT / "deploy" / "ray-serve.yaml").read_text()))
    (app_config,) = config.applications
    module, name = app_config.import_path.split(":")
    application = getattr(importlib.import_module(module), name)(app_config.args)
    assert isinstance(application, serve.Application)
    assert set(app_config.args) <= set(Settings.model_fields)  # Settings ignores unknown keys: a typo would not fail
    settings = Settings(**app_config.args)  # valid values
    assert settings.host == config.http_options.host == "0.0.0.0"
    assert (settings.ray_worker_min_replicas, settings.ray_worker_max_replicas) == (1, 4)
    assert settings.ray_worker_num_gpus == 1
