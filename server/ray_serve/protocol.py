"""What the ingress and the GPU workers send each other. No Ray, no torch: importable and testable anywhere.

One job is one streaming call to a worker replica (`EaselWorker.run`), pinned by Ray Serve to that replica for its
whole life. The worker yields, in order:

- `accepted` (the engine admitted the job: its id, the replica, the replica's control actor) or `refused` (the
  engine's refusal: invalid, queue full, not ready; nothing runs);
- `progress` whenever the status or the step changes;
- `finished`: the `GenerationResult` (images as PIL images: Ray pickles them), or the job's error.

Engine errors do not pickle (InvalidRequest takes two arguments, its pickled form one), so they travel as dicts
and are rebuilt as the same classes on the ingress side, where the HTTP error mapping (`server.errors`) sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines import errors
from pipelines.engine_api import JobStatus
from pipelines.errors import EngineError, GenerationFailed, InvalidRequest, ModelNotFound, QueueFull
from pipelines.request import GenerationResult, Progress

ACCEPTED = "accepted"
REFUSED = "refused"
PROGRESS = "progress"
FINISHED = "finished"

# Control actions the ingress posts to the replica running a job (A1111 /interrupt and /skip, cancel).
CANCEL = "cancel"
INTERRUPT = "interrupt"
SKIP = "skip"
ACTIONS = (CANCEL, INTERRUPT, SKIP)


def encode_error(error: BaseException) -> dict[str, Any]:
    """A picklable description of an engine error (or any exception, which becomes GenerationFailed)."""
    out: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, InvalidRequest):
        out.update(field=error.field, detail=error.message)
    elif isinstance(error, ModelNotFound):
        out.update(name=error.name)
    elif isinstance(error, QueueFull):
        out.update(retry_after_s=error.retry_after_s)
    return out


def decode_error(data: dict[str, Any]) -> EngineError:
    """The engine error `encode_error` described, as its own class where `pipelines.errors` has it."""
    kind, message = str(data.get("type", "")), str(data.get("message", ""))
    if kind == "InvalidRequest":
        return InvalidRequest(str(data.get("field", "")), str(data.get("detail", message)))
    if kind == "ModelNotFound":
        return ModelNotFound(str(data.get("name", "")))
    if kind == "QueueFull":
        return QueueFull(int(data.get("retry_after_s", 5)))
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, EngineError):
        try:
            return cls(message)
        except TypeError:  # a class with another constructor: keep the message, lose the type
            pass
    return GenerationFailed(message or f"the worker failed ({kind})")


def accepted(job_id: str, replica: str, control: Any, seed: int | None, loaded: list[str]) -> dict[str, Any]:
    return {"kind": ACCEPTED, "job_id": job_id, "replica": replica, "control": control, "seed": seed, "loaded": loaded}


def refused(error: BaseException, replica: str) -> dict[str, Any]:
    return {"kind": REFUSED, "error": encode_error(error), "replica": replica}


def progress(status: JobStatus, snapshot: Progress) -> dict[str, Any]:
    return {"kind": PROGRESS, "status": status.value, "progress": dataclasses.asdict(snapshot)}


def finished(status: JobStatus, result: GenerationResult | None, error: BaseException | None) -> dict[str, Any]:
    return {
        "kind": FINISHED,
        "status": status.value,
        "result": result,
        "error": encode_error(error) if error is not None else None,
    }


def progress_of(message: dict[str, Any]) -> Progress:
    return Progress(**message["progress"])
