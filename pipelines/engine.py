"""Engine: bounded admission queue, one worker thread per device running one job at a time, per-step progress,
interrupt / skip / cancel, per-job status. Batching across requests comes later; the seams are `_run_job`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image

from pipelines import demo
from pipelines.cache import PipelineCache, free_device_memory
from pipelines.engine_api import JobStatus
from pipelines.errors import (
    EngineNotReady,
    GenerationFailed,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    ModelNotFound,
    QueueFull,
)
from pipelines.families import adapter_for
from pipelines.families.base import FamilyAdapter, LoadedModel, UnsupportedTask
from pipelines.imageprep import flatten, prepare_inpaint, resize_image
from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult, Progress, Task
from pipelines.samplers import build_scheduler, resolve_sampler, scheduler_label_for_info

log = logging.getLogger("easel.engine")

MAX_SEED = 4294967294  # A1111: random.randrange(4294967294)


@dataclass
class EngineConfig:
    data_dir: Path = Path("data")
    device: str = "auto"
    queue_size: int = 64
    cache_max_models: int = 3
    cache_memory_budget_gb: float | None = None
    preload_default: bool = True  # load the default model at start, so the first request does not pay for it

    @property
    def demo_root(self) -> Path:
        return Path(self.data_dir) / "demo-models"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if spec.family in ("sd15", "sdxl") else torch.bfloat16


class Job:
    """A submitted request: status, progress, result. Thread-safe; awaited from any event loop."""

    def __init__(self, request: GenerationRequest, seed: int):
        self.id = uuid.uuid4().hex
        self.request = request
        self.seed = seed
        self.created_at = time.time()
        self._status = JobStatus.QUEUED
        self._progress = Progress(job_count=request.n_iter, sampling_steps=request.steps)
        self._error: BaseException | None = None
        self._result: GenerationResult | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._callbacks: list[Callable[[Job], None]] = []
        # Flags polled by the worker at every denoising step.
        self.cancel_requested = False
        self.interrupt_requested = False
        self.skip_requested = False

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def progress(self) -> Progress:
        return dataclasses.replace(self._progress)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancel_requested = True
        with self._lock:
            queued = self._status == JobStatus.QUEUED
        if queued:  # never reaches the GPU; the worker drops it when it comes off the queue
            self._finish(JobStatus.CANCELLED, error=JobCancelled(f"job {self.id} was cancelled"))

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _call_safely(fn, self)

    async def wait(self, timeout: float | None = None) -> GenerationResult:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._waiters.append((loop, fut))
            else:
                fut.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s; it keeps running") from None
        return self.result_or_raise()

    def wait_sync(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s; it keeps running")
        return self.result_or_raise()

    def result_or_raise(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # Worker side -----------------------------------------------------------------------------------------------

    def _start(self) -> bool:
        with self._lock:
            if self._status != JobStatus.QUEUED:
                return False
            self._status = JobStatus.RUNNING
            self._progress.started_at = time.time()
            return True

    def _set_progress(self, job_no: int, step: int, steps: int) -> None:
        p = self._progress
        p.job_no, p.sampling_step, p.sampling_steps = job_no, step, steps

    def _finish(
        self, status: JobStatus, result: GenerationResult | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._status, self._result, self._error = status, result, error
            self._done.set()
            waiters, self._waiters = self._waiters, []
            callbacks, self._callbacks = self._callbacks, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_if_pending, fut)
        for fn in callbacks:
            _call_safely(fn, self)


def _call_safely(fn: Callable[[Job], None], job: Job) -> None:
    try:
        fn(job)
    except Exception:  # a broken listener must not take the worker down
        log.exception("done-callback of job %s failed", job.id)


def _set_if_pending(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


_STOP = object()


class Engine:
    """Implements `pipelines.engine_api.EngineClient`."""

    def __init__(self, registry: Registry, config: EngineConfig | None = None):
        self.registry = registry
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        budget = self.config.cache_memory_budget_gb
        self.cache = PipelineCache(
            self._load_model,
            max_models=self.config.cache_max_models,
            memory_budget_bytes=int(budget * 2**30) if budget and self.device.type == "cuda" else None,
        )
        self._queue: queue.Queue = queue.Queue(maxsize=self.config.queue_size)
        self._current: Job | None = None
        self._worker: threading.Thread | None = None
        self._running = False
        self.jobs_done = 0

    # Lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.preload_default:
            self.cache.get(self.registry.get(self.registry.default_model))
        self._running = True
        self._worker = threading.Thread(target=self._work, name=f"easel-worker-{self.device}", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting, cancel what is queued, let the running job stop at its next step."""
        self._running = False
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job):
                job._finish(JobStatus.CANCELLED, error=JobCancelled("the server is shutting down"))
        if self._current is not None:
            self._current.cancel_requested = True
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        if self._worker is not None:
            self._worker.join(timeout)

    @property
    def ready(self) -> bool:
        return self._running and self._worker is not None and self._worker.is_alive()

    # EngineClient ------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        if not self._running:
            raise EngineNotReady("the engine is not running")
        spec = self.registry.resolve(request.model)
        if spec is None:
            raise ModelNotFound(request.model)
        request = dataclasses.replace(request, model=spec.id)
        self._validate(spec, request)
        seed = request.seed if request.seed is not None and request.seed >= 0 else random.randrange(MAX_SEED)
        job = Job(request, seed)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job

    def current_job(self) -> Job | None:
        return self._current

    def queued_count(self) -> int:
        return self._queue.qsize()

    def interrupt(self) -> None:
        job = self._current
        if job is not None:
            job.interrupt_requested = True

    def skip(self) -> None:
        job = self._current
        if job is not None:
            job.skip_requested = True

    async def load_model(self, model_id: str) -> None:
        spec = self.registry.resolve(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        await asyncio.get_running_loop().run_in_executor(None, self.cache.get, spec)

    def unload_models(self) -> None:
        self.cache.unload()

    def loaded_models(self) -> list[str]:
        return self.cache.loaded_ids()

    def memory_stats(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
        if self.device.type != "cuda":
            return {"ram": ram, "cuda": {"error": "CUDA is not available on this server"}}
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)

        def pair(key: str) -> dict[str, int]:
            return {"current": stats.get(f"{key}.all.current", 0), "peak": stats.get(f"{key}.all.peak", 0)}

        return {
            "ram": ram,
            "cuda": {
                "system": {"free": free, "used": total - free, "total": total},
                "active": pair("active_bytes"),
                "allocated": pair("allocated_bytes"),
                "reserved": pair("reserved_bytes"),
                "inactive": pair("inactive_split_bytes"),
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
            },
        }

    # Validation and loading --------------------------------------------------------------------------------------

    def _validate(self, spec: ModelSpec, req: GenerationRequest) -> None:
        adapter = adapter_for(spec.family)
        try:
            adapter.check_task(req.task)
        except UnsupportedTask as e:
            raise InvalidRequest("model", f"model '{spec.id}': {e}") from None
        m = spec.size_multiple
        for name, value in (("width", req.width), ("height", req.height)):
            if value < m or value % m:
                raise InvalidRequest(name, f"must be a positive multiple of {m} for model family {spec.family}")
        if req.steps < 1:
            raise InvalidRequest("steps", "must be at least 1")
        if req.batch_size < 1 or req.n_iter < 1:
            raise InvalidRequest("batch_size", "batch_size and n_iter must be at least 1")
        if not 0.0 <= req.strength <= 1.0:
            raise InvalidRequest("denoising_strength", "must be between 0 and 1")
        if req.task in (Task.IMG2IMG, Task.INPAINT, Task.EDIT) and not req.init_images:
            raise InvalidRequest("init_images", f"task {req.task.value} needs an input image")
        if req.task == Task.INPAINT and req.mask is None:
            raise InvalidRequest("mask", "inpainting needs a mask")

    def _load_model(self, spec: ModelSpec) -> LoadedModel:
        if spec.is_demo:
            path = demo.ensure_demo_model(spec.demo_kind, self.config.demo_root)
        else:
            path = Path(spec.source)
            if not path.is_dir():
                raise ModelLoadError(
                    f"model '{spec.id}': source is not a diffusers folder (single-file checkpoints are not "
                    "supported yet); see models.yaml"
                )
        started = time.perf_counter()
        loaded = adapter_for(spec.family).load(spec, str(path), self.device, resolve_dtype(spec, self.device))
        log.info("loaded %s (%s) in %.1f s", spec.id, spec.family, time.perf_counter() - started)
        return loaded

    # Worker ------------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if job.cancel_requested or not job._start():
                continue
            self._current = job
            try:
                result = self._run_job(job)
            except JobCancelled as e:
                job._finish(JobStatus.CANCELLED, error=e)
            except (InvalidRequest, ModelLoadError, ModelNotFound) as e:
                job._finish(JobStatus.FAILED, error=e)
            except torch.cuda.OutOfMemoryError:
                free_device_memory()
                job._finish(
                    JobStatus.FAILED,
                    error=GenerationFailed("out of GPU memory for this request: try a smaller size or batch"),
                )
            except Exception as e:
                log.exception("job %s failed", job.id)
                job._finish(JobStatus.FAILED, error=GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
            else:
                job._finish(JobStatus.COMPLETED, result=result)
            finally:
                self._current = None
                self.jobs_done += 1

    def _run_job(self, job: Job) -> GenerationResult:
        req = job.request
        spec = self.registry.get(req.model)
        adapter = adapter_for(spec.family)
        queued_s = time.time() - job.created_at
        t0 = time.perf_counter()
        loaded = self.cache.get(spec)
        load_s = time.perf_counter() - t0

        choice = resolve_sampler(req.sampler or spec.defaults.sampler, "Euler", req.schedule)
        req, finish = self._prepare_images(req)
        seeds = [job.seed + i for i in range(req.total_images)]
        images: list[Image.Image] = []
        interrupted = False
        t1 = time.perf_counter()
        for it in range(req.n_iter):
            if job.cancel_requested:
                raise JobCancelled(f"job {job.id} was cancelled")
            if job.interrupt_requested:
                interrupted = True
                break
            job.skip_requested = False
            call_seeds = seeds[it * req.batch_size : (it + 1) * req.batch_size]
            job._set_progress(it, 0, req.steps)
            scheduler = build_scheduler(
                choice, loaded.base.scheduler.config, adapter.flow_matching, sdxl=spec.family == "sdxl"
            )
            out = self._call(adapter, loaded, req, call_seeds, scheduler, job, it)
            images.extend(finish(out))
            if job.cancel_requested:
                raise JobCancelled(f"job {job.id} was cancelled")
        interrupted = interrupted or job.interrupt_requested
        if not interrupted:
            job._set_progress(req.n_iter, req.steps, req.steps)
        run_s = time.perf_counter() - t1
        return GenerationResult(
            images=images,
            seeds=seeds[: len(images)],
            model=spec.id,
            model_hash=spec.short_hash,
            sampler=choice.name,
            schedule=scheduler_label_for_info(choice, adapter.flow_matching),
            width=images[0].width if images else req.width,  # "only masked" inpainting returns the init's size
            height=images[0].height if images else req.height,
            steps=req.steps,
            interrupted=interrupted,
            timings={"queued_s": queued_s, "load_s": load_s, "run_s": run_s},
        )

    def _call(
        self,
        adapter: FamilyAdapter,
        loaded: LoadedModel,
        req: GenerationRequest,
        seeds: list[int],
        scheduler: Any,
        job: Job,
        it: int,
    ) -> list[Image.Image]:
        def on_step(step: int, total: int) -> bool:
            job._set_progress(it, step, total)
            return job.cancel_requested or job.interrupt_requested or job.skip_requested

        with torch.inference_mode():
            return adapter.run(loaded, req, seeds, scheduler, on_step)

    @staticmethod
    def _prepare_images(req: GenerationRequest):
        """Resize inputs to the target size; for inpainting, crop/blur the mask and composite the result back."""
        if req.task == Task.INPAINT:
            prepared = prepare_inpaint(
                req.init_images[0], req.mask, req.width, req.height, req.inpaint, req.resize_mode
            )
            req = dataclasses.replace(req, init_images=[prepared.image], mask=prepared.mask)
            return req, prepared.finish
        if req.task in (Task.IMG2IMG, Task.EDIT):
            images = [resize_image(flatten(im), req.width, req.height, req.resize_mode) for im in req.init_images]
            req = dataclasses.replace(req, init_images=images)
        return req, lambda out: out
