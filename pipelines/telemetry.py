"""What the engine tells a metrics exporter, as plain numbers: events pushed to observers as they happen (a job
ended, a pipeline call ran) and a snapshot of its state read at scrape time (queue, caches, device memory).

Torch-free, so the HTTP side (`server.metrics`) can turn these into Prometheus series without importing torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("easel.engine")


@dataclass(frozen=True)
class JobEnded:
    """A job reached its final state. `running_s` is None for a job that never started (cancelled, expired or
    refused while queued)."""

    model: str
    kind: str  # the task: txt2img, img2img, inpaint, edit
    status: str  # completed, failed, cancelled
    queued_s: float
    running_s: float | None
    total_s: float


@dataclass(frozen=True)
class PipelineCall:
    """One pipeline call (a batch): how many images it made and how fast it denoised. `steps_per_s` counts from the
    call's start to its last step (text encoding included, VAE decode not); None when no step ran."""

    model: str
    device: str
    images: int
    steps: int
    steps_per_s: float | None


class StepClock:
    """Wraps a step callback (`(step, total) -> stop?`): counts the steps of one pipeline call and times them."""

    def __init__(self, on_step: Callable[[int, int], bool]):
        self.on_step = on_step
        self.started = time.perf_counter()
        self.steps = 0
        self.last: float | None = None

    def __call__(self, step: int, total: int) -> bool:
        self.steps += 1
        self.last = time.perf_counter()
        return self.on_step(step, total)

    def steps_per_s(self) -> float | None:
        if self.last is None or self.last <= self.started:
            return None
        return self.steps / (self.last - self.started)


Event = JobEnded | PipelineCall
Observer = Callable[[Event], None]


class Observers:
    """A list of callbacks that never take the caller down: the engine worker emits, exporters listen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._observers: list[Observer] = []

    def add(self, fn: Observer) -> None:
        with self._lock:
            self._observers.append(fn)

    def remove(self, fn: Observer) -> None:
        with self._lock:
            if fn in self._observers:
                self._observers.remove(fn)

    def emit(self, event: Event) -> None:
        with self._lock:
            observers = list(self._observers)
        for fn in observers:
            try:
                fn(event)
            except Exception:  # a broken exporter must not fail a job
                log.exception("metrics observer failed on %s", type(event).__name__)


@dataclass(frozen=True)
class CacheCounts:
    """Hits and misses of one cache, since the process started (monotonic)."""

    hits: int = 0
    misses: int = 0


@dataclass(frozen=True)
class DeviceMemory:
    """torch.cuda's allocator figures for one device, in bytes; peaks since the process started."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int
    total: int | None = None


@dataclass(frozen=True)
class EngineSnapshot:
    """One device's engine, read at scrape time."""

    device: str
    queued: int
    running: int
    free_slots: int
    loaded_models: list[str]
    model_loads: dict[str, int] = field(default_factory=dict)  # real loads (not cache hits) per model
    model_load_seconds: dict[str, float] = field(default_factory=dict)  # their total time per model
    model_evictions: dict[str, int] = field(default_factory=dict)  # LRU evictions and unloads per model
    pipeline_cache: CacheCounts = CacheCounts()
    text_cache: dict[str, CacheCounts] = field(default_factory=dict)  # per model, across its loads
    memory: DeviceMemory | None = None  # None off CUDA
    model_memory: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> where ("cuda:0", "cpu") -> bytes
