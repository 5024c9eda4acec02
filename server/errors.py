"""Domain errors, and how every error maps to a status code and a body, in one place.

`error_info(exc)` decides the status (the only place that does); a renderer chosen by URL path prefix decides the
body shape, so each dialect answers in its own wire format: A1111 routes get `{error, detail, body, errors}`, later
dialects (/v2/image, /v1 OpenAI) add theirs with `add_error_renderer`. Unexpected exceptions become a 500 that says
nothing about the server's internals (no traceback, no paths); the details go to the log.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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

log = logging.getLogger("easel.errors")

ENGINE_NOT_READY_RETRY_AFTER_S = 5

# Absolute filesystem paths in a message meant for clients (probes are often public): the last part is kept.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s'\"/:,;()]+)+/?")


def client_safe(message: str) -> str:
    """`message` with absolute paths cut to their last part: clients learn which file, not where the server keeps
    it (the log has the full path)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


@dataclass
class FieldError:
    """One invalid request field. `field` is dotted (`override_settings.sd_model_checkpoint`)."""

    field: str
    message: str
    type: str = "value_error"


class ApiError(Exception):
    """An error the HTTP layer raises on purpose: a status, a message for the client, optionally the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        field_errors: list[FieldError] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code
        self.headers = headers or {}
        self.field_errors = field_errors or ([FieldError(field, message)] if field else [])

    @classmethod
    def invalid(cls, errors: list[FieldError]) -> ApiError:
        """422 for one or more invalid fields, all reported at once."""
        message = "; ".join(f"{e.field}: {e.message}" for e in errors)
        return cls(422, message, field=errors[0].field, code="invalid_request", field_errors=errors)


@dataclass
class ErrorInfo:
    """A dialect-neutral description of an error response; renderers turn it into a body."""

    status: int
    message: str
    error_type: str  # e.g. "QueueFull", "HTTPException": A1111 reports the exception class name
    code: str | None = None  # a stable machine-readable code ("queue_full") for dialects that have one
    field: str | None = None
    field_errors: list[FieldError] = dataclass_field(default_factory=list)
    headers: dict[str, str] = dataclass_field(default_factory=dict)


def _loc(field_name: str) -> list[str | int]:
    return ["body", *(int(p) if p.isdigit() else p for p in field_name.split("."))]


def _validation_field_errors(exc: RequestValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        out.append(FieldError(".".join(loc) or "body", str(err.get("msg", "invalid value")), str(err.get("type", ""))))
    return out


def error_info(exc: BaseException) -> ErrorInfo:
    """The one mapping from an exception to a status code and a client-safe message. Messages the server did not
    write for clients (engine and library errors) lose any absolute filesystem paths."""
    info = _error_info(exc)
    if not isinstance(exc, ApiError | RequestValidationError | StarletteHTTPException):
        info.message = client_safe(info.message)
    return info


def _error_info(exc: BaseException) -> ErrorInfo:
    name = type(exc).__name__
    if isinstance(exc, ApiError):
        # "HTTPException" is what A1111 reports for the errors it raises on purpose (e.g. "Init image not found").
        return ErrorInfo(exc.status, exc.message, "HTTPException", exc.code, exc.field, exc.field_errors, exc.headers)
    if isinstance(exc, RequestValidationError):
        errors = _validation_field_errors(exc)
        message = "; ".join(f"{e.field}: {e.message}" for e in errors) or "invalid request"
        return ErrorInfo(422, message, name, "invalid_request", errors[0].field if errors else None, errors)
    if isinstance(exc, InvalidRequest):
        return ErrorInfo(422, str(exc), name, "invalid_request", exc.field, [FieldError(exc.field, exc.message)])
    if isinstance(exc, ModelNotFound):
        return ErrorInfo(404, str(exc), name, "model_not_found")
    if isinstance(exc, QueueFull):
        return ErrorInfo(429, str(exc), name, "queue_full", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, EngineDead):  # for good: the supervisor restarts the process (docs/reliability.md R6)
        headers = {"Retry-After": str(ENGINE_NOT_READY_RETRY_AFTER_S)}
        return ErrorInfo(
            503, str(exc) or "the engine stopped after a device fault", name, "engine_dead", headers=headers
        )
    if isinstance(exc, EngineNotReady):
        message = str(exc) or "the engine is not ready"
        headers = {"Retry-After": str(ENGINE_NOT_READY_RETRY_AFTER_S)}
        return ErrorInfo(503, message, name, "engine_not_ready", headers=headers)
    if isinstance(exc, ModelLoadError):
        # 500, not 503: a model that fails to load (bad path, bad weights) fails again on retry.
        return ErrorInfo(500, f"model load failed: {exc}", name, "model_load_failed")
    if isinstance(exc, ShutdownCancelled):  # the caller did nothing wrong: another replica (or a restart) can run it
        headers = {"Retry-After": str(ENGINE_NOT_READY_RETRY_AFTER_S)}
        return ErrorInfo(503, str(exc) or "the server shut down before the job finished", name, "shutting_down",
                         headers=headers)  # fmt: skip
    if isinstance(exc, JobCancelled):
        return ErrorInfo(409, str(exc) or "the job was cancelled before it produced a result", name, "job_cancelled")
    if isinstance(exc, DeadlineExceeded):  # 504 as LitServe/BentoML; async jobs record it as failed
        return ErrorInfo(504, str(exc) or "the request passed its deadline", name, "deadline_exceeded")
    if isinstance(exc, InsufficientMemory):  # 503 + Retry-After: only this request failed, the server stays ready
        headers = {"Retry-After": str(ENGINE_NOT_READY_RETRY_AFTER_S)}
        return ErrorInfo(503, str(exc), name, "insufficient_gpu_memory", headers=headers)
    if isinstance(exc, GenerationFailed):
        return ErrorInfo(500, str(exc) or "generation failed", name, "generation_failed")
    if isinstance(exc, EngineError):
        return ErrorInfo(500, str(exc) or "engine error", name, "engine_error")
    if isinstance(exc, StarletteHTTPException):
        return ErrorInfo(exc.status_code, str(exc.detail), "HTTPException", headers=dict(exc.headers or {}))
    if storage_full(exc):
        headers = {"Retry-After": str(STORAGE_FULL_RETRY_AFTER_S)}
        return ErrorInfo(507, STORAGE_FULL_MESSAGE, name, INSUFFICIENT_STORAGE, headers=headers)
    return ErrorInfo(500, f"internal server error ({name}); the details are in the server log", name, "internal_error")


# A full disk (results directory or database): 507 Insufficient Storage, never a 500. Nothing is wrong with the
# request, and the server serves again as soon as space is freed (the sweep deletes expired results).
INSUFFICIENT_STORAGE = "insufficient_storage"
STORAGE_FULL_MESSAGE = "the server's disk is full: nothing could be stored; retry later"
STORAGE_FULL_RETRY_AFTER_S = 60
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota: an OSError ENOSPC/EDQUOT, or SQLite's "database
    or disk is full" (as sqlite3 or SQLAlchemy raise it)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "orig", None)
        seen += 1
    return False


def stored_job_error(error_code: str | None, message: str | None) -> ApiError:
    """The error a synchronous caller gets for a job recorded as failed without an engine error to re-raise."""
    if error_code == INSUFFICIENT_STORAGE:
        headers = {"Retry-After": str(STORAGE_FULL_RETRY_AFTER_S)}
        return ApiError(507, message or STORAGE_FULL_MESSAGE, code=INSUFFICIENT_STORAGE, headers=headers)
    return ApiError(500, message or "the job failed", code=error_code or "generation_failed")


# Renderers ---------------------------------------------------------------------------------------------------------

# ErrorInfo -> the dialect's body. A renderer may also adjust `info.status` (OpenAI answers invalid input with 400,
# not 422): every caller reads the status after rendering.
Renderer = Callable[[ErrorInfo], dict[str, Any]]


def _detail_list(info: ErrorInfo) -> list[dict[str, Any]]:
    """FastAPI's 422 `detail` shape: [{loc, msg, type}], loc naming the field."""
    return [{"loc": _loc(e.field), "msg": e.message, "type": e.type or "value_error"} for e in info.field_errors]


