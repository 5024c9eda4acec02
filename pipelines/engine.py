"""Engine: bounded admission, one worker thread per device, dynamic batching of compatible requests into one
pipeline call (`pipelines.batching`), per-step progress, interrupt / skip / cancel, per-job status.

Reliability (docs/reliability.md): admission is bounded (`queue_size`, QueueFull); every request has a deadline
(dropped before it runs, or stopped at the next step, once passed); `drain()` stops admitting and lets work finish
for a while before cancelling the rest; an out-of-memory error fails only the request that caused it (after one
retry of a batch as single requests); a device fault, or repeated out-of-memory errors, mark the engine dead.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image

from pipelines import checkpoints, controlnet, demo, ip_adapter, log_context, quantized
from pipelines.batching import batch_key
from pipelines.cache import PipelineCache, free_device_memory
from pipelines.checkpoints import NO_TXT2IMG_VARIANTS
from pipelines.control_units import ControlMode, ControlUnit, crop_like_only_masked, ip_adapter_units
from pipelines.embeddings import TextualInversions
from pipelines.engine_api import JobStatus
from pipelines.errors import (
    DeadlineExceeded,
    EngineDead,
    EngineError,
    EngineNotReady,
    GenerationFailed,
    InsufficientMemory,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    ModelNotFound,
    QueueFull,
    ShutdownCancelled,
)
from pipelines.families import adapter_for
from pipelines.families.base import BatchItem, FamilyAdapter, LoadedModel, StepCallback, StepReporter, UnsupportedTask
from pipelines.hires import HIRES_UPSCALERS
from pipelines.imageprep import check_request_work, flatten, prepare_inpaint, resize_image
from pipelines.job_state import CompletableJob
from pipelines.library_logging import describe_components, quiet_libraries
from pipelines.lora import LoraManager, registry_for
from pipelines.matting import BackgroundRemover
from pipelines.optimize import (
    QuantizationUnavailable,
    apply_optimizations,
    capability_of,
    fp8_compute_tier,
    installed_packages,
    load_quantization,
    prepare_call,
    warmup_shapes,
    watch_compiles,
)
from pipelines.placement import PlacementError
from pipelines.previews import PreviewMaker
from pipelines.prompts import clean_prompts, is_composable
from pipelines.registry import ModelSpec, Registry
from pipelines.request import MIN_DENOISING_STRENGTH, GenerationRequest, GenerationResult, Task, wants_preview
from pipelines.sampler_names import SamplerChoice
from pipelines.samplers import build_scheduler, resolve_sampler, scheduler_label_for_info
from pipelines.telemetry import (
    CacheCounts,
    DeviceMemory,
    EngineSnapshot,
    JobEnded,
    Observer,
    Observers,
    PipelineCall,
    StepClock,
)
from pipelines.variation import wants_variation

log = logging.getLogger("easel.engine")

MAX_SEED = 4294967294  # A1111: random.randrange(4294967294)
KEPT_PREVIEWS = 4  # per job, for watchers that look less often than previews come (OpenAI partial_images <= 3)


@dataclass
class EngineConfig:
    data_dir: Path = Path("data")
    device: str = "auto"
    queue_size: int = 64
    cache_max_models: int = 3
    cache_memory_budget_gb: float | None = None
    preload_default: bool = True  # load the default model at start, so the first request does not pay for it
    max_batch: int = 8  # images per pipeline call when compatible requests are batched (1 = no batching)
    max_batch_by_family: dict[str, int] = dataclasses.field(default_factory=dict)
    max_wait_ms: float = 10.0  # how long a busy device waits for batch companions
    lora_dir: Path | None = None  # A1111-style Lora folder (*.safetensors); None = LoRAs are not available
    embeddings_dir: Path | None = None  # A1111 textual-inversion embeddings (*.safetensors), used by name in prompts
    configs_dir: Path | None = None  # per-variant config folders for single-file checkpoints (prefetch-configs)
    allow_pickle: bool = False  # load diffusers folders with pickle weights (.bin) for every model
    request_timeout_s: float = 600.0  # deadline of a request that brings none (queue wait + run)
    # Requests failing with out-of-memory in a row (each alone, after freeing memory) that mark the engine dead:
    # the memory is not coming back without a restart. 0 = never.
    max_consecutive_ooms: int = 3
    # The share of the GPU's memory this process may allocate (torch.cuda.set_per_process_memory_fraction), for a
    # card shared with other programs; an allocation past it fails as out-of-memory. None = all of it.
    cuda_memory_fraction: float | None = None
    # Largest image made from an input while preparing it (resize, crop, mask, paste-back); None = unbounded.
    max_work_pixels: int | None = 4096 * 4096

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


def check_control_units(spec: ModelSpec, req: GenerationRequest) -> None:
    """Where ControlNet units can run (pipelines.controlnet: families, tasks, units per call, control modes); anything
    else is refused with the field that asks for it."""
    name = "alwayson_scripts.controlnet"
    if spec.family not in controlnet.FAMILIES:
        raise InvalidRequest(name, f"ControlNet runs on SD1.5, SDXL, FLUX and Qwen-Image models, not {spec.family}")
    if spec.variant in ("sdxl-refiner", "flux-fill", "flux-kontext"):
        raise InvalidRequest(name, f"ControlNet does not run on a {spec.variant} checkpoint")
    if req.task not in controlnet.TASKS[spec.family]:
        raise InvalidRequest(name, f"ControlNet on {spec.family} runs with txt2img only here, not {req.task.value}")
    limit = controlnet.MAX_UNITS.get(spec.family)
    if limit is not None and len(req.control_units) > limit:
        raise InvalidRequest(name, f"at most {limit} unit(s) on {spec.family} (diffusers runs one ControlNet there)")
    if req.hires is not None and Task.IMG2IMG not in controlnet.TASKS[spec.family]:
        raise InvalidRequest("enable_hr", f"hires fix with ControlNet units needs img2img ControlNet ({spec.family})")
    if req.refiner:
        raise InvalidRequest("refiner_checkpoint", "an SDXL refiner with ControlNet units is not supported yet")
    if spec.family in ("sd15", "sdxl") and is_composable(clean_prompts(req)[0]):
        # The AND wrapper (pipelines.composable) re-batches the UNet's rows; the units' residuals are per image.
        raise InvalidRequest("prompt", "A1111 AND prompts with ControlNet / IP-Adapter units are not supported yet")
    for i, unit in enumerate(req.control_units):
        if unit.is_ip_adapter:
            check_ip_adapter_unit(spec, unit, i)
            continue
        if spec.family not in controlnet.CFG_FAMILIES and unit.control_mode != ControlMode.BALANCED:
            raise InvalidRequest(
                controlnet.unit_field(i, "control_mode"),
                f"only Balanced applies to {spec.family} (the other modes act on classic CFG: SD1.5 and SDXL)",
            )
        if unit.image.size != (req.width, req.height):
            raise InvalidRequest(controlnet.unit_field(i, "image"), "the control image must have the output size")


def check_ip_adapter_unit(spec: ModelSpec, unit: ControlUnit, index: int) -> None:
    """IP-Adapter units: SD1.5/SDXL, the whole denoising (diffusers has no per-step window for them), weight as
    the adapter's scale."""
    if spec.family not in ip_adapter.FAMILIES:
        raise InvalidRequest(
            controlnet.unit_field(index, "model"), f"IP-Adapter runs on SD1.5 and SDXL, not {spec.family}"
        )
    if (unit.guidance_start, unit.guidance_end) != (0.0, 1.0):
        raise InvalidRequest(
            controlnet.unit_field(index, "guidance_start"), "an IP-Adapter unit applies to every step here (0 to 1)"
        )
    if unit.control_mode != ControlMode.BALANCED:
        raise InvalidRequest(controlnet.unit_field(index, "control_mode"), "an IP-Adapter unit runs Balanced only")


