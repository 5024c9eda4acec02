"""Real engines on the tiny demo SD pipeline (demo-sd15) and the helpers the engine tests share: a started engine,
requests, waiting, a busy worker, a spy on the SD pipeline calls, pixel differences."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.engine import Engine, EngineConfig, Job
from pipelines.errors import JobCancelled
from pipelines.families import adapter_for
from pipelines.registry import Registry, load_registry
from pipelines.request import GenerationRequest
from tests.image_helpers import pixels

MODELS_YAML = "default_model: demo-sd15\nmodels:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"


def yaml_registry(tmp_path_factory: pytest.TempPathFactory, text: str) -> Registry:
    """The registry of a models.yaml holding `text`, written in a fresh folder."""
    yaml = tmp_path_factory.mktemp("reg") / "models.yaml"
    yaml.write_text(text)
    return load_registry(yaml)


def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return yaml_registry(tmp_path_factory, MODELS_YAML)


def start_engine(data_dir: Path, registry: Registry, **config) -> Engine:
    """A started engine on demo-sd15; batching companions are taken without waiting unless `max_wait_ms` is set."""
    engine = Engine(registry, EngineConfig(data_dir=data_dir, **{"max_wait_ms": 0, **config}))
    engine.start()
    return engine


def req(**kw) -> GenerationRequest:
    base = dict(model="demo-sd15", prompt="a cat", width=64, height=64, steps=3, seed=1)
    return GenerationRequest(**{**base, **kw})


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_for_step(job: Job, step: int, timeout: float = 60) -> None:
    wait_until(lambda: job.progress.sampling_step >= step or job.done, timeout, f"step {step}")
    assert not job.done, f"job finished early: {job.status} {job.error}"


def busy(engine: Engine) -> Job:
    """Occupy the worker with a long job so the next submissions wait together; returns it (cancel to release)."""
    blocker = engine.submit(req(prompt="blocker", steps=2000, seed=0))
    wait_for_step(blocker, 1)
    return blocker


def release(blocker: Job) -> None:
    blocker.cancel()
    with pytest.raises(JobCancelled):
        blocker.wait_sync(60)


def record_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, list[int]]]]:
    """Record (prompt, seeds) of every item of every SD pipeline call, in order."""
    adapter = adapter_for("sd15")
    original = adapter.run_batch
    calls: list[list[tuple[str, list[int]]]] = []

    def spy(loaded, items, scheduler, on_step):
        calls.append([(it.request.prompt, list(it.seeds)) for it in items])
        return original(loaded, items, scheduler, on_step)

    monkeypatch.setattr(adapter, "run_batch", spy)
    return calls


def max_abs_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())
