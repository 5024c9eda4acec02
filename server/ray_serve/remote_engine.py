"""RemoteEngine: the `EngineClient` an ingress replica hands to `create_app`, running every job on a GPU worker
replica of the Ray Serve application (server.ray_serve.worker) instead of in this process.

Each job is one streaming call, `worker.options(stream=True, multiplexed_model_id=<model id>).run.remote(request)`:
Serve routes it to a replica that has the model loaded (or, when none has, to the replica with the fewest models),
and the stream stays with that replica for the job's life. A thread per job reads the stream (accepted / progress /
finished, see protocol.py) into a `RemoteJob`, which is a `JobHandle` like the local engine's jobs: status,
progress, wait, cancel and done-callbacks (called on that thread) all work, so JobService and the dialects need no
change. Cancel, A1111 interrupt and skip go to the replica's control actor named in the `accepted` message.

What this process knows is its own jobs: `/sdapi/v1/progress` and `/interrupt` see the jobs submitted through this
ingress replica; the job store (shared database) is what every replica answers task status from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

import psutil

from pipelines.engine_api import JobStatus
from pipelines.errors import (
    EngineError,
    EngineNotReady,
    GenerationFailed,
    JobCancelled,
    ModelNotFound,
    QueueFull,
    ShutdownCancelled,
)
from pipelines.job_state import CompletableJob
from pipelines.registry import Registry
from pipelines.request import GenerationRequest
from server.ray_serve import protocol

log = logging.getLogger("easel.ray")

SHUTDOWN_REASON = "the ingress replica shut down before the job finished"
STOP_GRACE_S = 5.0  # after posting cancels at stop(): how long running jobs get to confirm before being dropped


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class RemoteJob(CompletableJob):
    """A job running on a worker replica, seen from the ingress. Thread-safe; awaited from any event loop."""

    def __init__(self, engine: RemoteEngine, request: GenerationRequest):
        super().__init__(request)  # a local id; the worker's own id arrives with `accepted`
        self.worker_job_id: str | None = None
        self.replica: str | None = None  # the Serve replica running it (tests, logs)
        self.seed: int | None = None
        self._engine = engine
        self._control: Any = None  # the replica's JobControl actor handle
        self._pending_actions: list[str] = []  # posted before `accepted` arrived
        self._stream: Any = None
        self._refusal: EngineError | None = None
        self._answered = threading.Event()  # accepted, refused, or failed before either

    # JobHandle ---------------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Queued: dropped before it runs; running: stopped at the next step (the worker confirms with JobCancelled)."""
        self.cancel_requested = True
        self._post(protocol.CANCEL)

    # Control -----------------------------------------------------------------------------------------------------

    def _post(self, action: str) -> None:
        """Send a control action to the replica running the job (or keep it until the job is accepted)."""
        with self._lock:
            if self._done.is_set():
                return
            control, job_id = self._control, self.worker_job_id
            if control is None:
                self._pending_actions.append(action)
                return
        try:
            control.post.remote(job_id, action)  # fire and forget: the stream reports what it did
        except Exception as e:  # the replica is gone: its stream fails too, and ends the job
            log.warning("job %s: could not send %s to its replica: %s", self.id, action, e)

    # Stream side (the job's reader thread) ------------------------------------------------------------------------

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == protocol.ACCEPTED:
            with self._lock:
                self.worker_job_id = str(message["job_id"])
                self.replica = str(message["replica"])
                self.seed = message.get("seed")
                self._control = message.get("control")
                pending, self._pending_actions = self._pending_actions, []
            self._engine._note_models(self.replica, list(message.get("loaded") or []))
            self._answered.set()
            for action in pending:
                self._post(action)
        elif kind == protocol.REFUSED:
            self._refuse(protocol.decode_error(message["error"]))
        elif kind == protocol.PROGRESS:
            self._status = JobStatus(message["status"])
            self._progress = protocol.progress_of(message)
        elif kind == protocol.FINISHED:
            status = JobStatus(message["status"])
            error = message.get("error")
            if status == JobStatus.COMPLETED and error is None:
                self._finish(JobStatus.COMPLETED, result=message["result"])
            else:
                self._finish(status, error=protocol.decode_error(error or {"type": "GenerationFailed"}))

    def _refuse(self, error: EngineError) -> None:
        """The job never ran: submit raises `error` (or, if submit already returned, the job fails with it)."""
        self._refusal = error
        self._finish(JobStatus.FAILED, error=error)

    def _fail(self, error: EngineError) -> None:
        if not self._answered.is_set():
            self._refuse(error)
        else:
            self._finish(JobStatus.CANCELLED if isinstance(error, JobCancelled) else JobStatus.FAILED, error=error)

    def _before_finish(self, status: JobStatus) -> None:
        if status == JobStatus.COMPLETED and not self.interrupt_requested:
            p = self._progress
            p.job_no, p.sampling_step = p.job_count, p.sampling_steps

    def _after_finish(self) -> None:
        self._answered.set()


