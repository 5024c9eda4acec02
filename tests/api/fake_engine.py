"""A torch-free `EngineClient` for HTTP-layer tests: solid-colour images of the requested size, real seeds.

Jobs run one at a time on a worker thread, like the real engine. `block()` holds every job at its first sampling
step until `release()`, so tests can watch /progress and call /interrupt or /skip while a job is running.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from PIL import Image

from pipelines.engine_api import JobStatus
from pipelines.errors import EngineError, InvalidRequest, ModelNotFound, QueueFull
from pipelines.registry import BackgroundRemovalSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult, Progress, Task
from pipelines.sampler_names import resolve_sampler, scheduler_label_for_info

MAX_SEED = 4294967294
# The families whose adapter has `flow_matching = True` (pipelines/families/flux.py, qwen.py); the adapters import
# torch, so the fake cannot ask them.
FLOW_MATCHING_FAMILIES = frozenset({"flux", "qwen-image", "qwen-image-edit"})


def seed_color(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


def with_background_removal(registry: Registry) -> Registry:
    """`registry`'s models plus a `background_removal:` model (the fake engine only reads the flag it sets)."""
    removal = BackgroundRemovalSpec(source="/models/segmentation")
    return Registry(list(registry), registry.default_model, routes=registry.routes, background_removal=removal)


