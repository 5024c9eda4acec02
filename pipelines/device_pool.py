"""DevicePool: several devices in one process, one `Engine` (worker thread, pipeline cache, batcher) per device,
behind the same `EngineClient` interface as a single engine.

Routing: a request goes to a device that already holds its model (loaded, or about to be: a job for it is queued
there) when that device is among the least loaded, otherwise to the least loaded device, which then loads the
model. Load is the number of unfinished jobs (queued + running) the pool sent there. Loading a model costs far
more than one denoising step, so `affinity_slack` lets a holder win while it has up to that many more jobs than the
least loaded device (0: only when it is as free as any other). Batching happens per device, as in a single engine.

A1111 semantics over several devices: `current_job()` is the oldest running job (what /progress shows), and
`interrupt()` / `skip()` act on every running job, as a single engine acts on every job of its running batch.

Liveness: the pool is `alive` only while every device is (a dead device needs a process restart, like a single
engine), but until the restart it keeps routing to the healthy devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

from pipelines.engine import DrainReport, Engine, EngineConfig, Job
from pipelines.errors import EngineDead, EngineError, EngineNotReady, ModelNotFound, QueueFull
from pipelines.registry import Registry
from pipelines.request import GenerationRequest
from pipelines.telemetry import EngineSnapshot, Observer

log = logging.getLogger("easel.devices")


def resolve_devices(devices: Sequence[str] | str | None, default: str = "auto") -> list[str]:
    """The device names to run one engine on each. `None`: one engine on `default` (the `device` setting).
    `"auto"`: every visible CUDA device, or one CPU engine without CUDA. A comma-separated string is a list."""
    import torch

    if devices is None:
        return [default]
    if isinstance(devices, str):
        if devices.strip() == "auto":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [f"cuda:{i}" for i in range(count)] or ["cpu"]
        devices = [d for d in devices.split(",")]
    names = [d.strip() for d in devices if d.strip()]
    if not names:
        raise ValueError("devices: give at least one device (e.g. cuda:0), or 'auto'")
    for name in names:
        torch.device(name)  # raises on a malformed name ("cuda:x", "gpu")
    return names


def build_engine(
    registry: Registry,
    config: EngineConfig,
    devices: Sequence[str] | str | None = None,
    *,
    affinity_slack: int = 0,
) -> Engine | DevicePool:
    """The engine for `devices`: a plain `Engine` for one device (`config.device` when `devices` is None), else a
    `DevicePool` with one engine per device (each a copy of `config` with its own device). Not started."""
    names = resolve_devices(devices, config.device)
    if len(names) == 1:
        return Engine(registry, dataclasses.replace(config, device=names[0]))
    engines = [Engine(registry, dataclasses.replace(config, device=name)) for name in names]
    return DevicePool(engines, affinity_slack=affinity_slack)


def _started_at(job: Job) -> float:
    return job.progress.started_at or job.created_at


class DevicePool:
    """Implements `pipelines.engine_api.EngineClient` over one `Engine` per device."""

    def __init__(self, engines: Sequence[Engine], *, affinity_slack: int = 0):
        if not engines:
            raise ValueError("a device pool needs at least one engine")
        self.engines = list(engines)
        self.registry = self.engines[0].registry
        self.affinity_slack = max(0, affinity_slack)
        self._lock = threading.Lock()
        # Per engine: the unfinished jobs the pool sent there, job id -> model id (its load, and what it will hold).
        self._assigned: list[dict[str, str]] = [{} for _ in self.engines]

    # Lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every engine; their default-model preloads run in parallel (one load per device)."""
        errors: list[BaseException] = []

        def start(engine: Engine) -> None:
            try:
                engine.start()
            except BaseException as e:  # re-raised below, once every device has tried
                errors.append(e)

        threads = [threading.Thread(target=start, args=(e,), name=f"easel-start-{e.device}") for e in self.engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def stop(self, timeout: float = 10.0) -> None:
        for engine in self.engines:
            engine.stop(timeout)

    def drain(self, timeout_s: float, cancel_grace_s: float = 10.0) -> DrainReport:
        """Drain every device at once (each with the same deadline); one report for all."""
        reports: list[DrainReport | None] = [None] * len(self.engines)

        def drain(i: int) -> None:
            reports[i] = self.engines[i].drain(timeout_s, cancel_grace_s)

        threads = [threading.Thread(target=drain, args=(i,), name="easel-drain-device") for i in range(len(reports))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = [r for r in reports if r is not None]
        return DrainReport(
            finished=all(r.finished for r in done),
            cancelled=sum(r.cancelled for r in done),
            waited_s=max((r.waited_s for r in done), default=0.0),
        )

    # Health and admission ----------------------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        return [str(e.device) for e in self.engines]

    @property
    def device(self) -> str:
        """For logs: the devices, comma-separated."""
        return ",".join(self.devices)

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def alive(self) -> bool:
        return all(getattr(e, "alive", True) for e in self.engines)

    @property
    def failure(self) -> str | None:
        reasons = [f"{e.device}: {f}" for e in self.engines if (f := getattr(e, "failure", None))]
        return "; ".join(reasons) or None

    @property
    def draining(self) -> bool:
        return any(getattr(e, "draining", False) for e in self.engines)

    @property
    def free_slots(self) -> int:
        return sum(e.free_slots for e in self.engines if self._admits(e))

    def admission_error(self) -> EngineError | None:
        """None while any device would admit; else the most useful refusal (a full queue is worth a retry)."""
        errors = [self._admission_error(e) for e in self.engines]
        if any(err is None for err in errors):
            return None
        for kind in (QueueFull, EngineDead, EngineNotReady):
            for err in errors:
                if isinstance(err, kind):
                    return err
        return errors[0]

    @staticmethod
    def _admission_error(engine: Engine) -> EngineError | None:
        check = getattr(engine, "admission_error", None)
        if check is not None:
            return check()
        if not engine.ready:
            return EngineNotReady("the engine is not running")
        return QueueFull() if getattr(engine, "free_slots", 1) <= 0 else None

    def _admits(self, engine: Engine) -> bool:
        return self._admission_error(engine) is None

    # Routing -----------------------------------------------------------------------------------------------------

    def route(self, model_id: str) -> list[int]:
        """Engine indices in the order submit tries them for `model_id` (see the module docstring)."""
        with self._lock:
            loads = [len(a) for a in self._assigned]
            pending = [set(a.values()) for a in self._assigned]
        holds = [model_id in e.loaded_models() or model_id in p for e, p in zip(self.engines, pending, strict=True)]
        candidates = [i for i, e in enumerate(self.engines) if self._admits(e)]
        if not candidates:
            return []
        least = min(loads[i] for i in candidates)
        holders = [i for i in candidates if holds[i] and loads[i] <= least + self.affinity_slack]

        def order(i: int) -> tuple[int, int, int]:
            # Less loaded first; on a tie, the holder, then the device with fewer models (room in its cache).
            return (loads[i], 0 if holds[i] else 1, len(self.engines[i].loaded_models()))

        first = sorted(holders, key=order)[:1]
        return first + sorted((i for i in candidates if i not in first), key=order)

    def submit(self, request: GenerationRequest) -> Job:
        spec = self.registry.resolve(request.model)
        if spec is None:
            raise ModelNotFound(request.model)
        order = self.route(spec.id)
        if not order:
            raise self.admission_error() or EngineNotReady("no device takes work")
        last: EngineError | None = None
        for i in order:
            engine = self.engines[i]
            try:
                job = engine.submit(request)
            except (QueueFull, EngineNotReady) as e:  # filled up or failed since routing looked: try the next one
                last = e
                continue
            self._assign(i, job)
            log.debug("job %s (%s) -> %s", job.id, spec.id, engine.device)
            return job
        assert last is not None
        raise last

    def _assign(self, index: int, job: Job) -> None:
        with self._lock:
            self._assigned[index][job.id] = job.request.model

        def forget(done: Job) -> None:
            with self._lock:
                self._assigned[index].pop(done.id, None)

        job.add_done_callback(forget)

    def engine_of(self, job_id: str) -> Engine | None:
        """The engine a job was sent to, while it is unfinished (tests, logs)."""
        with self._lock:
            for engine, assigned in zip(self.engines, self._assigned, strict=True):
                if job_id in assigned:
                    return engine
        return None

    # Running jobs ------------------------------------------------------------------------------------------------

    def running_jobs(self) -> list[Job]:
        jobs = [job for e in self.engines for job in _running(e)]
        return sorted(jobs, key=_started_at)

    def current_job(self) -> Job | None:
        """The oldest running job (A1111 /progress shows one job)."""
        jobs = self.running_jobs()
        return jobs[0] if jobs else None

    def queued_count(self) -> int:
        return sum(e.queued_count() for e in self.engines)

    def queued_owners(self) -> list[str | None]:
        return [owner for e in self.engines for owner in e.queued_owners()]

    def interrupt(self) -> None:
        for engine in self.engines:
            engine.interrupt()

    def skip(self) -> None:
        for engine in self.engines:
            engine.skip()

    # Models ------------------------------------------------------------------------------------------------------

    async def load_model(self, model_id: str) -> None:
        """Load a model on one device, unless one already holds it (the device routing would pick for it)."""
        spec = self.registry.resolve(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        if any(spec.id in e.loaded_models() for e in self.engines):
            return
        order = self.route(spec.id) or list(range(len(self.engines)))
        await self.engines[order[0]].load_model(spec.id)

    async def load_model_everywhere(self, model_id: str) -> None:
        """Load a model on every device (warm-up before traffic)."""
        await asyncio.gather(*(e.load_model(model_id) for e in self.engines))

    def unload_models(self) -> None:
        for engine in self.engines:
            engine.unload_models()

    def loaded_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for engine in self.engines:
            seen.update(dict.fromkeys(engine.loaded_models()))
        return list(seen)

    def loaded_by_device(self) -> dict[str, list[str]]:
        return {str(e.device): e.loaded_models() for e in self.engines}

    def memory_stats(self) -> dict[str, Any]:
        """A1111 /memory shape for the first device, plus `devices`: each device's `cuda` block by name."""
        stats = [e.memory_stats() for e in self.engines]
        first = dict(stats[0])
        first["devices"] = {str(e.device): s.get("cuda") for e, s in zip(self.engines, stats, strict=True)}
        return first

    @property
    def calls(self) -> int:
        return sum(e.calls for e in self.engines)

    def add_observer(self, fn: Observer) -> None:
        for engine in self.engines:
            engine.add_observer(fn)

    def remove_observer(self, fn: Observer) -> None:
        for engine in self.engines:
            engine.remove_observer(fn)

    def metrics_snapshot(self) -> list[EngineSnapshot]:
        """One snapshot per device."""
        return [snap for engine in self.engines for snap in engine.metrics_snapshot()]


def _running(engine: Engine) -> list[Job]:
    running = getattr(engine, "running_jobs", None)
    if running is not None:
        return list(running())
    job = engine.current_job()
    return [job] if job is not None else []