def render_default(info: ErrorInfo) -> dict[str, Any]:
    """`{"detail": msg}`; 422s keep FastAPI's list of `{loc, msg, type}`."""
    if info.status == 422 and info.field_errors:
        return {"detail": _detail_list(info)}
    return {"detail": info.message}


def render_a1111(info: ErrorInfo) -> dict[str, Any]:
    """A1111's `{error, detail, body, errors}` (api.py handle_exception).

    A 422 keeps FastAPI's `detail` list as A1111 does (clients read `detail[0]["loc"]`); the A1111 keys are added.
    """
    detail: Any = _detail_list(info) if info.status == 422 and info.field_errors else info.message
    return {"error": info.error_type, "detail": detail, "body": "", "errors": info.message}


_GATEWAY_DEFAULT_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def render_gateway(info: ErrorInfo) -> dict[str, Any]:
    """The /v2 gateway's `{"error": {"code", "message", "field"}}`; a 422 adds FastAPI's `detail` list, so every
    invalid field is named in both places clients look."""
    code = info.code or _GATEWAY_DEFAULT_CODES.get(info.status, "server_error" if info.status >= 500 else "error")
    body: dict[str, Any] = {"error": {"code": code, "message": info.message, "field": info.field}}
    if info.status == 422 and info.field_errors:
        body["detail"] = _detail_list(info)
    return body


A1111_PREFIXES = ("/sdapi/", "/v2/automatic1111/", "/controlnet/")  # /controlnet: the ControlNet extension's API
GATEWAY_PREFIXES = ("/v2/image/", "/v2/tasks", "/v2/results/", "/v2/history", "/v2/models")
DEFAULT_RENDERERS: dict[str, Renderer] = {prefix: render_a1111 for prefix in A1111_PREFIXES}


def _renderers(app: Any) -> dict[str, Renderer]:
    table = getattr(app.state, "error_renderers", None)
    if table is None:
        table = dict(DEFAULT_RENDERERS)
        app.state.error_renderers = table
    return table


def add_error_renderer(app: FastAPI, prefix: str, renderer: Renderer) -> None:
    """Render errors of paths under `prefix` with `renderer`; the longest matching prefix wins."""
    _renderers(app)[prefix] = renderer


def renderer_for(app: Any, path: str) -> Renderer:
    matches = [p for p in _renderers(app) if path.startswith(p)]
    return _renderers(app)[max(matches, key=len)] if matches else render_default


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    info = error_info(exc)
    if info.status >= 500:
        if isinstance(exc, EngineError | ApiError) or info.code == INSUFFICIENT_STORAGE:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, info.status, info.message)
        else:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = renderer_for(request.app, request.url.path)(info)
    return JSONResponse(body, status_code=info.status, headers=info.headers or None)


def register_error_handlers(app: FastAPI) -> None:
    """Install the handlers; every error kind goes through `error_info` and the path's renderer."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    _renderers(app)
    for kind in (RequestValidationError, StarletteHTTPException, ApiError, EngineError, Exception):
        app.add_exception_handler(kind, handle)
