"""Errors under /v1/images/ and /v1/models in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI answers invalid input with 400 (FastAPI and the shared helpers say 422), names the offending request field in
`param`, and uses codes such as `unknown_parameter`, `missing_required_parameter`, `invalid_value` and
`model_not_found`. Headers (e.g. 429's Retry-After) are kept by the shared error handler.
"""

from __future__ import annotations

from typing import Any

from server.errors import ErrorInfo, FieldError

PREFIXES = ("/v1/images/", "/v1/models")

# pydantic error type -> OpenAI error code
_VALIDATION_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _param(field: str | None) -> str | None:
    """The wire field; None for errors about the body as a whole (FastAPI's loc `body` or a JSON offset)."""
    if not field or field == "body" or field.isdigit():
        return None
    return field


def _describe(error: FieldError) -> str:
    if error.type == "extra_forbidden":
        return f"Unknown parameter: '{error.field}'."
    if error.type == "missing":
        return f"Missing required parameter: '{error.field}'."
    if _param(error.field) is None:
        return error.message
    prefix = f"{error.field}: "  # the shared helpers prefix their messages with the field
    message = error.message[len(prefix) :] if error.message.startswith(prefix) else error.message
    return f"Invalid '{error.field}': {message}"


def render_openai(info: ErrorInfo) -> dict[str, Any]:
    """OpenAI's error body. A 422 becomes 400 as on api.openai.com: the shared handler reads `info.status` after
    rendering, so setting it here decides the status (tests/api/test_openai_images.py checks it)."""
    validation = info.status == 422
    if validation:
        info.status = 400
    code = info.code
    message = info.message
    if validation:
        first = info.field_errors[0] if info.field_errors else None
        code = _VALIDATION_CODES.get(first.type, "invalid_value") if first else "invalid_value"
        if info.field_errors:
            message = " ".join(_describe(e) for e in info.field_errors)
    return {"error": {"message": message, "type": error_type(info.status), "param": _param(info.field), "code": code}}