class RemoteEngine:
    """Implements `pipelines.engine_api.EngineClient` over a `DeploymentHandle` to the worker deployment."""

    def __init__(
        self,
        worker: Any,
        registry: Registry,
        *,
        max_in_flight: int = 256,
        accept_timeout_s: float = 60.0,
    ):
        self.worker = worker
        self.registry = registry
        self.max_in_flight = max_in_flight
        self.accept_timeout_s = accept_timeout_s
        self._lock = threading.Lock()
        self._live: dict[str, RemoteJob] = {}
        self._models: dict[str, list[str]] = {}  # replica -> the models it last reported
        self._closed = False
        self._draining = False

    # Health and admission ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start here: the worker replicas run the engines."""

    @property
    def device(self) -> str:
        return "ray-serve-workers"

    @property
    def ready(self) -> bool:
        return not self._closed and not self._draining

    @property
    def alive(self) -> bool:
        return True  # worker replicas that die are restarted by Serve (their health check fails)

    @property
    def failure(self) -> str | None:
        return None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def free_slots(self) -> int:
        return max(0, self.max_in_flight - len(self._live))

    def admission_error(self) -> EngineError | None:
        if self._closed or self._draining:
            return EngineNotReady("the server is shutting down: not accepting new work")
        if self.free_slots == 0:
            return QueueFull()
        return None

    # Submitting --------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RemoteJob:
        """Send the job to a worker replica. From a thread (JobService), wait until the worker admits it, so its
        refusals (invalid, queue full) raise here and nothing is recorded; from an event loop, return at once (a
        refusal then ends the job with that error, which `wait` raises)."""
        refusal = self.admission_error()
        if refusal is not None:
            raise refusal
        spec = self.registry.resolve(request.model)
        if spec is None:
            raise ModelNotFound(request.model)
        if request.model != spec.id:  # the model id is the routing key: aliases must not split a model's replicas
            request = dataclasses.replace(request, model=spec.id)
        job = RemoteJob(self, request)
        with self._lock:
            if len(self._live) >= self.max_in_flight:
                raise QueueFull()
            self._live[job.id] = job
        job.add_done_callback(self._forget)
        threading.Thread(target=self._read_stream, args=(job,), name=f"easel-ray-job-{job.id[:8]}", daemon=True).start()
        if _on_event_loop():
            return job
        if not job._answered.wait(self.accept_timeout_s):
            job.cancel()
            raise EngineNotReady(f"no GPU worker acknowledged the job within {self.accept_timeout_s:g} s; retry later")
        if job._refusal is not None:
            raise job._refusal
        return job

    def _read_stream(self, job: RemoteJob) -> None:
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        try:
            handle = self.worker.options(stream=True, multiplexed_model_id=job.request.model)
            stream = handle.run.remote(job.request)
            job._stream = stream
            for message in stream:
                job._on_message(message)
                if job.done:
                    break
        except BackPressureError:
            job._fail(QueueFull())
        except RequestCancelledError:
            job._fail(ShutdownCancelled(f"job {job.id} was cancelled: {SHUTDOWN_REASON}"))
        except Exception as e:
            log.warning("job %s: the worker stream failed: %s: %s", job.id, type(e).__name__, e)
            if job._answered.is_set():
                job._fail(GenerationFailed(f"the GPU worker running the job stopped ({type(e).__name__}); retry"))
            else:
                job._fail(EngineNotReady(f"no GPU worker could take the job ({type(e).__name__}); retry later"))
        finally:
            if not job.done:
                job._fail(GenerationFailed("the GPU worker's answer ended without a result"))

    def _forget(self, job: RemoteJob) -> None:
        with self._lock:
            self._live.pop(job.id, None)

    def _note_models(self, replica: str, models: list[str]) -> None:
        with self._lock:
            self._models[replica] = models

    # Running jobs (this ingress replica's) ---------------------------------------------------------------------

    def live_jobs(self) -> list[RemoteJob]:
        with self._lock:
            return list(self._live.values())

    def running_jobs(self) -> list[RemoteJob]:
        running = [j for j in self.live_jobs() if j.status == JobStatus.RUNNING]
        return sorted(running, key=lambda j: j.progress.started_at or j.created_at)

    def current_job(self) -> RemoteJob | None:
        running = self.running_jobs()
        return running[0] if running else None

    def queued_count(self) -> int:
        return sum(1 for j in self.live_jobs() if j.status == JobStatus.QUEUED)

    def queued_owners(self) -> list[str | None]:
        return [j.request.tags.get("owner") for j in self.live_jobs() if j.status == JobStatus.QUEUED]

    def interrupt(self) -> None:
        for job in self.running_jobs():
            job.interrupt_requested = True
            job._post(protocol.INTERRUPT)

    def skip(self) -> None:
        for job in self.running_jobs():
            job.skip_requested = True
            job._post(protocol.SKIP)

    # Models ------------------------------------------------------------------------------------------------------

    async def load_model(self, model_id: str) -> None:
        """Load a model on a worker replica (the one Serve routes the model to), as A1111's checkpoint switch does."""
        spec = self.registry.resolve(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        answer = await self.worker.options(multiplexed_model_id=spec.id).load.remote()
        if answer.get("error") is not None:
            raise protocol.decode_error(answer["error"])
        self._note_models(str(answer["replica"]), list(answer["loaded"]))

    def unload_models(self) -> None:
        """Not on Ray: Serve's model multiplexing decides what each replica holds (unloading behind its back would
        leave it routing requests to replicas that no longer have the model). Replicas evict least recently used
        models by themselves."""
        log.info("unload_models: ignored on Ray Serve; worker replicas evict least recently used models themselves")

    def loaded_models(self) -> list[str]:
        """The models the worker replicas reported holding (with their last answers to this ingress)."""
        with self._lock:
            seen: dict[str, None] = {}
            for models in self._models.values():
                seen.update(dict.fromkeys(models))
        return list(seen)

    def memory_stats(self) -> dict[str, Any]:
        """One worker replica's /memory answer (blocking: call from a thread); this host's RAM if none answers."""
        try:
            return dict(self.worker.memory_stats.remote().result(timeout_s=10))
        except Exception as e:
            vm = psutil.virtual_memory()
            ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
            return {"ram": ram, "cuda": {"error": f"no worker replica answered ({type(e).__name__})"}}

    # Shutdown ----------------------------------------------------------------------------------------------------

    def drain(self, timeout_s: float, cancel_grace_s: float = 10.0) -> None:
        """Stop admitting, let this replica's jobs finish for up to `timeout_s`, then cancel the rest."""
        self._draining = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.live_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._cancel_all(cancel_grace_s)

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        self._closed = True
        self._cancel_all(timeout)

    def _cancel_all(self, grace_s: float) -> None:
        jobs = self.live_jobs()
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + grace_s
        while any(not j.done for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for job in jobs:  # the worker did not confirm in time: stop reading, and end the job here
            if not job.done:
                if job._stream is not None:
                    job._stream.cancel()
                job._fail(ShutdownCancelled(f"job {job.id} was cancelled: {SHUTDOWN_REASON}"))
