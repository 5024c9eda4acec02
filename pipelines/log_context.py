"""Which request and job a log line is about: context variables the HTTP side sets per request and the engine
sets while it works on a job, read by the log filter (`server.logs`). Torch-free.

A request's id travels to the engine in `GenerationRequest.tags["request_id"]` (and the job record's id, where
there is one, in `tags["job_id"]`): the worker thread has no HTTP context of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("easel_request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("easel_job_id", default=None)

REQUEST_ID_TAG = "request_id"
JOB_ID_TAG = "job_id"


@contextlib.contextmanager
def bound(request: str | None = None, job: str | None = None) -> Iterator[None]:
    """Log lines inside the block name `request` and `job` (None leaves the current value)."""
    tokens = []
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    if job is not None:
        tokens.append((job_id, job_id.set(job)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _joined(values: Iterable[str | None]) -> str | None:
    seen = list(dict.fromkeys(v for v in values if v))
    return ",".join(seen) or None


@contextlib.contextmanager
def for_jobs(jobs: Iterable[Any]) -> Iterator[None]:
    """Bind the ids of engine jobs (anything with `.id` and `.request.tags`): one job's, or a batch's joined by
    commas. A job's id is its record's (`tags["job_id"]`) where the HTTP side made one, else the engine's."""
    jobs = list(jobs)
    requests = _joined(j.request.tags.get(REQUEST_ID_TAG) for j in jobs)
    ids = _joined(j.request.tags.get(JOB_ID_TAG) or j.id for j in jobs)
    with bound(requests, ids):
        yield