class Job(CompletableJob):
    """A submitted request: status, progress, result. Thread-safe; awaited from any event loop."""

    def __init__(self, request: GenerationRequest, seed: int, choice: SamplerChoice):
        super().__init__(request)
        self.seed = seed
        self.choice = choice
        self.batch_key = batch_key(self.id, request, choice)
        # Worker-side state, touched only by the worker thread.
        self.prepared: GenerationRequest | None = None  # inputs resized / mask prepared, set when the job starts
        self.finish_images: Callable[[list[Image.Image]], list[Image.Image]] = list
        self.images: list[Image.Image] = []
        self.timings: dict[str, float] = {"queued_s": 0.0, "load_s": 0.0, "prepare_s": 0.0, "run_s": 0.0}
        self.degraded: list[str] = []  # what was done differently to make it run (e.g. an OOM batch split)
        self.deadline = request.deadline  # time.time() seconds; set by Engine.submit

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def seeds_for(self, iteration: int) -> list[int]:
        n = self.request.batch_size
        return [self.seed + iteration * n + i for i in range(n)]

    @property
    def stop_requested(self) -> bool:
        # A job that is already done was aborted by the engine (deadline, shutdown): its call may stop.
        return self.cancel_requested or self.interrupt_requested or self.skip_requested or self._done.is_set()

    def cancel(self) -> None:
        self.cancel_requested = True
        with self._lock:
            queued = self._status == JobStatus.QUEUED
        if queued:  # never reaches the GPU; the worker drops it when it comes off the queue
            self._finish(JobStatus.CANCELLED, error=JobCancelled(f"job {self.id} was cancelled"))

    # Worker side -----------------------------------------------------------------------------------------------

    def _start(self) -> bool:
        with self._lock:
            if self._status != JobStatus.QUEUED:
                return False
            self._status = JobStatus.RUNNING
            self._progress.started_at = time.time()
            return True

    def _abort(self, error: EngineError) -> None:
        """End the job now with `error`, queued or running (a running call stops at its next step and its images
        are dropped). No-op if it already ended."""
        self._finish(JobStatus.CANCELLED if isinstance(error, JobCancelled) else JobStatus.FAILED, error=error)

    def _set_preview(self, step: int, image: Image.Image) -> None:
        p = self._progress
        p.recent_previews = (*p.recent_previews[-(KEPT_PREVIEWS - 1) :], (step, image))
        p.preview, p.preview_step = image, step

    def _set_progress(self, job_no: int, step: int, steps: int) -> None:
        p = self._progress
        p.job_no, p.sampling_step, p.sampling_steps = job_no, step, steps


_STOP = object()
Unit = tuple[Job, int]  # a job and which of its n_iter pipeline calls is due
CallOutput = list[Image.Image] | Exception  # one unit's images, or why it failed (out of memory, ...)

SHUTDOWN_REASON = "the server shut down before the job finished"
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "HIP error",
)
_EXPIRY_SWEEP_S = 0.25  # how often the worker looks for queued jobs past their deadline while it runs a call


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or a CUDA/cuBLAS error that says "out of memory" (recoverable the same way)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def is_device_fault(error: BaseException) -> bool:
    """A device error the process cannot recover from (illegal memory access, device-side assert, ...). Checked
    after `is_out_of_memory`: OutOfMemoryError is a RuntimeError too, and must not kill the engine."""
    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_FAULT_MARKERS)


@dataclass
class DrainReport:
    """What `Engine.drain` did: whether everything finished in time, and how many jobs it cancelled."""

    finished: bool
    cancelled: int
    waited_s: float


