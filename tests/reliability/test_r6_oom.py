"""R6: an out-of-memory error fails only the request that caused it, after one retry of its batch as single requests;
memory is freed and the server stays ready. A device fault that is not OOM, or repeated OOMs that freeing memory
does not fix, mark the engine dead (not ready, not alive, queued work failed, new work refused with 503).

Faults are injected on CPU where a GPU raises them: in the UNet's forward pass of the real demo pipeline, as
torch.cuda.OutOfMemoryError (size dependent, at a chosen denoising step) or a CUDA RuntimeError.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pipelines.engine as engine_module
from pipelines.engine import Engine, is_device_fault, is_out_of_memory
from pipelines.engine_api import JobStatus
from pipelines.errors import EngineDead, InsufficientMemory
from pipelines.families import adapter_for
from pipelines.registry import Registry
from server.errors import error_info
from tests.engine_helpers import busy, demo_registry, record_calls, release, req, start_engine, wait_until

# Decides, per UNet forward pass, whether to raise: gets the number of images in the call and the step (1-based).
Fault = Callable[[int, int], BaseException | None]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return demo_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(data_dir: Path, registry: Registry):
    eng = start_engine(data_dir, registry, max_batch=8)
    yield eng
    eng.stop()


@pytest.fixture
def freed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the engine's free_device_memory calls (gc.collect + torch.cuda.empty_cache)."""
    count: list[int] = []
    original = engine_module.free_device_memory
    monkeypatch.setattr(engine_module, "free_device_memory", lambda: (count.append(1), original())[1])
    return count


def inject(engine: Engine, monkeypatch: pytest.MonkeyPatch, fault: Fault) -> None:
    """Run `fault` before every UNet forward pass of the engine's demo-sd15 pipeline (shared by every task)."""
    adapter = adapter_for("sd15")
    unet = engine.cache.get(engine.registry.get("demo-sd15")).base.unet
    original_run, original_forward = adapter.run_batch, unet.forward
    state = {"step": 0}

    def run_batch(*args, **kwargs):
        state["step"] = 0  # a new pipeline call
        return original_run(*args, **kwargs)

    def forward(sample, *args, **kwargs):
        state["step"] += 1
        error = fault(sample.shape[0] // 2, state["step"])  # classifier-free guidance runs each image twice
        if error is not None:
            raise error
        return original_forward(sample, *args, **kwargs)

    monkeypatch.setattr(adapter, "run_batch", run_batch)
    monkeypatch.setattr(unet, "forward", forward)


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_error_classification() -> None:
    assert is_out_of_memory(oom()) and not is_device_fault(oom())  # an OutOfMemoryError is a RuntimeError too
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_device_fault(ValueError("CUDA error"))


def test_batch_oom_retries_each_request_alone_and_fails_only_the_culprit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, freed: list[int]
) -> None:
    # Two or more images do not fit: the batch of 3 fails, the culprit (2 images) fails alone, the other fits alone.
    inject(engine, monkeypatch, lambda images, step: oom() if images >= 2 and step == 2 else None)
    calls = record_calls(monkeypatch)
    blocker = busy(engine)
    culprit = engine.submit(req(prompt="culprit", seed=10, batch_size=2))
    innocent = engine.submit(req(prompt="innocent", seed=20))
    calls_before = engine.calls
    release(blocker)

    result = innocent.wait_sync(60)
    with pytest.raises(InsufficientMemory, match="out of GPU memory for this request \\(2 image"):
        culprit.wait_sync(60)
    assert len(result.images) == 1 and "split after out-of-memory" in result.extra["degraded"][0]
    assert culprit.status == JobStatus.FAILED and innocent.status == JobStatus.COMPLETED
    # Exactly one retry, each request alone: no halving loop, no second retry of the culprit.
    assert calls[-3:] == [[("culprit", [10, 11]), ("innocent", [20])], [("culprit", [10, 11])], [("innocent", [20])]]
    assert engine.calls - calls_before == 3
    assert len(freed) >= 2  # memory was freed after the batch failed and after the culprit failed
    assert engine.ready and engine.alive
    info = error_info(culprit.error)
    assert (info.status, info.code) == (503, "insufficient_gpu_memory") and info.headers["Retry-After"]