def fake_image(req: GenerationRequest, seed: int) -> Image.Image:
    """The seed's colour; with `transparent_background` (the engine's background removal) the left half clear."""
    image = Image.new("RGB", (req.width, req.height), seed_color(seed))
    if req.transparent_background:
        image = image.convert("RGBA")
        image.paste((*seed_color(seed), 0), (0, 0, req.width // 2, req.height))
    return image


class FakeJob:
    def __init__(self, engine: FakeEngine, request: GenerationRequest, seed: int):
        self.id = uuid.uuid4().hex
        self.request = request
        self.seed = seed
        self._engine = engine
        self._status = JobStatus.QUEUED
        self._progress = Progress(job_count=request.n_iter, sampling_steps=request.steps)
        self._error: BaseException | None = None
        self._result: GenerationResult | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[FakeJob], None]] = []
        self._lock = threading.Lock()
        self.cancel_requested = False
        self.interrupt_requested = False
        self.skip_requested = False

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def progress(self) -> Progress:
        p = self._progress
        return Progress(p.job_no, p.job_count, p.sampling_step, p.sampling_steps, p.started_at)

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def wait(self, timeout: float | None = None) -> GenerationResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():  # polling keeps the fake independent of which event loop awaits it
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s; it keeps running")
            await asyncio.sleep(0.002)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self.cancel_requested = True

    def add_done_callback(self, fn: Callable[[FakeJob], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # Worker side ---------------------------------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        return self.cancel_requested or self.interrupt_requested or self.skip_requested

    def run(self) -> None:
        req, engine = self.request, self._engine
        self._status = JobStatus.RUNNING
        started = time.time()
        seeds = [self.seed + i for i in range(req.total_images)]
        images: list[Image.Image] = []
        try:
            if engine.fail_with is not None:
                raise engine.fail_with
            for it in range(req.n_iter):
                if self.interrupt_requested or self.cancel_requested:
                    break
                self.skip_requested = False
                for step in range(1, req.steps + 1):
                    self._progress = Progress(it, req.n_iter, step, req.steps, started)
                    while not engine.gate.is_set() and not self._stop_requested():
                        engine.gate.wait(0.005)
                    if self._stop_requested():
                        break
                    if engine.step_delay:
                        time.sleep(engine.step_delay)
                # As A1111: a stopped batch is still decoded and returned.
                call_seeds = seeds[it * req.batch_size : (it + 1) * req.batch_size]
                images.extend(fake_image(req, s) for s in call_seeds)
            spec = engine.registry.get(req.model) if engine.registry is not None else None
            # What the real engine does (Engine._run_job): same resolution, same reported label.
            default_sampler = spec.defaults.sampler if spec is not None else None
            choice = resolve_sampler(req.sampler or default_sampler, "Euler", req.schedule)
            flow_matching = spec is not None and spec.family in FLOW_MATCHING_FAMILIES
            self._result = GenerationResult(
                images=images,
                seeds=seeds[: len(images)],
                model=req.model,
                model_hash=spec.short_hash if spec is not None else None,
                sampler=choice.name,
                schedule=scheduler_label_for_info(choice, flow_matching),
                width=req.width,
                height=req.height,
                steps=req.steps,
                interrupted=self.interrupt_requested,
                timings={"queued_s": 0.0, "load_s": 0.0, "run_s": time.time() - started},
            )
            self._status = JobStatus.COMPLETED
        except BaseException as e:  # the test decides what the engine raises
            self._error = e
            self._status = JobStatus.FAILED
        finally:
            with self._lock:
                self._done.set()
                callbacks, self._callbacks = self._callbacks, []
            for fn in callbacks:
                fn(self)


class FakeEngine:
    """Implements `pipelines.engine_api.EngineClient` without torch."""

    def __init__(self, registry: Registry | None = None, *, step_delay: float = 0.0):
        self.registry = registry
        self.step_delay = step_delay
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[GenerationRequest] = []
        self.loaded: list[str] = []
        self.fail_with: BaseException | None = None  # raised by the next jobs' run
        self.submit_error: BaseException | None = None  # raised by submit()
        self.load_error: BaseException | None = None  # raised by load_model()
        self.queue_size: int | None = None  # admission bound on waiting jobs (None: unbounded), as the real engine
        self.failure: str | None = None  # set to make the engine dead (alive False)
        self._current: FakeJob | None = None
        self._queued = 0
        self._waiting: list[FakeJob] = []  # submitted, not running yet
        self._gpu = threading.Lock()

    # Test controls ---------------------------------------------------------------------------------------------------

    def block(self) -> None:
        """Hold jobs at their first step until release()."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def wait_for_running(self, timeout: float = 5.0) -> FakeJob:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self._current
            if job is not None and job.progress.sampling_step >= 1:
                return job
            time.sleep(0.005)
        raise AssertionError("no job started running")

    # EngineClient ----------------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return True

    @property
    def alive(self) -> bool:
        return self.failure is None

    @property
    def free_slots(self) -> int:
        return 1_000_000 if self.queue_size is None else max(0, self.queue_size - self._queued)

    def admission_error(self) -> EngineError | None:
        return QueueFull() if self.free_slots == 0 else None

    def submit(self, request: GenerationRequest) -> FakeJob:
        if self.submit_error is not None:
            raise self.submit_error
        if self.free_slots == 0:
            raise QueueFull()
        if self.registry is not None:
            spec = self.registry.resolve(request.model)
            if spec is None:
                raise ModelNotFound(request.model)
            for name in ("width", "height"):
                if getattr(request, name) % spec.size_multiple:
                    raise InvalidRequest(name, f"must be a multiple of {spec.size_multiple}")
        if request.task in (Task.IMG2IMG, Task.INPAINT) and not request.init_images:
            raise InvalidRequest("init_images", "needs an input image")
        self.requests.append(request)
        seed = request.seed if request.seed >= 0 else random.randrange(MAX_SEED)
        job = FakeJob(self, request, seed)
        self._queued += 1
        self._waiting.append(job)
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def _run(self, job: FakeJob) -> None:
        with self._gpu:
            self._queued -= 1
            self._waiting.remove(job)
            self._current = job
            try:
                job.run()
            finally:
                self._current = None

    def current_job(self) -> FakeJob | None:
        return self._current

    def queued_count(self) -> int:
        return self._queued

    def queued_owners(self) -> list[str | None]:
        return [job.request.tags.get("owner") for job in list(self._waiting)]

    def interrupt(self) -> None:
        if self._current is not None:
            self._current.interrupt_requested = True

    def skip(self) -> None:
        if self._current is not None:
            self._current.skip_requested = True

    async def load_model(self, model_id: str) -> None:
        if self.load_error is not None:
            raise self.load_error
        if self.registry is not None and self.registry.resolve(model_id) is None:
            raise ModelNotFound(model_id)
        self.loaded.append(model_id)

    def unload_models(self) -> None:
        self.loaded.clear()

    def loaded_models(self) -> list[str]:
        return list(dict.fromkeys(self.loaded))

    def memory_stats(self) -> dict[str, Any]:
        return {"ram": {"free": 1, "used": 1, "total": 2}, "cuda": {"error": "CUDA is not available on this server"}}
