"""Logging for the `easel` command: one format for Easel's, uvicorn's and the libraries' lines.

Every line names the request and job it is about where one is known (`pipelines.log_context`: the HTTP request's
X-Request-ID, the job record's id; the engine's worker binds them from the job's tags). `log_format: json`
(EASEL_LOG_FORMAT=json) writes one JSON object per line, for log collectors.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Literal

from pipelines import log_context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]


class ContextFilter(logging.Filter):
    """Adds `request_id`, `job_id` and `context` (" [request_id=... job_id=...]" or "") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or log_context.request_id.get()
        job_id = getattr(record, "job_id", None) or log_context.job_id.get()
        record.request_id, record.job_id = request_id, job_id
        parts = [f"request_id={request_id}"] if request_id else []
        parts += [f"job_id={job_id}"] if job_id else []
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id and job_id where known,
    exc_info (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_handler(log_format: LogFormat = "text", stream: object = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str = "info", log_format: LogFormat = "text") -> None:
    """Root logging at `level`; uvicorn's loggers propagate to it (serve passes `log_config=None` to uvicorn)."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format)], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def debugging() -> bool:
    """Tracebacks are for --log-level debug; everyone else gets one line."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)
