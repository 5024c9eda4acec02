"""Tables of the access layer, in the job database: `api_keys`, `rate_windows`, `a1111_sessions` and
`credit_reservations`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.jobs.db import Base, UTCDateTime


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is stored: the secret is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public: owner of jobs, shown by `keys list`
    name: Mapped[str] = mapped_column(String(128))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters of the secret, to recognise a key
    plan: Mapped[str] = mapped_column(String(16))
    rate_limit: Mapped[int] = mapped_column(Integer)  # requests per UTC minute
    quota: Mapped[int | None] = mapped_column(Integer)  # credits; None: unlimited
    credits_used: Mapped[int] = mapped_column(Integer, default=0)
    images_generated: Mapped[int] = mapped_column(Integer, default=0)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Signs webhook deliveries of this key's jobs (HMAC-SHA256). A shared secret, so it is stored as is.
    webhook_secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RateWindow(Base):
    """Requests a key made in one UTC minute. Counted in the database, so every server process sharing it (several
    ingress replicas) enforces one limit per key."""

    __tablename__ = "rate_windows"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    window_start: Mapped[int] = mapped_column(Integer, primary_key=True)  # unix minute (epoch seconds // 60)
    count: Mapped[int] = mapped_column(Integer, default=0)


class A1111Session(Base):
    """One caller's A1111 session when the server has keys (or Basic users): its own current checkpoint and the
    options it set, over the server-wide ones. `owner` is the principal id (key_..., basic:user)."""

    __tablename__ = "a1111_sessions"

    owner: Mapped[str] = mapped_column(String(160), primary_key=True)
    checkpoint: Mapped[str | None] = mapped_column(Text)  # a models.yaml id; None: the server-wide current one
    options: Mapped[str] = mapped_column(Text, default="{}")  # JSON object, checked and bounded when set
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CreditReservation(Base):
    """Credits taken from a key's quota for work not yet finished. Reserved at submission (the key's
    `credits_used` already counts them, so concurrent requests cannot overdraw), deleted when the work completes
    (the credits stay charged) or when it fails, is cancelled or is found interrupted at restart (they are given
    back). Deleting the row and giving the credits back happen in one transaction: never twice."""

    __tablename__ = "credit_reservations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    credits: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)  # None: a synchronous A1111 call
    runner: Mapped[str | None] = mapped_column(String(32))  # the server process that reserved them
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
