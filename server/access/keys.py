"""API keys: create (the secret is returned once), list, revoke, authenticate, and the credit quota.

Secrets are 256-bit random tokens, so a plain SHA-256 is a sound verifier (no password-style stretching needed);
the database holds only that hash. Lookups are by hash, so comparing secrets never happens in Python.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from server.access.db import ApiKey, CreditReservation
from server.jobs.db import JobRecord, make_session_factory, utcnow

SECRET_PREFIX = "esk_"  # recognisable in logs and secret scanners
PLANS: dict[str, int] = {"starter": 10, "pro": 30, "studio": 60}  # requests per minute (seed 001)
CUSTOM_PLAN = "custom"


class KeyConfigError(ValueError):
    """A key operation that cannot be done (unknown plan, custom plan without a rate limit, unknown key)."""


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    secret: str  # shown once
    webhook_secret: str
    plan: str
    rate_limit: int
    quota: int | None
    admin: bool


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    plan: str
    rate_limit: int
    quota: int | None
    credits_used: int
    images_generated: int
    admin: bool
    webhook_secret: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def credits_remaining(self) -> int | None:
        return None if self.quota is None else max(0, self.quota - self.credits_used)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.id,
        row.name,
        row.prefix,
        row.plan,
        row.rate_limit,
        row.quota,
        row.credits_used,
        row.images_generated,
        row.admin,
        row.webhook_secret,
        row.created_at,
        row.revoked_at,
    )


def plan_rate_limit(plan: str, rate_limit: int | None) -> int:
    if rate_limit is not None:
        if rate_limit < 1:
            raise KeyConfigError("--rate-limit must be at least 1 request per minute")
        return rate_limit
    if plan == CUSTOM_PLAN:
        raise KeyConfigError("plan 'custom' needs --rate-limit")
    if plan not in PLANS:
        raise KeyConfigError(f"unknown plan '{plan}'; plans: {', '.join([*PLANS, CUSTOM_PLAN])}")
    return PLANS[plan]


class KeyStore:
    def __init__(self, engine: Engine):
        self._session = make_session_factory(engine)

    def create(
        self,
        name: str,
        plan: str = "starter",
        rate_limit: int | None = None,
        quota: int | None = None,
        admin: bool = False,
    ) -> NewKey:
        if plan not in PLANS and plan != CUSTOM_PLAN:
            raise KeyConfigError(f"unknown plan '{plan}'; plans: {', '.join([*PLANS, CUSTOM_PLAN])}")
        if quota is not None and quota < 0:
            raise KeyConfigError("--quota must be 0 or more credits")
        limit = plan_rate_limit(plan, rate_limit)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        webhook_secret = "whsec_" + secrets.token_urlsafe(32)
        key_id = "key_" + uuid.uuid4().hex[:16]
        row = ApiKey(
            id=key_id,
            name=name,
            secret_hash=hash_secret(secret),
            prefix=secret[: len(SECRET_PREFIX) + 4],
            plan=plan,
            rate_limit=limit,
            quota=quota,
            credits_used=0,
            images_generated=0,
            admin=admin,
            webhook_secret=webhook_secret,
            created_at=utcnow(),
        )
        with self._session.begin() as session:
            session.add(row)
        return NewKey(key_id, name, secret, webhook_secret, plan, limit, quota, admin)

    def list(self, include_revoked: bool = False) -> list[KeyInfo]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self._session() as session:
            return [_info(row) for row in session.scalars(query)]

    def get(self, key_id: str) -> KeyInfo | None:
        with self._session() as session:
            row = session.get(ApiKey, key_id)
            return _info(row) if row is not None else None

    def revoke(self, key_id_or_name: str) -> int:
        """Revoke by id, or every active key with that name. Returns how many were revoked."""
        with self._session.begin() as session:
            result = session.execute(
                update(ApiKey)
                .where(ApiKey.revoked_at.is_(None))
                .where((ApiKey.id == key_id_or_name) | (ApiKey.name == key_id_or_name))
                .values(revoked_at=utcnow())
            )
            return result.rowcount or 0

    def any_keys(self) -> bool:
        """Whether keys were ever created. Revoked ones count: revoking the last key must not reopen the server."""
        with self._session() as session:
            return session.scalar(select(ApiKey.id).limit(1)) is not None

    def authenticate(self, secret: str) -> KeyInfo | None:
        """The active key with this secret, or None."""
        with self._session() as session:
            row = session.scalar(
                select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))
            )
            return _info(row) if row is not None else None

    # Credits -------------------------------------------------------------------------------------------------------

    def charge(self, key_id: str, credits: int) -> bool:
        """Take `credits` from the key's quota in one conditional UPDATE (concurrent charges cannot overdraw).
        False if the quota does not cover them."""
        with self._session.begin() as session:
            result = session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id)
                .where(ApiKey.quota.is_(None) | (ApiKey.credits_used + credits <= ApiKey.quota))
                .values(credits_used=ApiKey.credits_used + credits)
            )
            return bool(result.rowcount)

    def refund(self, key_id: str, credits: int) -> None:
        """Give back credits charged for work that produced nothing (refused by the engine, failed, cancelled)."""
        with self._session.begin() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.credits_used >= credits)
                .values(credits_used=ApiKey.credits_used - credits)
            )

    def reserve(self, key_id: str, credits: int, job_id: str | None, runner: str | None) -> str | None:
        """Take `credits` from the quota and record the reservation, in one transaction. Its id, or None if the
        quota does not cover them."""
        reservation_id = uuid.uuid4().hex
        with self._session.begin() as session:
            result = session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id)
                .where(ApiKey.quota.is_(None) | (ApiKey.credits_used + credits <= ApiKey.quota))
                .values(credits_used=ApiKey.credits_used + credits)
            )
            if not result.rowcount:
                return None
            row = CreditReservation(
                id=reservation_id, key_id=key_id, credits=credits, job_id=job_id, runner=runner, created_at=utcnow()
            )
            session.add(row)
        return reservation_id

    def settle(self, reservation_id: str | None, key_id: str | None = None, images: int = 0) -> bool:
        """The work completed: the reserved credits stay charged, and `images` are counted to `key_id`, in one
        transaction. False if the reservation was already closed (nothing is counted then)."""
        with self._session.begin() as session:
            if reservation_id is not None:
                result = session.execute(delete(CreditReservation).where(CreditReservation.id == reservation_id))
                if not result.rowcount:
                    return False
            if key_id is not None and images:
                session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(images_generated=ApiKey.images_generated + images)
                )
            return True

    def release(self, reservation_id: str) -> int:
        """The work produced nothing: give the reserved credits back, exactly once. Returns the credits returned."""
        with self._session.begin() as session:
            row = session.get(CreditReservation, reservation_id, with_for_update=True)
            if row is None:
                return 0
            gone = session.execute(delete(CreditReservation).where(CreditReservation.id == reservation_id))
            if not gone.rowcount:  # closed by another process meanwhile
                return 0
            session.execute(
                update(ApiKey)
                .where(ApiKey.id == row.key_id, ApiKey.credits_used >= row.credits)
                .values(credits_used=ApiKey.credits_used - row.credits)
            )
            return row.credits

    def reservation_of_job(self, job_id: str) -> str | None:
        with self._session() as session:
            return session.scalar(select(CreditReservation.id).where(CreditReservation.job_id == job_id))

    def recover_reservations(self, stale_before: datetime | None = None) -> tuple[int, int]:
        """Close the reservations a stopped process left: those of completed jobs are charged, those of jobs that
        failed, were cancelled or were interrupted (and of vanished ones) are given back. Reservations without a
        job (synchronous A1111 calls) are given back when made before `stale_before`, or all of them when it is
        None (the only process on the database is starting: nothing of its own runs yet). Jobs still unfinished
        (run by another process) keep theirs. Returns (reservations charged, credits returned)."""
        query = select(CreditReservation, JobRecord.status).outerjoin(
            JobRecord, JobRecord.id == CreditReservation.job_id
        )
        with self._session() as session:
            rows = [(r.id, r.job_id, r.created_at, status) for r, status in session.execute(query)]
        charged = returned = 0
        for reservation_id, job_id, created_at, status in rows:
            if status in ("queued", "running"):
                continue
            if job_id is None and stale_before is not None and created_at >= stale_before:
                continue
            if status == "completed":
                charged += int(self.settle(reservation_id))
            else:
                returned += self.release(reservation_id)
        return charged, returned

    def count_images(self, key_id: str, images: int) -> None:
        with self._session.begin() as session:
            session.execute(
                update(ApiKey).where(ApiKey.id == key_id).values(images_generated=ApiKey.images_generated + images)
            )
