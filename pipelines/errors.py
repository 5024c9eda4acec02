"""Errors the GPU side raises; `server/errors.py` maps each to a status code per dialect. No torch import."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports to a request."""


class InvalidRequest(EngineError):
    """The request cannot run as given; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFound(EngineError):
    def __init__(self, name: str):
        super().__init__(f"model '{name}' not found")
        self.name = name


class QueueFull(EngineError):
    def __init__(self, retry_after_s: int = 5):
        super().__init__("the server is busy: the generation queue is full, retry later")
        self.retry_after_s = retry_after_s


class EngineNotReady(EngineError):
    """Raised while the engine is starting, draining or dead."""


class ModelLoadError(EngineError):
    """A model failed to load; the message says which and why (never a traceback)."""


class JobCancelled(EngineError):
    """The job was cancelled before it produced a result."""


class ShutdownCancelled(JobCancelled):
    """The job was cancelled because the server shut down (the drain deadline passed): nothing the caller did, so a
    synchronous caller is told to retry (HTTP 503 + Retry-After), not that its job was cancelled (409)."""


class GenerationFailed(EngineError):
    """The pipeline raised while running the job."""


class DeadlineExceeded(EngineError):
    """The request passed its deadline (`GenerationRequest.deadline`) while queued or running; it was dropped before
    it reached the device, or stopped at the next denoising step."""


class InsufficientMemory(GenerationFailed):
    """The device ran out of memory for this request even when it ran alone; only this request fails (retryable:
    the memory may be free later, or a smaller size or batch fits)."""


class EngineDead(EngineNotReady):
    """The engine stopped for good after a device fault (or repeated out-of-memory errors that freeing memory did
    not fix): every request fails with this until the process is restarted."""
