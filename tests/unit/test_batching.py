"""Dynamic batching on the real demo SD pipeline: compatible requests share one call, each keeps its own seed,
result and cancellation; incompatible ones do not mix; an out-of-memory batch is split and retried."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.engine_api import JobStatus
from pipelines.errors import GenerationFailed, JobCancelled
from pipelines.families import adapter_for
from tests.engine_helpers import busy, demo_registry, record_calls, release, req, start_engine, wait_until
from tests.image_helpers import pixels


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    eng = start_engine(data_dir, demo_registry(tmp_path_factory), max_batch=8)
    yield eng
    eng.stop()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch):
    """Record the prompts and seeds of every pipeline call the SD adapter makes."""
    return record_calls(monkeypatch)


def test_compatible_requests_share_one_call_and_match_running_alone(engine, calls):
    blocker = busy(engine)
    a = engine.submit(req(prompt="a red house", seed=10, batch_size=2))
    b = engine.submit(req(prompt="a blue boat", seed=20))
    release(blocker)
    ra, rb = a.wait_sync(60), b.wait_sync(60)
    assert calls[-1] == [("a red house", [10, 11]), ("a blue boat", [20])]
    assert len(ra.images) == 2 and len(rb.images) == 1 and ra.seeds == [10, 11] and rb.seeds == [20]

    alone = engine.submit(req(prompt="a blue boat", seed=20)).wait_sync(60)
    assert calls[-1] == [("a blue boat", [20])]
    # Same seed and parameters give the same picture whatever else shared the call (batched kernels may round
    # a level or two differently).
    assert np.abs(pixels(rb.images[0]) - pixels(alone.images[0])).max() <= 2


def test_incompatible_requests_do_not_share_a_call(engine, calls):
    blocker = busy(engine)
    jobs = [
        engine.submit(req(prompt="p1", steps=3)),
        engine.submit(req(prompt="p2", steps=4)),  # other step count
        engine.submit(req(prompt="p3", width=128)),  # other size
        engine.submit(req(prompt="p4", negative_prompt="blur")),  # empty and non-empty negatives never mix
        engine.submit(req(prompt="p5", sampler="DPM++ 2M")),  # other sampler
        engine.submit(req(prompt="p6", steps=3)),  # compatible with p1
    ]
    release(blocker)
    for j in jobs:
        j.wait_sync(60)
    prompts = [[p for p, _ in call] for call in calls if call[0][0] != "blocker"]
    assert sorted(prompts) == sorted([["p1", "p6"], ["p2"], ["p3"], ["p4"], ["p5"]])


def test_max_batch_caps_the_images_of_a_call(engine, calls):
    blocker = busy(engine)
    jobs = [engine.submit(req(prompt=f"p{i}", batch_size=3)) for i in range(4)]  # 12 images, max_batch 8
    release(blocker)
    for j in jobs:
        j.wait_sync(60)
    sizes = [sum(len(s) for _, s in call) for call in calls if call[0][0] != "blocker"]
    assert sizes == [6, 6]


def test_cancelling_one_request_of_a_batch_keeps_the_others(engine, calls):
    blocker = busy(engine)
    a = engine.submit(req(prompt="keep", steps=400))
    b = engine.submit(req(prompt="drop", steps=400))
    release(blocker)
    wait_until(lambda: b.progress.sampling_step >= 2, 60, "step 2")
    assert {j.id for j in engine.running_jobs()} == {a.id, b.id}
    b.cancel()
    with pytest.raises(JobCancelled):
        b.wait_sync(120)
    result = a.wait_sync(120)
    assert b.status == JobStatus.CANCELLED and a.status == JobStatus.COMPLETED
    assert len(result.images) == 1 and a.progress.sampling_step == 400  # it ran to the end


def test_out_of_memory_batch_is_split_and_retried(engine, calls, monkeypatch: pytest.MonkeyPatch):
    adapter = adapter_for("sd15")
    spy = adapter.run_batch

    def oom_above_one(loaded, items, scheduler, on_step):
        if len(items) > 1:
            calls.append([("OOM", [])])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return spy(loaded, items, scheduler, on_step)

    monkeypatch.setattr(adapter, "run_batch", oom_above_one)
    blocker = busy(engine)
    a = engine.submit(req(prompt="first", seed=5))
    b = engine.submit(req(prompt="second", seed=6))
    release(blocker)
    ra, rb = a.wait_sync(60), b.wait_sync(60)
    assert ra.images and rb.images
    assert "split after out-of-memory" in ra.extra["degraded"][0]
    assert [c[0][0] for c in calls if c[0][0] != "blocker"] == ["OOM", "first", "second"]

    # A request that runs out of memory alone fails with a clear error, and the engine keeps serving.
    monkeypatch.setattr(adapter, "run_batch", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    with pytest.raises(GenerationFailed, match="out of GPU memory"):
        engine.submit(req()).wait_sync(60)
    monkeypatch.setattr(adapter, "run_batch", spy)
    assert engine.submit(req()).wait_sync(60).images
