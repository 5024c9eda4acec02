"""Per-key fixed-window rate limit: N requests per UTC minute, windows resetting at the start of each minute
(seed 001). Counted in the database with conditional updates, so concurrent requests (threads, processes, ingress
replicas sharing the database) can never admit more than N in a window."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from server.access.db import RateWindow
from server.jobs.db import make_session_factory

WINDOW_S = 60
KEEP_WINDOWS = 2  # older windows are deleted now and then


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # epoch seconds when the window resets (start of the next UTC minute)

    @property
    def retry_after_s(self) -> int:
        return max(1, self.reset_at - int(time.time()))

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }


class RateLimiter:
    def __init__(self, engine: Engine, clock=time.time):
        self._session = make_session_factory(engine)
        self._clock = clock
        self._last_cleanup = 0

    def hit(self, key_id: str, limit: int) -> RateDecision:
        """Count one request of `key_id` against `limit` per minute; refused requests are not counted."""
        window = int(self._clock()) // WINDOW_S
        reset_at = (window + 1) * WINDOW_S
        for _ in range(3):  # the first request of a window may race another one inserting the row
            with self._session.begin() as session:
                result = session.execute(
                    update(RateWindow)
                    .where(RateWindow.key_id == key_id, RateWindow.window_start == window, RateWindow.count < limit)
                    .values(count=RateWindow.count + 1)
                    .returning(RateWindow.count)
                )
                count = result.scalar()
                if count is not None:
                    return RateDecision(True, limit, max(0, limit - count), reset_at)
                row = session.get(RateWindow, (key_id, window))
                if row is not None:  # the window is full
                    return RateDecision(False, limit, 0, reset_at)
            try:
                with self._session.begin() as session:
                    session.add(RateWindow(key_id=key_id, window_start=window, count=1))
                self._cleanup(window)
                return RateDecision(True, limit, max(0, limit - 1), reset_at)
            except IntegrityError:
                continue  # someone else created the window: count against it
        return RateDecision(False, limit, 0, reset_at)

    def _cleanup(self, window: int) -> None:
        if window - self._last_cleanup < KEEP_WINDOWS:
            return
        self._last_cleanup = window
        with self._session.begin() as session:
            session.execute(delete(RateWindow).where(RateWindow.window_start < window - KEEP_WINDOWS))
