"""The GPU worker deployment: each replica holds one engine (`Engine`, or a `DevicePool` when a replica has several
GPUs and `devices` is set) with its pipeline cache, and runs the jobs the ingress replicas stream to it.

Model-aware routing is Ray Serve's model multiplexing: the ingress sets `multiplexed_model_id` to the request's
model id, and Serve prefers replicas that have called the `@serve.multiplexed` loader for that id (loaded or
loading). The loader here loads into the engine's own cache (shared with the engine's worker thread, so a model is
loaded once), and unloads from it when Serve evicts the model (least recently used beyond
`max_num_models_per_replica`).

This is the composition root of the GPU side in a Ray cluster, like `server.app._start_real_engine` in one
process: torch is imported here, when a replica starts, never by the HTTP side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from pipelines.engine_api import JobStatus
from pipelines.errors import EngineError, GenerationFailed
from pipelines.registry import load_registry
from pipelines.request import GenerationRequest
from server.engine_factory import engine_config
from server.ray_serve import protocol
from server.settings import Settings

log = logging.getLogger("easel.ray.worker")

PROGRESS_INTERVAL_S = 0.2  # how often a running job's progress goes back to the ingress (when it changed)
FORGOTTEN_JOBS_KEPT = 10_000  # control: ids of finished jobs remembered, so late waiters return at once


@ray.remote(num_cpus=0)
class JobControl:
    """One per worker replica: cancel / interrupt / skip for its jobs, posted by any ingress replica and awaited by
    the worker replica (an awaited actor call per running job, no polling)."""

    def __init__(self) -> None:
        self._actions: dict[str, collections.deque[str]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._forgotten: collections.deque[str] = collections.deque(maxlen=FORGOTTEN_JOBS_KEPT)

    def _event(self, job_id: str) -> asyncio.Event:
        return self._events.setdefault(job_id, asyncio.Event())

    async def post(self, job_id: str, action: str) -> bool:
        if action not in protocol.ACTIONS or job_id in self._forgotten:
            return False
        self._actions.setdefault(job_id, collections.deque()).append(action)
        self._event(job_id).set()
        return True

    async def next_action(self, job_id: str) -> str | None:
        """The next action posted for the job; None once the job is forgotten (finished)."""
        while True:
            if job_id in self._forgotten:
                return None
            queued = self._actions.get(job_id)
            if queued:
                return queued.popleft()
            event = self._event(job_id)
            event.clear()
            await event.wait()

    async def forget(self, job_id: str) -> None:
        self._forgotten.append(job_id)
        self._actions.pop(job_id, None)
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()


class _ModelLease:
    """What the multiplexed loader returns: Serve calls `__del__` when it evicts the model from this replica."""

    def __init__(self, engine: Any, model_id: str):
        self.engine = engine
        self.model_id = model_id
        self.released = False

    def __del__(self) -> None:
        if self.released:
            return
        self.released = True
        for engine in getattr(self.engine, "engines", [self.engine]):
            with contextlib.suppress(Exception):
                engine.cache.unload(self.model_id)


def _apply(job: Any, action: str) -> None:
    if action == protocol.CANCEL:
        job.cancel()
    elif action == protocol.INTERRUPT:
        job.interrupt_requested = True
    elif action == protocol.SKIP:
        job.skip_requested = True


@serve.deployment
class EaselWorker:
    def __init__(self, settings_overrides: dict[str, Any]):
        from pipelines.device_pool import build_engine

        settings = Settings(**settings_overrides)
        registry = load_registry(settings.models)
        max_models = settings.ray_max_models_per_replica or settings.cache_max_models
        # Nothing is preloaded: what a replica holds is what Serve routed to it (and so knows about).
        config = engine_config(settings, preload_default=False, cache_max_models=max_models)
        self.engine = build_engine(registry, config, settings.devices, affinity_slack=settings.device_affinity_slack)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.control = JobControl.remote()

        async def load(model_id: str) -> _ModelLease:
            await self.engine.load_model(model_id)
            return _ModelLease(self.engine, model_id)

        # Built per replica: the per-replica model limit comes from the settings.
        self._lease = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        log.info("worker replica %s ready on %s", self.replica, self.engine.device)

    async def run(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """One job, streamed: accepted | refused, progress..., finished (protocol.py)."""
        model_id = serve.get_multiplexed_model_id() or request.model
        try:
            job = self.engine.submit(request)
        except EngineError as e:
            yield protocol.refused(e, self.replica)
            return
        except Exception as e:  # a bug, not a refusal: say so without a traceback on the wire
            log.exception("submit failed")
            failure = GenerationFailed(f"the worker could not take the job: {type(e).__name__}")
            yield protocol.refused(failure, self.replica)
            return

        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
        # Registers the model with Serve's routing at once; the load itself is shared with the engine's worker.
        lease = asyncio.create_task(self._lease(model_id))
        lease.add_done_callback(_log_lease_failure)
        watcher = asyncio.create_task(self._watch_control(job))
        try:
            yield protocol.accepted(job.id, self.replica, self.control, job.seed, self.engine.loaded_models())
            last: tuple[Any, ...] | None = None
            while not done.is_set():
                status, p = job.status, job.progress
                key = (status, p.job_no, p.sampling_step)
                if key != last:
                    last = key
                    yield protocol.progress(status, p)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), PROGRESS_INTERVAL_S)
            try:
                result, error = await job.wait(), None  # done: returns at once
            except Exception as e:
                result, error = None, e
            if result is not None:
                result.extra = {**result.extra, "replica": self.replica}
            yield protocol.finished(job.status if error is None else _ended(job.status), result, error)
        finally:
            watcher.cancel()
            if not job.done:  # the caller went away (stream cancelled): nobody wants the images
                job.cancel()
            self.control.forget.remote(job.id)

    async def _watch_control(self, job: Any) -> None:
        try:
            while True:
                action = await self.control.next_action.remote(job.id)
                if action is None:
                    return
                _apply(job, action)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the control actor is gone: cancel/interrupt no longer reach this job
            log.warning("job %s: control channel lost: %s", job.id, e)

    async def load(self) -> dict[str, Any]:
        """Load the request's multiplexed model here (A1111's checkpoint switch); the models this replica holds."""
        try:
            await self._lease(serve.get_multiplexed_model_id())
        except EngineError as e:
            return {"error": protocol.encode_error(e), "replica": self.replica, "loaded": self.engine.loaded_models()}
        return {"error": None, "replica": self.replica, "loaded": self.engine.loaded_models()}

    def info(self) -> dict[str, Any]:
        """Which replica this is and what it holds (operations, tests)."""
        return {
            "replica": self.replica,
            "device": str(self.engine.device),
            "loaded": self.engine.loaded_models(),
            "queued": self.engine.queued_count(),
            "running": len(self.engine.running_jobs()),
            "calls": self.engine.calls,
        }

    def memory_stats(self) -> dict[str, Any]:
        return {**self.engine.memory_stats(), "replica": self.replica}

    def check_health(self) -> None:
        """Serve restarts a replica whose engine died (device fault, repeated out-of-memory)."""
        if not getattr(self.engine, "alive", True):
            raise RuntimeError(f"engine dead: {getattr(self.engine, 'failure', None)}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def _ended(status: JobStatus) -> JobStatus:
    return status if status in (JobStatus.FAILED, JobStatus.CANCELLED) else JobStatus.FAILED


def _log_lease_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The job fails with the same load error from the engine; this only keeps the task's error retrieved.
        log.warning("loading %s for routing failed: %s", "the model", task.exception())
