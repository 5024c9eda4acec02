"""The webhook payload (seed 001): what a finished job tells its `webhook_url`.

{"event": "generation.completed" | "generation.failed", "generation_id", "status", "image_url" (the first result
image's absolute URL; null on failure), "created_at" (ISO 8601, Z), "timestamp" (epoch seconds of the attempt, equal
to X-Easel-Timestamp), and on failure "error": {"code", "message"}}.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from server.jobs.db import JobRecord, ResultFile
from server.jobs.service import file_url
from server.settings import Settings

EVENTS = {"completed": "generation.completed", "failed": "generation.failed"}


def generation_id(record: JobRecord) -> str:
    """The id the client knows the job by, in its dialect (see the dialects' adapters)."""
    if record.dialect == "genpicz":
        return "gen_" + record.task_address
    if record.dialect == "genrex":
        return str(uuid.UUID(record.id))
    return record.task_address


def public_base_url(record: JobRecord, settings: Settings) -> str:
    """The base URL the client used, else the configured public one, else the address the server listens on."""
    return (record.base_url or settings.public_base_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def build_payload(
    record: JobRecord,
    files: list[ResultFile],
    settings: Settings,
    url_of: Callable[[str, ResultFile], str] | None = None,
) -> dict[str, Any]:
    """The payload of a completed or failed job (without "timestamp": each attempt stamps its own). `url_of`
    (JobService.file_url) makes the image URL a signed one the receiver can load without credentials."""
    completed = record.status == "completed"
    image_url = None
    if completed and files:
        base = public_base_url(record, settings)
        if url_of is not None:
            image_url = url_of(base, files[0])
        else:
            image_url = file_url(base, files[0].token, files[0].content_type)
    payload: dict[str, Any] = {
        "event": EVENTS[record.status],
        "generation_id": generation_id(record),
        "status": record.status,
        "image_url": image_url,
        "created_at": record.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if not completed:
        payload["error"] = {"code": record.error_code, "message": record.error}
    return payload


def render_body(payload: dict[str, Any], timestamp: int) -> str:
    """The exact JSON text to send: the payload with this attempt's timestamp (compact, ASCII)."""
    return json.dumps({**payload, "timestamp": timestamp}, separators=(",", ":"))


def restamp(body: str, timestamp: int) -> str:
    """A stored body with a new attempt's timestamp; everything else byte for byte the same."""
    return render_body(json.loads(body), timestamp)
