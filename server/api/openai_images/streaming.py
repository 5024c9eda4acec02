"""`stream: true` on /v1/images/generations and /v1/images/edits: OpenAI's Server-Sent Events.

`image_generation.partial_image` (`image_edit.partial_image` for edits) for each of `partial_images` live previews as
they are made (scaled to the requested size), then `image_generation.completed` (`image_edit.completed`) with each
finished image, as OpenAI sends them, so the official SDK's stream iteration works unchanged. A failure ends the
stream with an `error` event. A client that hangs up cancels the job, as with every synchronous call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from PIL import Image
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from pipelines.errors import InvalidRequest
from server.api.openai_images.adapter import Plan
from server.images import b64, encode_image
from server.jobs import get_job_service
from server.jobs.http import base_url, submit
from server.jobs.watch import watch

log = logging.getLogger("easel.openai")
PING_S = 15


def partial_b64(preview: Image.Image, width: int, height: int, output_format: str) -> str:
    """A live preview (1/8 of the image size) as the image a client expects: the requested size and format."""
    return b64(encode_image(preview.resize((width, height), Image.Resampling.BILINEAR), output_format))


def _sse(event: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=event)


async def stream_plan(request: Request, plan: Plan) -> EventSourceResponse:
    jobs = get_job_service(request)
    try:
        ticket = await submit(request, plan.spec)
    except InvalidRequest as e:
        raise InvalidRequest(plan.wire_field(e.field), e.message) from None
    req = plan.spec.request
    fmt = plan.spec.output_format

    async def events() -> AsyncIterator[ServerSentEvent]:
        finished = False
        try:
            sent, shown = 0, 0
            async for snap in watch(ticket.handle, ticket.finished):
                for step, preview in snap.progress.recent_previews:
                    if sent >= plan.partial_images or step <= shown:
                        continue
                    shown = step
                    data = await run_in_threadpool(partial_b64, preview, req.width, req.height, fmt)
                    yield _sse(f"{plan.events}.partial_image", {
                        "type": f"{plan.events}.partial_image", "b64_json": data, "partial_image_index": sent,
                        "created_at": int(snap.progress.started_at or 0), "size": f"{req.width}x{req.height}",
                        "quality": "auto", "background": "opaque", "output_format": fmt,
                    })  # fmt: skip
                    sent += 1
            record = await jobs.wait(ticket, None)
            finished = True
            if record.status != "completed":
                error = ticket.handle.error
                message = str(error) if error is not None else record.error or "the job failed"
                code = getattr(error, "code", None) or record.error_code or "generation_failed"
                yield _sse("error", {"type": "error", "error": {"message": message, "code": code}})
                return
            body = await run_in_threadpool(jobs.result_body, record, base_url(request))
            for item in body["data"]:
                yield _sse(f"{plan.events}.completed", {
                    "type": f"{plan.events}.completed", "b64_json": item["b64_json"], "created_at": body["created"],
                    "size": body["size"], "quality": body["quality"], "background": body["background"],
                    "output_format": body["output_format"], "usage": body["usage"],
                })  # fmt: skip
        finally:
            if not finished:  # the client hung up mid-stream: nobody will read the images
                log.info("%s: the streaming client disconnected; cancelling its job", request.url.path)
                await run_in_threadpool(jobs.cancel, ticket.task_address)

    return EventSourceResponse(events(), ping=PING_S)
