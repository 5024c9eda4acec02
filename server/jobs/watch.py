"""Watching a live job for streams (the /v2 task events, OpenAI image streaming, A1111 /progress): snapshots of its
status and progress as they change, and its latest preview as base64 PNG."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pipelines.engine_api import JobHandle, JobStatus
from pipelines.request import Progress
from server.images import b64, encode_image

POLL_S = 0.1  # how often a watcher looks at a running job; the end is seen at once


@dataclass(frozen=True)
class Snapshot:
    status: JobStatus
    progress: Progress

    @property
    def key(self) -> tuple:
        p = self.progress
        return (self.status, p.job_no, p.sampling_step, p.preview_step)

    @property
    def event_id(self) -> int:
        """Grows with the job's progress (queued 0, then one per step of each call): what Last-Event-ID resumes from."""
        p = self.progress
        if self.status == JobStatus.QUEUED:
            return 0
        return 1 + p.job_no * max(p.sampling_steps, 1) + p.sampling_step

    def eta_s(self) -> float | None:
        p = self.progress
        fraction = p.fraction
        if not p.started_at or fraction <= 0:
            return None
        elapsed = time.time() - p.started_at
        return max(0.0, elapsed / fraction - elapsed)


async def watch(handle: JobHandle, finished: concurrent.futures.Future) -> AsyncIterator[Snapshot]:
    """Each change of the job's state until it is finished (and stored: `finished` is the ticket's future), the
    state it ended in included."""
    done = asyncio.wrap_future(finished)
    last = None
    while True:
        ended = done.done()
        snap = Snapshot(handle.status, handle.progress)
        if snap.key != last:
            last = snap.key
            yield snap
        if ended:
            return
        await asyncio.wait([done], timeout=POLL_S)


def preview_b64(progress: Progress) -> str | None:
    """The job's latest live preview as base64 PNG (no data: prefix), or None."""
    image = progress.preview
    return None if image is None else b64(encode_image(image, "png"))
