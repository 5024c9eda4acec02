"""Run a gateway job: 202 with a task address (`"async": true`), or wait and answer with the stored body.

The synchronous answer is read back from the job record, exactly as `GET /v2/tasks/{task_address}` reads it, so the
two can never differ. A synchronous call that outlives `sync_timeout_s` answers 504 with the task address; the job
goes on and its result stays retrievable; a client that hangs up before the answer cancels it.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import InvalidRequest
from server.api.gateway.adapter import Plan
from server.errors import ApiError, ErrorInfo, render_gateway, stored_job_error
from server.jobs import JobService, get_job_service
from server.jobs.http import accepted, base_url, submit, task_url, wait_watching
from server.settings import Settings


def wire_field(error: BaseException, plan: Plan) -> BaseException:
    """An engine InvalidRequest names GenerationRequest fields; the client needs the field it sent. The gateway has
    no `model` field: the engine refusing the model for the task means the route is mapped to the wrong model."""
    if not isinstance(error, InvalidRequest):
        return error
    if error.field == "model":
        message = f"route '{plan.spec.route}' is mapped to a model that cannot serve it: {error.message}; fix `routes:`"
        return ApiError(500, message + " in models.yaml", code="route_misconfigured")
    if error.field in plan.field_names:
        return InvalidRequest(plan.field_names[error.field], error.message)
    return error


def timeout_response(request: Request, task_address: str, timeout_s: float) -> JSONResponse:
    poll_url = task_url(request, task_address)
    message = (
        f"the image was not ready within {timeout_s:g} s (sync_timeout_s); it is still being made: poll GET "
        f'{poll_url} for the result, and send "async": true for long generations'
    )
    body = render_gateway(ErrorInfo(504, message, "Timeout", "timeout"))
    body["error"].update(task_address=task_address, poll_url=poll_url)
    return JSONResponse(body, status_code=504, headers={"Location": poll_url})


async def run_job(request: Request, plan: Plan, run_async: bool) -> Response:
    settings: Settings = request.app.state.settings
    jobs: JobService = get_job_service(request)
    try:
        ticket = await submit(request, plan.spec)
    except InvalidRequest as e:
        raise wire_field(e, plan) from None
    if run_async:
        return accepted(request, ticket)
    try:
        record = await wait_watching(request, ticket, settings.sync_timeout_s)
    except TimeoutError:
        return timeout_response(request, ticket.task_address, settings.sync_timeout_s)
    if record.status != "completed":
        error = ticket.handle.error
        if error is not None:
            raise wire_field(error, plan)
        raise stored_job_error(record.error_code, record.error)
    body = await run_in_threadpool(jobs.result_body, record, base_url(request))
    return JSONResponse(body)
