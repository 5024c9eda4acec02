"""The `webhook_deliveries` table, in the job database: one row per (job, event) to POST, with its retry state.

`job_id` is deliberately not a foreign key: a delivery (and the record of whether it arrived) outlives a job that was
deleted or expired meanwhile. Rows are swept `webhook_retention_s` after they are delivered or given up.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from server.jobs.db import Base, UTCDateTime

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_event"),  # one delivery per job event
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),  # what the worker polls
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    owner: Mapped[str | None] = mapped_column(String(128))  # whose secret signs it (an API key id, or the server's)
    dialect: Mapped[str] = mapped_column(String(32))  # genpicz deliveries also carry X-GenPicz-Signature
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(32))  # generation.completed | generation.failed
    # The exact JSON text sent. Its "timestamp" is restamped at each attempt (it equals the signed header), so after
    # an attempt this is byte for byte what the receiver got.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claimed attempts; also the claim's version number
    # When the next attempt is due. While an attempt is in flight: the end of its lease, so that a process that died
    # mid-attempt leaves a row another process (or the next start) picks up again.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)  # the receiver's answer; its body is never kept
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # delivered or given up: the retention clock
