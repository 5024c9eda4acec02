"""The GenPicz error body: `{"error": {"code", "message", "status"}}` (seed 001), plus `param` naming the field of an
invalid request. Statuses come from `server.errors.error_info`; only the codes are GenPicz's own."""

from __future__ import annotations

from typing import Any

from server.errors import ErrorInfo

# Codes the rest of the server uses -> the GenPicz code for the same thing.
_CODES = {
    "queue_full": "rate_limit_exceeded",
    "engine_error": "generation_failed",
    "model_load_failed": "generation_failed",
}
# Errors without a code (Starlette's 404/405, FastAPI's 400s) by status.
_BY_STATUS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
}


def error_code(info: ErrorInfo) -> str:
    if info.code:
        return _CODES.get(info.code, info.code)
    return _BY_STATUS.get(info.status, "server_error" if info.status >= 500 else "error")


def render_genpicz(info: ErrorInfo) -> dict[str, Any]:
    error: dict[str, Any] = {"code": error_code(info), "message": info.message, "status": info.status}
    if info.field:
        error["param"] = info.field
    return {"error": error}
