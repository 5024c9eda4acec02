"""DevicePool: two CPU "devices" (one real Engine each) in one process on the demo models: routing by model, two
jobs running at once, cancel of one while the other completes, the A1111 /progress and /interrupt view."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.device_pool import DevicePool, build_engine, resolve_devices
from pipelines.engine import Engine, EngineConfig, Job
from pipelines.engine_api import JobStatus
from pipelines.errors import JobCancelled, ModelNotFound
from pipelines.registry import Registry
from pipelines.request import GenerationRequest
from server.app import create_app
from server.settings import Settings
from tests.engine_helpers import wait_until


@pytest.fixture
def pool(registry: Registry, data_dir: Path) -> Iterator[DevicePool]:
    config = EngineConfig(data_dir=data_dir, queue_size=4, preload_default=False, max_wait_ms=0)
    built = build_engine(registry, config, ["cpu", "cpu"])
    assert isinstance(built, DevicePool) and len(built.engines) == 2
    built.start()
    yield built
    built.stop()


def req(model: str = "demo-sd15", **kw) -> GenerationRequest:
    base = dict(model=model, prompt="a cat", width=64, height=64, steps=2, seed=7)
    return GenerationRequest(**{**base, **kw})


def running_at_step(job: Job, step: int) -> bool:
    assert not job.done, f"job finished early: {job.status} {job.error}"
    return job.status == JobStatus.RUNNING and job.progress.sampling_step >= step


def test_resolve_devices_and_factory(registry: Registry, data_dir: Path):
    assert resolve_devices(None, "cpu") == ["cpu"]
    assert resolve_devices("cpu, cpu") == ["cpu", "cpu"]
    assert resolve_devices("auto") == ["cpu"]  # no CUDA here: one CPU engine
    with pytest.raises((RuntimeError, ValueError)):
        resolve_devices(["gpu:0"])
    single = build_engine(registry, EngineConfig(data_dir=data_dir, device="cpu"), None)
    assert isinstance(single, Engine) and str(single.device) == "cpu"  # unset devices: the `device` setting


def test_routes_to_the_device_that_holds_the_model(pool: DevicePool):
    first, second = pool.engines
    asyncio.run(first.load_model("demo-sdxl"))
    asyncio.run(second.load_model("demo-sd15"))
    assert pool.loaded_models() == ["demo-sdxl", "demo-sd15"]

    xl = pool.submit(req("gpt-image-1"))  # an alias of demo-sdxl: routing resolves it first
    sd = pool.submit(req("demo-sd15"))
    assert pool.engine_of(xl.id) is first and pool.engine_of(sd.id) is second
    for job in (xl, sd):
        result = job.wait_sync(120)
        assert [im.size for im in result.images] == [(64, 64)]
    # Each model was loaded once, on its own device: routing never made the other device load it.
    assert first.cache.load_count == {"demo-sdxl": 1} and second.cache.load_count == {"demo-sd15": 1}
    assert xl.request.model == "demo-sdxl" and sd.request.model == "demo-sd15"

    with pytest.raises(ModelNotFound):
        pool.submit(req("no-such-model"))


def test_a_busy_holder_loses_to_an_idle_device_unless_slack_allows(pool: DevicePool):
    first, second = pool.engines
    asyncio.run(first.load_model("demo-sdxl"))
    long_job = pool.submit(req("demo-sdxl", steps=400))
    assert pool.engine_of(long_job.id) is first
    wait_until(lambda: running_at_step(long_job, 1), what="the long job to run")
    assert pool.route("demo-sdxl")[0] == 1  # the holder is busy, the other device idle: it loads the model
    pool.affinity_slack = 1
    assert pool.route("demo-sdxl")[0] == 0  # one job more than the idle device is within the slack
    long_job.cancel()
    with pytest.raises(JobCancelled):
        long_job.wait_sync(60)


def test_two_jobs_run_at_once_and_cancelling_one_leaves_the_other(pool: DevicePool):
    a = pool.submit(req(steps=100, seed=1))
    b = pool.submit(req(steps=100, seed=2))
    assert {pool.engine_of(a.id), pool.engine_of(b.id)} == set(pool.engines)  # the least loaded device each time
    # Both are running at the same moment, each past its first steps: the devices work in parallel.
    wait_until(lambda: running_at_step(a, 2) and running_at_step(b, 2), what="both jobs to run at once")
    running = pool.running_jobs()
    assert {j.id for j in running} == {a.id, b.id}
    assert pool.current_job() is min((a, b), key=lambda j: j.progress.started_at)  # the oldest running job

    b.cancel()
    with pytest.raises(JobCancelled):
        b.wait_sync(60)
    assert b.status == JobStatus.CANCELLED
    step_at_cancel = a.progress.sampling_step
    assert not a.done  # the other device goes on
    result = a.wait_sync(300)
    assert a.status == JobStatus.COMPLETED and not result.interrupted
    assert result.seeds == [1] and result.images[0].size == (64, 64)
    assert a.progress.sampling_step == 100 > step_at_cancel
    assert pool.current_job() is None and pool.queued_count() == 0


def test_a1111_progress_and_interrupt_with_two_running_jobs(pool: DevicePool, registry: Registry, tmp_path: Path):
    settings = Settings(data_dir=tmp_path, max_steps=1000)
    with TestClient(create_app(settings, engine=pool, registry=registry)) as client:
        a = pool.submit(req(steps=600, n_iter=2, seed=3))
        wait_until(lambda: running_at_step(a, 1), what="the first job to run")
        b = pool.submit(req(steps=600, n_iter=2, seed=4))
        wait_until(lambda: running_at_step(a, 3) and running_at_step(b, 3), what="both jobs to run")

        p = client.get("/sdapi/v1/progress").json()
        assert p["state"]["job_count"] == 2 and p["state"]["sampling_steps"] == 600  # the oldest job: `a`
        assert p["state"]["sampling_step"] >= 3 and 0.01 < p["progress"] < 1
        assert p["state"]["job_timestamp"] != "0"

        assert client.post("/sdapi/v1/interrupt").status_code == 200
        results = [a.wait_sync(120), b.wait_sync(120)]
        # A1111 interrupt stops every running job at its next step; each returns the image of the call it was in
        # and skips its second call.
        assert all(r.interrupted and len(r.images) == 1 for r in results)
        assert a.progress.job_no == 0 and b.progress.job_no == 0
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        mem = client.get("/sdapi/v1/memory").json()
        assert set(mem) >= {"ram", "cuda", "devices"}


def test_metrics_snapshot_and_observers_cover_every_device(registry: Registry) -> None:
    from pipelines.telemetry import PipelineCall

    pool = DevicePool([Engine(registry, EngineConfig(device="cpu")) for _ in range(2)])  # not started: no loads
    snaps = pool.metrics_snapshot()
    assert [s.device for s in snaps] == ["cpu", "cpu"]
    assert all(s.queued == 0 and s.running == 0 and s.memory is None and not s.loaded_models for s in snaps)
    seen = []
    pool.add_observer(seen.append)
    for engine in pool.engines:
        engine.observers.emit(PipelineCall("m", str(engine.device), images=2, steps=3, steps_per_s=1.5))
    assert [e.images for e in seen] == [2, 2]
    pool.remove_observer(seen.append)
