"""The engine as the HTTP side sees it: submit, wait, progress, interrupt. No torch import.

`pipelines.engine.Engine` implements `EngineClient`; unit tests of the HTTP layer may use a fake that does too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from pipelines.errors import EngineError
from pipelines.request import GenerationRequest, GenerationResult, Progress


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobHandle(Protocol):
    id: str
    request: GenerationRequest

    @property
    def status(self) -> JobStatus: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def error(self) -> BaseException | None: ...

    async def wait(self, timeout: float | None = None) -> GenerationResult:
        """The result; raises the job's error (an EngineError), or TimeoutError (the job keeps running)."""
        ...

    def cancel(self) -> None:
        """Drop the job if queued; stop it at the next step if running (its result then raises JobCancelled)."""
        ...

    def add_done_callback(self, fn: Callable[[JobHandle], None]) -> None:
        """Call `fn(job)` once the job is completed, failed or cancelled (at once if it already is).

        It runs on the engine's worker thread: keep it short, hand slow work (disk, database) to another thread.
        """
        ...


class EngineClient(Protocol):
    @property
    def ready(self) -> bool:
        """Takes new work (readiness): started, not draining, not dead."""
        ...

    @property
    def alive(self) -> bool:
        """False once the engine is dead (device fault, repeated out-of-memory): only a restart helps (liveness)."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the engine is dead; None while it is alive."""
        ...

    @property
    def free_slots(self) -> int:
        """Admission slots left before submit raises QueueFull; cheap, for refusing work before reading a body."""
        ...

    def admission_error(self) -> EngineError | None:
        """The error submit would raise now whatever the request (QueueFull, EngineNotReady, EngineDead), or None.
        Cheap: the HTTP side calls it before reading a request body (server.middleware.AdmissionGate)."""
        ...

    def submit(self, request: GenerationRequest) -> JobHandle:
        """Validate and enqueue at once. Raises InvalidRequest, ModelNotFound, QueueFull, EngineNotReady (EngineDead
        when dead), DeadlineExceeded (deadline already passed). A request without a deadline gets one."""
        ...

    def current_job(self) -> JobHandle | None:
        """The job running now (A1111 /progress, /interrupt and /skip act on it)."""
        ...

    def queued_count(self) -> int: ...

    def queued_owners(self) -> list[str | None]:
        """The owner tag of each queued job (`request.tags["owner"]`)."""
        ...

    def interrupt(self) -> None:
        """Stop the running job at its next step; it returns the images finished so far."""
        ...

    def skip(self) -> None:
        """Stop the running pipeline call at its next step and go on with the job's next n_iter call."""
        ...

    async def load_model(self, model_id: str) -> None:
        """Load a model into the cache now (A1111 POST /options with sd_model_checkpoint). Raises ModelLoadError."""
        ...

    def unload_models(self) -> None: ...

    def loaded_models(self) -> list[str]: ...

    def memory_stats(self) -> dict[str, Any]:
        """A1111 /memory shape: {ram: {...}, cuda: {...} or {error}}."""
        ...