class Engine:
    """Implements `pipelines.engine_api.EngineClient`, with dynamic batching of compatible requests."""

    def __init__(self, registry: Registry, config: EngineConfig | None = None):
        quiet_libraries()
        self.registry = registry
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        budget = self.config.cache_memory_budget_gb
        self.cache = PipelineCache(
            self._load_model,
            max_models=self.config.cache_max_models,
            memory_budget_bytes=int(budget * 2**30) if budget and self.device.type == "cuda" else None,
        )
        # Unbounded hand-off to the worker; admission is bounded by `_waiting` (jobs not started yet), which also
        # holds jobs the worker has already drained into its pending list while looking for batch companions.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._admission = threading.Lock()
        self._changed = threading.Condition(self._admission)  # notified when a job ends (drain waits on it)
        self._waiting: dict[str, Job] = {}  # admitted, not started: bounded by queue_size
        self._unfinished: dict[str, Job] = {}  # admitted, not ended (queued or running)
        self._pending: collections.deque[Unit] = collections.deque()  # worker thread only
        self._current_batch: list[Job] = []
        self._worker: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._draining = False
        self._failure: str | None = None  # why the engine is dead (device fault, repeated OOM); None while alive
        self._consecutive_ooms = 0
        self._next_sweep = 0.0
        self.broken_models: dict[str, str] = {}  # model id -> why its component files cannot load (start-up check)
        self.calls = 0  # pipeline calls made (tests and metrics: batching shows as fewer calls than jobs)
        self.observers = Observers()  # metrics exporters (server.metrics): JobEnded, PipelineCall
        removal = registry.background_removal
        self.background_remover = BackgroundRemover(removal, self.device) if removal is not None else None

    # Lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.device.type == "cuda" and self.config.cuda_memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self.config.cuda_memory_fraction, self.device)
        self.check_component_files()
        if self.config.preload_default and self.registry.default_model not in self.broken_models:
            self.cache.get(self.registry.get(self.registry.default_model))
        self._running = True
        self._worker = threading.Thread(target=self._work, name=f"easel-worker-{self.device}", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting, cancel what is waiting, let the running batch stop at its next step."""
        self._running = False
        for job in list(self._current_batch):
            job._abort(ShutdownCancelled(f"job {job.id} was cancelled: {SHUTDOWN_REASON}"))
        self._queue.put(_STOP)
        if self._worker is not None:
            self._worker.join(timeout)

    def drain(self, timeout_s: float, cancel_grace_s: float = 10.0) -> DrainReport:
        """Graceful shutdown: stop admitting (submit raises EngineNotReady), let queued and running work finish
        for up to `timeout_s`, then cancel the rest: queued jobs end without running, running ones stop at their
        next step; each ends with JobCancelled saying the server shut down. Waits up to `cancel_grace_s` more for
        the running call to stop (VAE decode is not interruptible). Call `stop()` afterwards to end the worker."""
        started = time.monotonic()
        self._draining = True
        with self._changed:
            finished = self._changed.wait_for(lambda: not self._unfinished, timeout=max(0.0, timeout_s))
            left = list(self._unfinished.values())
        for job in left:
            job._abort(ShutdownCancelled(f"job {job.id} was cancelled: {SHUTDOWN_REASON}"))
        grace_end = time.monotonic() + cancel_grace_s
        while self._current_batch and time.monotonic() < grace_end:
            time.sleep(0.01)
        if left:
            log.warning("drain: %d job(s) cancelled after %.1f s", len(left), timeout_s)
        return DrainReport(finished=finished, cancelled=len(left), waited_s=time.monotonic() - started)

    @property
    def ready(self) -> bool:
        """Takes new work: started, not draining, not dead (readiness probe)."""
        return self._running and not self._draining and self.alive and self._worker is not None

    @property
    def alive(self) -> bool:
        """False once the engine is dead: a device fault, repeated OOMs, or a worker thread that died (liveness)."""
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine is dead, or None."""
        if self._failure is not None:
            return self._failure
        if self._running and self._worker is not None and not self._worker.is_alive():
            return "the worker thread stopped unexpectedly"
        return None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def free_slots(self) -> int:
        """Admission slots left before submit raises QueueFull (a cheap check for the HTTP gate)."""
        return max(0, self.config.queue_size - len(self._waiting))

    @property
    def admission_full(self) -> bool:
        return self.free_slots == 0

    def admission_error(self) -> EngineError | None:
        """The error submit would raise now for any request, without looking at one (None: it would admit)."""
        failure = self.failure
        if failure is not None:
            return EngineDead(f"the engine stopped: {failure}; the server must be restarted")
        if self._draining:
            return EngineNotReady("the server is shutting down: not accepting new work")
        if not self._running:
            return EngineNotReady("the engine is not running")
        if self.free_slots == 0:
            return QueueFull()
        return None

    # EngineClient ------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        refusal = self.admission_error()
        if refusal is not None and not isinstance(refusal, QueueFull):  # a full queue is checked atomically below
            raise refusal
        spec = self.registry.resolve(request.model)
        if spec is None:
            raise ModelNotFound(request.model)
        now = time.time()
        deadline = request.deadline if request.deadline is not None else now + self.config.request_timeout_s
        if deadline <= now:
            raise DeadlineExceeded("the request's deadline had already passed when it was submitted")
        request = dataclasses.replace(request, model=spec.id, deadline=deadline)
        self._validate(spec, request)
        if request.task in (Task.IMG2IMG, Task.INPAINT) and request.strength < MIN_DENOISING_STRENGTH:
            request = dataclasses.replace(request, strength=MIN_DENOISING_STRENGTH)
        seed = request.seed if request.seed is not None and request.seed >= 0 else random.randrange(MAX_SEED)
        # The resolved seeds ride on the request: A1111 resolves a random subseed like the seed, used or not.
        subseed = request.subseed if request.subseed >= 0 else random.randrange(MAX_SEED)
        request = dataclasses.replace(request, seed=seed, subseed=subseed)
        job = Job(request, seed, resolve_sampler(request.sampler or spec.defaults.sampler, "Euler", request.schedule))
        with self._admission:
            refusal = self.admission_error()  # again under the lock: a drain or a full queue may have begun
            if refusal is not None:
                raise refusal
            self._waiting[job.id] = job
            self._unfinished[job.id] = job
        job.add_done_callback(self._forget)
        job.add_done_callback(self._report_end)
        self._queue.put(job)
        return job

    def _mark_started(self, job: Job) -> None:
        """The job no longer waits: its admission slot is free again."""
        with self._admission:
            self._waiting.pop(job.id, None)

    def _forget(self, job: Job) -> None:
        """The job ended (completed, failed or cancelled; started or not)."""
        with self._changed:
            self._waiting.pop(job.id, None)
            self._unfinished.pop(job.id, None)
            self._changed.notify_all()

    def _report_end(self, job: Job) -> None:
        ended = time.time()
        started = job.progress.started_at
        self.observers.emit(
            JobEnded(
                model=job.request.model,
                kind=job.request.task.value,
                status=job.status.value,
                queued_s=max(0.0, (started or ended) - job.created_at),
                running_s=max(0.0, ended - started) if started else None,
                total_s=max(0.0, ended - job.created_at),
            )
        )

    # Metrics -----------------------------------------------------------------------------------------------------

    def add_observer(self, fn: Observer) -> None:
        """Call `fn(event)` for each job that ends and each pipeline call (pipelines.telemetry). It runs on the
        thread that ended the job, usually the worker: keep it short."""
        self.observers.add(fn)

    def remove_observer(self, fn: Observer) -> None:
        self.observers.remove(fn)

    def metrics_snapshot(self) -> list[EngineSnapshot]:
        """The engine's state for a metrics scrape: queue, caches, device memory. Cheap; any thread."""
        cache = self.cache
        memory = None
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            memory = DeviceMemory(
                allocated=stats.get("allocated_bytes.all.current", 0),
                reserved=stats.get("reserved_bytes.all.current", 0),
                peak_allocated=stats.get("allocated_bytes.all.peak", 0),
                peak_reserved=stats.get("reserved_bytes.all.peak", 0),
                total=torch.cuda.get_device_properties(self.device).total_memory,
            )
        return [
            EngineSnapshot(
                device=str(self.device),
                queued=self.queued_count(),
                running=sum(not job.done for job in self._current_batch),  # a finished job's waiter may answer first
                free_slots=self.free_slots,
                loaded_models=cache.loaded_ids(),
                model_loads=dict(cache.load_count),
                model_load_seconds=dict(cache.load_seconds),
                model_evictions=dict(cache.evictions),
                pipeline_cache=CacheCounts(cache.hits, cache.misses),
                text_cache=cache.text_cache_counts(),
                memory=memory,
                model_memory=cache.model_memory(),
            )
        ]

    def current_job(self) -> Job | None:
        batch = self._current_batch
        return batch[0] if batch else None

    def running_jobs(self) -> list[Job]:
        return list(self._current_batch)

    def queued_count(self) -> int:
        return len(self._waiting)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start, ...; None once it started (or if unknown)."""
        with self._admission:
            for position, waiting in enumerate(self._waiting, start=1):
                if waiting == job_id:
                    return position
        return None

    def queued_owners(self) -> list[str | None]:
        """The owner tag of each job not started yet (A1111 /progress counts only the caller's own)."""
        return [job.request.tags.get("owner") for job in list(self._waiting.values())]

    def interrupt(self) -> None:
        for job in list(self._current_batch):
            job.interrupt_requested = True

    def skip(self) -> None:
        for job in list(self._current_batch):
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
        per_model = self.cache.model_memory()

        def held_on(prefix: str) -> dict[str, int]:  # bytes of weights each loaded model keeps there
            return {m: sum(n for d, n in where.items() if d.startswith(prefix)) for m, where in per_model.items()}

        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total, "models": held_on("cpu")}
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
                "models": held_on("cuda"),
            },
        }

    # Validation and loading --------------------------------------------------------------------------------------

    def check_component_files(self) -> None:
        """Start-up check of every model's `denoiser:`/`text_encoder*:` files (headers and key names only): a bad
        file is logged naming it, its model answers requests with that error, the other models serve."""
        for spec in self.registry:
            try:
                quantized.check_file(spec)
            except checkpoints.CheckpointError as e:
                self.broken_models[spec.id] = f"model '{spec.id}': {e}"
                log.error("model %s will not load: %s", spec.id, e)

    def _validate(self, spec: ModelSpec, req: GenerationRequest) -> None:
        broken = self.broken_models.get(spec.id)
        if broken is not None:
            raise ModelLoadError(broken)
        adapter = adapter_for(spec.family)
        try:
            adapter.check_task(req.task)
        except UnsupportedTask as e:
            raise InvalidRequest("model", f"model '{spec.id}': {e}") from None
        if req.task == Task.TXT2IMG and spec.variant in NO_TXT2IMG_VARIANTS:
            raise InvalidRequest("model", f"model '{spec.id}' ({spec.variant}) cannot make images from text")
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
        if req.transparent_background and self.background_remover is None:
            raise InvalidRequest("background", "no background_removal model is configured in models.yaml")
        if req.hires is not None:
            if req.task != Task.TXT2IMG:
                raise InvalidRequest("enable_hr", "hires fix applies to txt2img only")
            if req.hires.upscaler not in HIRES_UPSCALERS:
                raise InvalidRequest("hr_upscaler", f"unknown upscaler; one of: {', '.join(HIRES_UPSCALERS)}")
            if not 0.0 <= req.hires.denoising_strength <= 1.0:
                raise InvalidRequest("denoising_strength", "must be between 0 and 1")
        self._validate_a1111_extras(spec, req)
        self._refiner_spec(spec, req)
        check_request_work(req, self.config.max_work_pixels)  # before any input is resized on the worker

    @staticmethod
    def _validate_a1111_extras(spec: ModelSpec, req: GenerationRequest) -> None:
        """Variation seeds apply to txt2img (the hires first pass included) on SD1.5/SDXL/FLUX/Qwen-Image, tiling on
        SD1.5/SDXL; elsewhere they are refused rather than silently ignored."""
        sd = spec.family in ("sd15", "sdxl")
        if not math.isfinite(req.subseed_strength):
            raise InvalidRequest("subseed_strength", "must be a finite number")
        if wants_variation(req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h):
            if spec.family not in ("sd15", "sdxl", "flux", "qwen-image"):
                raise InvalidRequest("subseed_strength", f"variation seeds are not supported for family {spec.family}")
            if req.task != Task.TXT2IMG:
                raise InvalidRequest("subseed_strength", "variation seeds apply to txt2img only in this server")
        if req.tiling and not sd:
            raise InvalidRequest("tiling", f"tiling (seamless images) is not supported for family {spec.family}")
        if req.control_units:
            check_control_units(spec, req)

    def _refiner_spec(self, spec: ModelSpec, req: GenerationRequest) -> ModelSpec | None:
        """The refiner model of an SDXL txt2img request, or None; refused (a 4xx naming the A1111 field) where
        it cannot run."""
        if not req.refiner:
            return None
        refiner = self.registry.resolve(req.refiner)
        if refiner is None:
            raise InvalidRequest("refiner_checkpoint", f"model '{req.refiner}' not found")
        if spec.family != "sdxl" or refiner.family != "sdxl":
            raise InvalidRequest("refiner_checkpoint", "a refiner runs after an SDXL model and must be SDXL itself")
        if req.task != Task.TXT2IMG or req.hires is not None:
            raise InvalidRequest("refiner_checkpoint", "the refiner applies to txt2img without hires fix here")
        if not (math.isfinite(req.refiner_switch_at) and 0.0 < req.refiner_switch_at < 1.0):
            raise InvalidRequest("refiner_switch_at", "must be between 0 and 1 (exclusive)")
        return refiner

    def _load_model(self, spec: ModelSpec) -> LoadedModel:
        if spec.id in self.broken_models:
            raise ModelLoadError(self.broken_models[spec.id])
        if spec.is_demo:
            path = demo.ensure_demo_model(spec.demo_kind, self.config.demo_root)
        elif spec.is_single_file or Path(spec.source).suffix.lower() in checkpoints.PICKLE_SUFFIXES:
            try:  # detect the variant from the header, find the local config folder; pickles are refused
                spec = checkpoints.resolve_single_file(spec, self.config.configs_dir)
            except checkpoints.CheckpointError as e:
                raise ModelLoadError(f"model '{spec.id}': {e}") from None
            path = Path(spec.source)
        else:
            path = Path(spec.source)
            if not path.is_dir():
                raise ModelLoadError(
                    f"model '{spec.id}': source {path} is neither a diffusers folder nor a .safetensors file"
                )
            pickles = checkpoints.find_pickle_weights(path)
            if pickles and not (spec.allow_pickle or self.config.allow_pickle):
                raise ModelLoadError(
                    f"model '{spec.id}': {path} holds pickle weights ({', '.join(p.name for p in pickles[:3])}), "
                    "which run code when loaded; convert them to safetensors, or set `allow_pickle: true` on the "
                    "model in models.yaml if you trust the files"
                )
        started = time.perf_counter()
        adapter = adapter_for(spec.family)
        dtype = resolve_dtype(spec, self.device)
        log.info("loading %s (%s, %s) from %s onto %s", spec.id, spec.family, str(dtype).removeprefix("torch."), path,
                 self.device)  # fmt: skip
        try:  # a model entry's denoiser/text encoder files (pipelines.quantized); the rest comes from the source
            load_quantization(spec, self.device, capability_of(self.device), installed_packages())
            base_folder = Path(spec.config) if spec.is_single_file and spec.config else path
            fp8_compute = fp8_compute_tier(spec, capability_of(self.device), installed_packages())
            components = quantized.load_components(spec, base_folder, dtype, fp8_compute)
        except (checkpoints.CheckpointError, QuantizationUnavailable) as e:
            raise ModelLoadError(f"model '{spec.id}': {e}") from None
        try:
            loaded = adapter.load(spec, str(path), self.device, dtype, components)
        except PlacementError as e:  # offload auto: it cannot fit even offloaded; refused now, not mid-request
            raise ModelLoadError(str(e).replace(f"model {spec.id}:", f"model '{spec.id}':", 1)) from None
        quantized_steps = list(getattr(loaded.base, "_easel_load_steps", []))  # optimize.place: quantization at load
        for line in describe_components(loaded.base.components):
            log.info("  %s %s", spec.id, line)
        if self.config.embeddings_dir is not None:
            loaded.embeddings = TextualInversions(self.config.embeddings_dir)
        if self.config.lora_dir is not None:
            loaded.loras = LoraManager(loaded.base, registry_for(self.config.lora_dir))
        # The warm-up makes an image from text, which the refiner and FLUX Fill cannot: they compile on first use.
        warm = spec.variant not in checkpoints.NO_TXT2IMG_VARIANTS
        loaded.optimizations = quantized_steps + apply_optimizations(
            loaded.base, spec, self.device, warm_up=(lambda: self._warm_up(adapter, loaded)) if warm else None
        )
        log.info("loaded %s (%s) in %.1f s", spec.id, spec.family, time.perf_counter() - started)
        return loaded

    @staticmethod
    def _warm_up(adapter: FamilyAdapter, loaded: LoadedModel) -> None:
        """Short generations at every warm-up shape (`performance.warmup_sizes` x `warmup_batch_sizes`; default the
        model's default size, one image), so compiled kernels and CUDA graphs exist before the first request."""
        if Task.TXT2IMG not in adapter.tasks:
            return  # edit-only models need an input image; they compile on first use
        spec = loaded.spec
        for width, height, batch in warmup_shapes(spec):
            req = GenerationRequest(
                model=spec.id, prompt="warm-up", width=width, height=height, steps=2, guidance=spec.defaults.cfg
            )
            scheduler = type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)
            started = time.perf_counter()
            with torch.inference_mode():
                adapter.run(loaded, req, list(range(batch)), scheduler, lambda step, total: False)
            log.info("  %s warmed up at %dx%d, %d image(s): %.1f s", spec.id, width, height, batch,
                     time.perf_counter() - started)  # fmt: skip

    def max_batch_for(self, family: str) -> int:
        return self.config.max_batch_by_family.get(family, self.config.max_batch)

    # Worker: pick a unit, gather compatible companions, run them as one pipeline call ---------------------------

    def _work(self) -> None:
        try:
            while self._failure is None:
                first, was_idle = self._take_unit()
                if first is None:
                    self._cancel_waiting("the server is shutting down")
                    return
                batch = self._gather(first, was_idle)
                try:
                    with log_context.for_jobs(job for job, _ in batch):  # its log lines name its requests
                        self._run_batch(batch)
                finally:
                    self._current_batch = []
        except BaseException as e:  # a bug in the worker itself: say so, instead of hanging every request
            log.critical("the engine worker crashed", exc_info=e)
            self._die(f"the worker crashed ({type(e).__name__})")

    def _die(self, reason: str) -> None:
        """Mark the engine dead: not ready, not alive, new work refused, every unfinished job failed. The process
        should exit so its supervisor restarts it (vLLM's EngineDeadError model)."""
        if self._failure is None:
            self._failure = reason
            log.critical("engine dead: %s", reason)
        error = EngineDead(f"the engine stopped: {self._failure}; the server must be restarted")
        with self._admission:
            jobs = list(self._unfinished.values())
        for job in jobs:
            job._abort(error)

    def _alive(self, unit: Unit) -> bool:
        job = unit[0]
        if job.cancel_requested:
            job._finish(JobStatus.CANCELLED, error=JobCancelled(f"job {job.id} was cancelled"))
        elif job.expired(time.time()):
            self._expire(job)
        return not job.done

    def _expire(self, job: Job) -> None:
        waited = time.time() - job.created_at
        if job.status == JobStatus.QUEUED:
            message = f"the request passed its deadline after {waited:.1f} s in the queue; it never ran"
        else:
            p = job.progress
            message = (
                f"the request passed its deadline after {waited:.1f} s; it was stopped at step "
                f"{p.sampling_step} of {p.sampling_steps}"
            )
        job._abort(DeadlineExceeded(message))

    def _expire_waiting(self, now: float) -> None:
        """Fail queued jobs past their deadline now, so their clients hear it without waiting for the device."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _EXPIRY_SWEEP_S
        with self._admission:
            expired = [job for job in self._waiting.values() if job.expired(now)]
        for job in expired:
            self._expire(job)

    def _receive(self, block: bool, timeout: float | None = None) -> Unit | None:
        """The next job from the hand-off queue as its first unit; None if nothing came (or we are stopping)."""
        try:
            item = self._queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return None
        if item is _STOP:
            self._stopping = True
            return None
        return (item, 0)

    def _take_unit(self) -> tuple[Unit | None, bool]:
        """The oldest live unit, and whether the device sat idle waiting for it (then it starts at once)."""
        while not self._stopping:
            if self._pending:
                unit, was_idle = self._pending.popleft(), False
            else:
                unit, was_idle = self._receive(block=False), False
                if unit is None and not self._stopping:
                    unit, was_idle = self._receive(block=True), True
                if unit is None:
                    continue
            if self._alive(unit):
                return unit, was_idle
        return None, False

    def _gather(self, first: Unit, was_idle: bool) -> list[Unit]:
        """`first` plus compatible units, up to the family's max_batch images. Waits up to max_wait_ms for more
        only when the device was busy (a lone request on an idle device starts at once)."""
        job0 = first[0]
        key = job0.batch_key
        limit = self.max_batch_for(self.registry.get(job0.request.model).family)
        batch, count = [first], job0.request.batch_size

        def take(unit: Unit) -> bool:
            nonlocal count
            job = unit[0]
            if job.batch_key != key or count + job.request.batch_size > limit or not self._alive(unit):
                return False
            batch.append(unit)
            count += job.request.batch_size
            return True

        self._pending = collections.deque(u for u in self._pending if not take(u) and not u[0].done)
        while (unit := self._receive(block=False)) is not None:
            if not take(unit):
                self._pending.append(unit)
        if was_idle or job0.batch_key[0] == "alone" or self.config.max_wait_ms <= 0:
            return batch
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while count < limit and (remaining := deadline - time.monotonic()) > 0 and not self._stopping:
            unit = self._receive(block=True, timeout=remaining)
            if unit is not None and not take(unit):
                self._pending.append(unit)
        return batch

    def _cancel_waiting(self, reason: str) -> None:
        while (unit := self._receive(block=False)) is not None or self._pending:
            unit = unit or self._pending.popleft()
            unit[0]._finish(JobStatus.CANCELLED, error=JobCancelled(reason))

    def _run_batch(self, batch: list[Unit]) -> None:
        started = [u for u in batch if u[1] > 0 or u[0]._start()]
        for job, it in started:
            if it == 0:
                self._mark_started(job)
                job.timings["queued_s"] = time.time() - job.created_at
        if not started:
            return
        self._current_batch = [job for job, _ in started]
        job0 = started[0][0]
        spec = self.registry.get(job0.request.model)
        adapter = adapter_for(spec.family)
        try:
            t0 = time.perf_counter()
            loaded = self.cache.get(spec)
            load_s = time.perf_counter() - t0
        except Exception as e:
            for job, _ in started:
                self._fail(job, e)
            return
        if job0.request.control_units:  # the call's requests share the units' models (pipelines.batching)
            try:
                controlnet.ensure_loaded(loaded, job0.request.control_units, self.config.demo_root,
                                         self.config.configs_dir)  # fmt: skip
                ip_adapter.ensure_loaded(loaded, ip_adapter_units(job0.request.control_units), self.config.demo_root)
                self.cache.enforce_budget(spec.id)
            except Exception as e:
                for job, _ in started:
                    self._fail(job, e)
                return
        ready: list[Unit] = []
        now = time.time()
        for job, it in started:
            if job.expired(now):  # it may have waited for a model load: it never reaches the device
                self._expire(job)
            if job.done:
                continue
            if it == 0:
                job.timings["load_s"] = load_s
                try:
                    t_prep = time.perf_counter()
                    job.prepared, job.finish_images = self._prepare_images(job.request, self.config.max_work_pixels)
                    job.timings["prepare_s"] = time.perf_counter() - t_prep
                except Exception as e:
                    self._fail(job, e)
                    continue
            job.skip_requested = False
            ready.append((job, it))
        if not ready:
            return

        t1 = time.perf_counter()
        try:
            outputs = self._call(adapter, loaded, spec, ready)
        except Exception as e:
            if is_device_fault(e):
                self._die(f"device fault: {type(e).__name__}: {e}")
                return
            for job, _ in ready:
                self._fail(job, e)
            return
        run_s = time.perf_counter() - t1
        follow_ups: list[Unit] = []
        for (job, it), images in zip(ready, outputs, strict=True):
            job.timings["run_s"] += run_s
            if isinstance(images, Exception):
                if isinstance(images, InsufficientMemory):
                    self._consecutive_ooms += 1
                self._fail(job, images)
                continue
            self._consecutive_ooms = 0
            if job.done:  # aborted during the call (deadline, shutdown): its images are dropped
                continue
            if job.cancel_requested:  # its images are dropped; the others in the batch keep theirs
                job._finish(JobStatus.CANCELLED, error=JobCancelled(f"job {job.id} was cancelled"))
                continue
            try:
                finished = job.finish_images(images)
                if job.request.transparent_background and self.background_remover is not None:
                    finished = self.background_remover.apply(finished)
                job.images.extend(finished)
            except Exception as e:
                self._fail(job, e)
                continue
            if job.interrupt_requested or it + 1 >= job.request.n_iter:
                job._finish(JobStatus.COMPLETED, result=self._result(job, spec, adapter))
            else:
                follow_ups.append((job, it + 1))
        # A job's next call goes ahead of newer work, so its n_iter calls run back to back.
        self._pending.extendleft(reversed(follow_ups))
        limit = self.config.max_consecutive_ooms
        if limit > 0 and self._consecutive_ooms >= limit:
            self._die(f"{self._consecutive_ooms} requests in a row ran out of device memory after it was freed")

    def _call(
        self, adapter: FamilyAdapter, loaded: LoadedModel, spec: ModelSpec, units: list[Unit]
    ) -> list[CallOutput]:
        """One pipeline call for `units`: each unit's images, or the error it failed with. A batch that runs out of
        memory is retried once, each request alone; a request that runs out of memory alone gets
        InsufficientMemory. Other errors of the first call (and device faults of a retry) raise."""
        try:
            return self._call_once(adapter, loaded, spec, units)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        # Past the `except` block, so the traceback's frames (and the tensors they hold) are released first.
        self._recover_memory(spec)
        if len(units) == 1:
            return [self._out_of_memory(units[0])]
        log.warning("out of memory with a batch of %d requests: retrying each alone", len(units))
        outputs: list[CallOutput] = []
        for unit in units:
            unit[0].degraded.append(f"batch of {len(units)} requests split after out-of-memory: ran alone")
            if unit[0].done:  # aborted meanwhile (deadline, shutdown)
                outputs.append([])
                continue
            oom = False
            try:
                outputs.extend(self._call_once(adapter, loaded, spec, [unit]))
            except Exception as e:
                if is_device_fault(e):
                    raise
                oom = is_out_of_memory(e)
                if not oom:  # fails this request only; the others keep what they made
                    outputs.append(e.with_traceback(None))
            if oom:
                self._recover_memory(spec)
                outputs.append(self._out_of_memory(unit))
        return outputs

    def _out_of_memory(self, unit: Unit) -> InsufficientMemory:
        req = unit[0].request
        with log_context.for_jobs([unit[0]]):
            log.warning(
                "job %s ran out of memory alone: %d image(s) at %dx%d", unit[0].id, req.batch_size, req.width,
                req.height,
            )  # fmt: skip
        return InsufficientMemory(
            f"out of GPU memory for this request ({req.batch_size} image(s) at {req.width}x{req.height}): "
            "try a smaller size or batch, or retry later"
        )

    def _recover_memory(self, spec: ModelSpec) -> None:
        """After an out-of-memory error: drop the other cached models and return freed memory to the device."""
        for model_id in self.cache.loaded_ids():
            if model_id != spec.id:
                self.cache.unload(model_id)
        free_device_memory()

    def _call_once(self, adapter: FamilyAdapter, loaded: LoadedModel, spec: ModelSpec, units: list[Unit]):
        """One pipeline call for `units`; returns each unit's images."""
        job0 = units[0][0]

        def make_scheduler() -> Any:
            return build_scheduler(
                job0.choice, loaded.base.scheduler.config, adapter.flow_matching, sdxl=spec.family == "sdxl"
            )

        # A1111: image i of a job uses seed + i and subseed + i.
        items = [
            BatchItem(job.prepared, seeds, [job.request.subseed + s - job.seed for s in seeds])
            for job, it in units
            for seeds in [job.seeds_for(it)]
        ]

        def on_step(step: int, total: int) -> bool:
            now = time.time()
            for job, it in units:
                job._set_progress(it, step, total)
                if job.expired(now) and not job.done:
                    self._expire(job)  # its client hears now; its images are dropped
            self._expire_waiting(now)
            # The call stops only when every request in it wants to stop; a cancelled one's images are dropped.
            return all(job.stop_requested for job, _ in units)

        n_images = sum(len(it.seeds) for it in items)
        width, height = job0.request.width, job0.request.height
        clock = StepClock(on_step)  # steps per second, for metrics
        reporter = self._reporter(loaded, spec, units, clock)
        prepare_call(loaded.base, spec, self.device, width, height, n_images)
        self.calls += 1
        compiled = any(step.startswith("compile") for step in loaded.optimizations)
        with torch.inference_mode(), watch_compiles(spec.id, compiled, width, height, n_images):
            if job0.request.hires is not None:  # hires jobs run alone (batching.batch_key)
                outputs = [adapter.run_hires(loaded, items[0].request, items[0].seeds, make_scheduler, clock)]
            elif (refiner_spec := self._refiner_spec(spec, job0.request)) is not None:  # alone too
                refiner = self.cache.get(refiner_spec)

                def refiner_scheduler() -> Any:
                    return build_scheduler(job0.choice, refiner.base.scheduler.config, adapter.flow_matching, sdxl=True)

                outputs = [adapter.run_refined(loaded, refiner, items[0], make_scheduler(), refiner_scheduler(), clock)]
            else:
                try:
                    outputs = adapter.run_batch(loaded, items, make_scheduler(), reporter)
                finally:
                    if reporter.previews is not None:
                        reporter.previews.flush()
        self.observers.emit(PipelineCall(spec.id, str(self.device), n_images, clock.steps, clock.steps_per_s()))
        return outputs

    @staticmethod
    def _reporter(loaded: LoadedModel, spec: ModelSpec, units: list[Unit], on_step: StepCallback) -> StepReporter:
        """The call's step callback, with live previews when a request of the call asks for them: each job gets
        the preview of its first image of the call."""
        every = [job.request.preview_every for job, _ in units]
        if not any(every):
            return StepReporter(on_step, None, lambda step, total: False)
        offsets, start = [], 0
        for job, it in units:
            offsets.append(start)
            start += len(job.seeds_for(it))

        def publish(step: int, images: list[Image.Image]) -> None:
            for (job, _), offset in zip(units, offsets, strict=True):
                if offset < len(images):
                    job._set_preview(step, images[offset])

        req = units[0][0].request
        maker = PreviewMaker(loaded.base, spec.family, req.width, req.height, publish)
        return StepReporter(on_step, maker, lambda step, total: any(wants_preview(step, total, e) for e in every))

    def _fail(self, job: Job, error: BaseException) -> None:
        if is_out_of_memory(error):
            free_device_memory()
            error = InsufficientMemory("out of GPU memory for this request: try a smaller size or batch")
        elif isinstance(error, EngineError):
            pass
        else:
            with log_context.for_jobs([job]):
                log.error("job %s failed: %s: %s", job.id, type(error).__name__, error, exc_info=error)
            error = GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
        status = JobStatus.CANCELLED if isinstance(error, JobCancelled) else JobStatus.FAILED
        job._finish(status, error=error)

    def _result(self, job: Job, spec: ModelSpec, adapter: FamilyAdapter) -> GenerationResult:
        req = job.request
        if not job.interrupt_requested:
            job._set_progress(req.n_iter, req.steps, req.steps)
        images = job.images
        return GenerationResult(
            images=images,
            seeds=[job.seed + i for i in range(len(images))],
            model=spec.id,
            model_hash=spec.short_hash,
            sampler=job.choice.name,
            schedule=scheduler_label_for_info(job.choice, adapter.flow_matching),
            width=images[0].width if images else req.width,  # "only masked" inpainting returns the init's size
            height=images[0].height if images else req.height,
            steps=req.steps,
            interrupted=job.interrupt_requested,
            timings=dict(job.timings),
            extra={"degraded": list(job.degraded)} if job.degraded else {},
        )

    @staticmethod
    def _prepare_images(req: GenerationRequest, max_pixels: int | None = None):
        """Resize inputs to the target size; for inpainting, crop/blur the mask and composite the result back."""
        if req.task == Task.INPAINT:
            prepared = prepare_inpaint(
                req.init_images[0], req.mask, req.width, req.height, req.inpaint, req.resize_mode, max_pixels
            )
            units = req.control_units
            if units and prepared.crop_region is not None and prepared.canvas is not None:  # "only masked"
                region, canvas = prepared.crop_region, prepared.canvas.size
                units = [
                    u
                    if u.is_ip_adapter
                    else dataclasses.replace(
                        u, image=crop_like_only_masked(u.image, canvas, region, req.width, req.height)
                    )
                    for u in units
                ]
            req = dataclasses.replace(req, init_images=[prepared.image], mask=prepared.mask, control_units=units)
            return req, prepared.finish
        if req.task in (Task.IMG2IMG, Task.EDIT):
            images = [resize_image(flatten(im), req.width, req.height, req.resize_mode) for im in req.init_images]
            req = dataclasses.replace(req, init_images=images)
        return req, lambda out: out
