"""Engine on the real demo SD pipeline: progress, interrupt, skip, cancel, admission, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.engine import Engine, EngineConfig
from pipelines.engine_api import JobStatus
from pipelines.errors import InvalidRequest, JobCancelled, ModelLoadError, ModelNotFound, QueueFull
from pipelines.request import GenerationRequest, Task
from tests.engine_helpers import yaml_registry


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = yaml_registry(
        tmp_path_factory,
        "models:\n"
        "  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"
        "  broken:\n    family: sd15\n    source: /nonexistent/weights\n",
    )
    eng = Engine(registry, EngineConfig(data_dir=data_dir, queue_size=2))
    eng.start()
    yield eng
    eng.stop()


def req(**kw) -> GenerationRequest:
    base = dict(model="demo-sd15", prompt="a cat", width=64, height=64, steps=3, seed=1)
    return GenerationRequest(**{**base, **kw})


def wait_for_step(job, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while job.progress.sampling_step < step:
        assert time.monotonic() < deadline, "job made no progress"
        assert not job.done, f"job finished early: {job.status}"
        time.sleep(0.01)


def test_runs_and_reports_progress_and_seeds(engine):
    job = engine.submit(req(seed=-1, batch_size=2, n_iter=2))
    result = job.wait_sync(120)
    assert job.status == JobStatus.COMPLETED
    assert len(result.images) == 4 and all(im.size == (64, 64) for im in result.images)
    s = result.seeds[0]
    assert 0 <= s < 4294967294 and result.seeds == [s, s + 1, s + 2, s + 3]
    p = job.progress
    assert (p.job_no, p.sampling_step, p.sampling_steps, p.job_count) == (2, 3, 3, 2)
    assert result.sampler == "Euler" and result.model == "demo-sd15"


def test_interrupt_returns_what_is_finished(engine):
    job = engine.submit(req(steps=400, n_iter=3))
    wait_for_step(job, 2)
    assert engine.current_job() is job
    engine.interrupt()
    result = job.wait_sync(120)
    assert result.interrupted and len(result.images) == 1  # the remaining n_iter calls are not run
    assert job.progress.job_no < 3
    assert engine.current_job() is None


def test_skip_moves_to_the_next_call(engine):
    job = engine.submit(req(steps=400, n_iter=2))
    wait_for_step(job, 2)
    engine.skip()
    deadline = time.monotonic() + 60
    while job.progress.job_no < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    wait_for_step(job, 2)
    engine.skip()
    result = job.wait_sync(120)
    assert len(result.images) == 2 and not result.interrupted


def test_cancel_queued_and_running_jobs(engine):
    running = engine.submit(req(steps=400))
    wait_for_step(running, 1)
    queued = engine.submit(req())
    queued.cancel()
    assert queued.status == JobStatus.CANCELLED
    with pytest.raises(JobCancelled):
        queued.wait_sync(1)
    running.cancel()
    with pytest.raises(JobCancelled):
        running.wait_sync(60)
    assert running.status == JobStatus.CANCELLED


def test_full_queue_refuses_at_once(engine):
    running = engine.submit(req(steps=400))
    wait_for_step(running, 1)
    queued = [engine.submit(req()), engine.submit(req())]
    with pytest.raises(QueueFull):
        engine.submit(req())
    running.cancel()
    for j in queued:
        j.wait_sync(60)
    with pytest.raises(JobCancelled):
        running.wait_sync(60)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(width=60), "width"),
        (dict(height=0), "height"),
        (dict(steps=0), "steps"),
        (dict(task=Task.EDIT), "model"),
        (dict(task=Task.IMG2IMG), "init_images"),
        (dict(strength=1.5), "denoising_strength"),
    ],
)
def test_invalid_requests_name_the_field(engine, kw, field):
    with pytest.raises(InvalidRequest) as e:
        engine.submit(req(**kw))
    assert e.value.field == field


def test_unknown_model_and_load_error(engine):
    with pytest.raises(ModelNotFound):
        engine.submit(req(model="nope"))
    job = engine.submit(req(model="broken"))
    with pytest.raises(ModelLoadError, match="broken"):
        job.wait_sync(60)
    assert job.status == JobStatus.FAILED
    assert engine.submit(req()).wait_sync(60).images  # the queue keeps going after a failure


def test_done_callbacks_run_once_on_completion_and_at_once_when_late(engine):
    seen: list[tuple[str, JobStatus]] = []
    job = engine.submit(req(steps=2))
    job.add_done_callback(lambda j: seen.append(("early", j.status)))
    job.wait_sync(60)
    job.add_done_callback(lambda j: seen.append(("late", j.status)))
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(seen) == [("early", JobStatus.COMPLETED), ("late", JobStatus.COMPLETED)]


@pytest.mark.parametrize(("strength", "sampler"), [(0.0, None), (5e-324, None), (1e-4, "DDIM"), (0.3, "DDIM")])
def test_any_valid_denoising_strength_runs(engine, strength: float, sampler: str | None):
    """Found by the fuzz: strength 0 left diffusers no step to run, tiny strengths overflowed or asked DDIM for more
    than 1000 steps. The input comes back nearly unchanged at 0, as A1111 gives."""
    from PIL import Image

    source = Image.new("RGB", (64, 64), (200, 30, 30))
    job = engine.submit(req(task=Task.IMG2IMG, init_images=[source], strength=strength, steps=1, sampler=sampler))
    result = job.wait_sync(120)
    assert result.images[0].size == (64, 64)
