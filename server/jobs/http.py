"""HTTP helpers every dialect with async jobs shares: absolute URLs and the 202 answer with a task address."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.jobs.service import Ticket

TASKS_PATH = "/v2/tasks"


class TaskAccepted(BaseModel):
    """The 202 answer to `"async": true`."""

    task_address: str
    status: str
    poll_url: str


def base_url(request: Request) -> str:
    """`public_base_url` if set (behind a proxy), else the base URL the client used (scheme, host, root path)."""
    configured = request.app.state.settings.public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def task_url(request: Request, task_address: str) -> str:
    return f"{base_url(request)}{TASKS_PATH}/{task_address}"


def accepted(request: Request, ticket: Ticket) -> JSONResponse:
    """202 with the task address; `Location` points at the status URL."""
    url = task_url(request, ticket.task_address)
    body = {"task_address": ticket.task_address, "status": "queued", "poll_url": url}
    return JSONResponse(body, status_code=202, headers={"Location": url})
