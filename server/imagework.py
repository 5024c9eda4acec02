"""Bounded image preparation on the HTTP side: how many requests decode and prepare input images at once, and the
size of every image made from them.

Decoding base64, fetching URLs, converting, masking and stitching cost memory in proportion to the pixels, so they
run under a limit of their own (`image_prep_concurrency` at once, up to `queue_size` more waiting, then 429), not
in the HTTP thread pool where forty requests could each hold their images at the same time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from pipelines.errors import QueueFull
from pipelines.imageprep import check_request_work, needs_presize, presize_inputs
from pipelines.request import GenerationRequest
from server.settings import Settings

T = TypeVar("T")


class PrepGate:
    """`image_prep_concurrency` preparations at once; more callers wait (asynchronously, holding no thread), and
    beyond `max_waiting` of them the next one is refused with QueueFull (429 + Retry-After) at once."""

    def __init__(self, concurrency: int, max_waiting: int):
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.max_pending = concurrency + max_waiting
        self.pending = 0  # running + waiting; only touched on the event loop

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self.max_pending:
            raise QueueFull()
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)
        finally:
            self.pending -= 1


def prep_gate(request: Request) -> PrepGate:
    """The app's gate, made on first use (settings may differ between apps in one process)."""
    state = request.app.state
    gate = getattr(state, "prep_gate", None)
    if gate is None:
        settings = state.settings
        gate = state.prep_gate = PrepGate(settings.image_prep_concurrency, settings.queue_size)
    return gate


async def prepare(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)`, which decodes or prepares images, under the app's preparation limit."""
    return await prep_gate(request).run(fn, *args)


def checked_and_presized(settings: Settings, generation: GenerationRequest) -> GenerationRequest:
    """For the thread that decoded the inputs, before it leaves the preparation limit: refuse intermediates above
    max_work_pixels (InvalidRequest naming the field), then resize large img2img / edit inputs to the output, so
    the job holds output-sized images while it waits in the queue (pipelines.imageprep.presize_inputs)."""
    check_request_work(generation, settings.max_work_pixels)
    return presize_inputs(generation) if needs_presize(generation) else generation


async def presize(request: Request, generation: GenerationRequest) -> GenerationRequest:
    """`checked_and_presized` for a request whose inputs were prepared elsewhere (a no-op when they are small)."""
    if not needs_presize(generation):
        return generation
    return await prepare(request, checked_and_presized, request.app.state.settings, generation)


def check_work(request: Request, generation: GenerationRequest) -> None:
    """InvalidRequest naming the field when preparing `generation` would make an image above max_work_pixels:
    refused here, before submission, as the engine would refuse it."""
    check_request_work(generation, request.app.state.settings.max_work_pixels)
