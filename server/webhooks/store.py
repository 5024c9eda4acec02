"""DeliveryStore: the webhook_deliveries rows and their state changes, each one short transaction.

Several processes may share the database (and so the queue). An attempt is claimed with one conditional UPDATE
(`attempts` is the row's version number): of two workers that saw the same due row, exactly one claims it. The claim
moves `next_attempt_at` to the end of a lease, so the row stays invisible while the attempt runs and comes back by
itself if the process dies mid-attempt. The outcome is written only by the holder of that claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from server.jobs.db import make_session_factory
from server.webhooks.db import DELIVERED, FAILED, PENDING, WebhookDelivery

INTERRUPTED_ERROR = "the last attempt was interrupted (the server stopped) and no attempts are left"


@dataclass(frozen=True)
class NewDelivery:
    job_id: str
    owner: str | None
    dialect: str
    url: str
    event: str
    body: str


class DeliveryStore:
    def __init__(self, engine: Engine):
        self._session = make_session_factory(engine)

    def add(self, new: NewDelivery, now: datetime) -> str | None:
        """Queue a delivery, due now. None if this job's event is already queued (a listener called twice)."""
        delivery_id = uuid.uuid4().hex
        row = WebhookDelivery(
            id=delivery_id,
            **vars(new),
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        try:
            with self._session.begin() as session:
                session.add(row)
        except IntegrityError:
            return None
        return delivery_id

    def get(self, delivery_id: str) -> WebhookDelivery | None:
        with self._session() as session:
            return session.get(WebhookDelivery, delivery_id)

    def upcoming(self, until: datetime, limit: int, exclude: Collection[str] = ()) -> list[WebhookDelivery]:
        """Pending rows due before `until`, soonest first, without those in `exclude` (already being handled)."""
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= until)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
        if exclude:
            query = query.where(WebhookDelivery.id.notin_(list(exclude)))
        with self._session() as session:
            return list(session.scalars(query))

    def claim(self, row: WebhookDelivery, now: datetime, lease_s: float, body: str) -> bool:
        """Take attempt `row.attempts + 1` for this process, with this attempt's body. False if another worker did."""
        with self._session.begin() as session:
            result = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == row.id,
                    WebhookDelivery.status == PENDING,
                    WebhookDelivery.attempts == row.attempts,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(attempts=row.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s), body=body)
            )
            return result.rowcount == 1

    def record(
        self,
        delivery_id: str,
        attempt: int,
        *,
        now: datetime,
        status_code: int | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """The outcome of claimed attempt `attempt`: delivered (no error), retry at `retry_at`, or failed for good."""
        if error is None:
            values: dict[str, object] = dict(status=DELIVERED, delivered_at=now, finished_at=now)
        elif retry_at is not None:
            values = dict(status=PENDING, next_attempt_at=retry_at)
        else:
            values = dict(status=FAILED, finished_at=now)
        with self._session.begin() as session:
            session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == PENDING,
                    WebhookDelivery.attempts == attempt,
                )
                .values(**values, last_status_code=status_code, last_error=error)
            )

    def give_up_interrupted(self, now: datetime, max_attempts: int) -> int:
        """Rows whose last allowed attempt was claimed by a process that died before it recorded the outcome."""
        with self._session.begin() as session:
            result = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.status == PENDING,
                    WebhookDelivery.attempts >= max_attempts,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(status=FAILED, finished_at=now, last_error=INTERRUPTED_ERROR)
            )
            return result.rowcount or 0

    def for_job(self, job_id: str) -> list[WebhookDelivery]:
        with self._session() as session:
            query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
            return list(session.scalars(query.order_by(WebhookDelivery.created_at)))

    def count_pending(self) -> int:
        with self._session() as session:
            query = select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == PENDING)
            return int(session.scalar(query) or 0)

    def delete_finished_before(self, cutoff: datetime) -> int:
        with self._session.begin() as session:
            result = session.execute(
                delete(WebhookDelivery).where(
                    WebhookDelivery.status.in_((DELIVERED, FAILED)), WebhookDelivery.finished_at < cutoff
                )
            )
            return result.rowcount or 0