def test_single_request_oom_fails_only_it_and_the_next_one_succeeds(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, freed: list[int]
) -> None:
    inject(engine, monkeypatch, lambda images, step: oom() if images >= 2 and step == 2 else None)
    calls_before = engine.calls
    job = engine.submit(req(prompt="too big", batch_size=2, steps=5))
    with pytest.raises(InsufficientMemory):
        job.wait_sync(60)
    assert job.progress.sampling_step == 1  # it failed in the middle of the loop, at step 2
    assert engine.calls - calls_before == 1 and len(freed) >= 1  # a lone request is not retried as is
    assert engine.ready and engine.alive and engine.failure is None
    assert len(engine.submit(req(prompt="fits")).wait_sync(60).images) == 1


def test_repeated_ooms_that_freeing_does_not_fix_mark_the_engine_dead(
    data_dir: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = start_engine(data_dir, registry, max_consecutive_ooms=2)
    try:
        nothing_fits, go = threading.Event(), threading.Event()

        def fault(images: int, step: int) -> BaseException | None:
            if nothing_fits.is_set():
                go.wait(30)  # hold the call until the test has queued work behind it
                return oom()
            return oom() if images >= 2 else None

        inject(eng, monkeypatch, fault)
        with pytest.raises(InsufficientMemory):
            eng.submit(req(batch_size=2)).wait_sync(60)
        assert eng.submit(req()).wait_sync(60).images  # a success in between: the count starts over
        with pytest.raises(InsufficientMemory):
            eng.submit(req(batch_size=2)).wait_sync(60)
        assert eng.alive and eng.ready  # one OOM in a row so far

        nothing_fits.set()  # now even one image fails, however much is freed
        last = eng.submit(req(prompt="last"))
        wait_until(lambda: last.status == JobStatus.RUNNING, 30, "the job to start")
        behind = eng.submit(req(prompt="behind", steps=4))
        go.set()
        with pytest.raises(InsufficientMemory):  # the second OOM in a row: this request still gets its own error
            last.wait_sync(60)
        with pytest.raises(EngineDead, match="in a row ran out of device memory"):
            behind.wait_sync(60)
        assert behind.progress.started_at is None  # queued work failed without running
        assert not eng.alive and not eng.ready and "in a row ran out of device memory" in eng.failure
        with pytest.raises(EngineDead) as refused:
            eng.submit(req())
        assert (error_info(refused.value).status, error_info(refused.value).code) == (503, "engine_dead")
    finally:
        eng.stop()


def test_a_device_fault_marks_the_engine_dead_and_fails_queued_work(
    data_dir: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = start_engine(data_dir, registry)
    try:
        armed = threading.Event()
        fault = RuntimeError("CUDA error: an illegal memory access was encountered")
        inject(eng, monkeypatch, lambda images, step: fault if armed.is_set() else None)
        running = busy(eng)
        queued = eng.submit(req(prompt="queued"))
        armed.set()
        for job in (running, queued):
            with pytest.raises(EngineDead, match="illegal memory access"):
                job.wait_sync(60)
            assert job.status == JobStatus.FAILED
        assert not eng.alive and not eng.ready and "illegal memory access" in eng.failure
        assert queued.progress.started_at is None  # failed without running
        with pytest.raises(EngineDead):
            eng.submit(req())
        assert isinstance(eng.admission_error(), EngineDead)  # the HTTP gate answers 503 before reading bodies
        wait_until(lambda: not eng._worker.is_alive(), 10, "the worker to stop")
    finally:
        eng.stop()
