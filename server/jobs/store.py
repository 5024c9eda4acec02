"""JobStore: create, update, query and expire job records. Synchronous SQLAlchemy; call it from threads.

Every state change is one short transaction, and a finished job never changes again (the updates are guarded by
`status IN (queued, running)`), so a late progress write or a second finish cannot undo a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from server.jobs.db import JobRecord, ResultFile, create_tables, make_engine, make_session_factory

UNFINISHED = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled")
RESTART_ERROR = "interrupted by a server restart"
SWEEP_BATCH = 500


@dataclass(frozen=True)
class NewJob:
    id: str
    task_address: str
    dialect: str
    route: str
    model: str
    request_json: dict[str, Any]
    ttl_s: float
    owner: str | None = None
    webhook_url: str | None = None
    base_url: str | None = None
    runner: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class NewFile:
    token: str
    position: int
    path: str  # relative to the results directory
    content_type: str
    size_bytes: int
    width: int
    height: int
    seed: int | None


class JobStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        self._session = make_session_factory(self.engine)

    def create_tables(self) -> None:
        create_tables(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _begin(self) -> Session:
        return self._session.begin()

    # Writes ------------------------------------------------------------------------------------------------------

    def add(self, new: NewJob, now: datetime) -> JobRecord:
        record = JobRecord(
            id=new.id,
            task_address=new.task_address,
            dialect=new.dialect,
            route=new.route,
            owner=new.owner,
            status="queued",
            model=new.model,
            request_json=new.request_json,
            progress=0.0,
            webhook_url=new.webhook_url,
            base_url=new.base_url,
            runner=new.runner,
            request_id=new.request_id,
            heartbeat_at=now,
            ttl_s=new.ttl_s,
            created_at=now,
        )
        with self._begin() as session:
            session.add(record)
        return record

    def delete(self, job_id: str) -> list[str]:
        """Remove a job and its file rows; returns the file paths to delete from disk."""
        with self._begin() as session:
            paths = list(session.scalars(select(ResultFile.path).where(ResultFile.job_id == job_id)))
            session.execute(delete(ResultFile).where(ResultFile.job_id == job_id))
            session.execute(delete(JobRecord).where(JobRecord.id == job_id))
        return paths

    def mark_running(self, job_id: str, started_at: datetime, progress: float) -> None:
        with self._begin() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.status.in_(UNFINISHED))
                .values(status="running", started_at=started_at, progress=progress)
            )

    def finish_completed(
        self,
        job_id: str,
        *,
        seeds: list[int],
        result_json: dict[str, Any],
        files: Sequence[NewFile],
        now: datetime,
        started_at: datetime | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        """Store the result and its file rows in one transaction. False if the job was already finished."""
        with self._begin() as session:
            record = session.get(JobRecord, job_id, with_for_update=True)
            if record is None or record.status not in UNFINISHED:
                return False
            expires_at = now + timedelta(seconds=record.ttl_s)
            record.status = "completed"
            record.progress = 1.0
            record.seeds = seeds
            record.timings = timings
            record.result_json = result_json
            record.started_at = record.started_at or started_at or now
            record.finished_at = now
            record.expires_at = expires_at
            for f in files:
                session.add(ResultFile(**vars(f), job_id=job_id, created_at=now, expires_at=expires_at))
        return True

    def finish_failed(
        self,
        job_id: str,
        *,
        status: str,
        error_code: str,
        error: str,
        now: datetime,
        started_at: datetime | None = None,
    ) -> bool:
        """Mark a job failed or cancelled with a client-safe message. False if it was already finished."""
        with self._begin() as session:
            record = session.get(JobRecord, job_id, with_for_update=True)
            if record is None or record.status not in UNFINISHED:
                return False
            record.status = status
            record.error_code = error_code
            record.error = error
            record.started_at = record.started_at or started_at
            record.finished_at = now
            record.expires_at = now + timedelta(seconds=record.ttl_s)
        return True

    def heartbeat(self, runner: str, now: datetime) -> None:
        """This process still runs its unfinished jobs."""
        with self._begin() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.runner == runner, JobRecord.status.in_(UNFINISHED))
                .values(heartbeat_at=now)
            )

    def finished_ids(self, job_ids: Sequence[str]) -> list[str]:
        """Which of these jobs the database already records as finished (e.g. cancelled through another process)."""
        with self._session() as session:
            query = select(JobRecord.id).where(JobRecord.id.in_(list(job_ids)), JobRecord.status.in_(FINISHED))
            return list(session.scalars(query))

    def recover_interrupted(
        self, now: datetime, message: str = RESTART_ERROR, stale_before: datetime | None = None
    ) -> int:
        """Jobs still queued or running whose process is gone: mark them failed. At start-up of the only process
        using the database, that is all of them; with a shared database (`stale_before`), those whose runner has
        not beaten since then."""
        query = select(JobRecord.id).where(JobRecord.status.in_(UNFINISHED))
        if stale_before is not None:
            query = query.where(or_(JobRecord.heartbeat_at.is_(None), JobRecord.heartbeat_at < stale_before))
        with self._begin() as session:
            ids = list(session.scalars(query))
        for job_id in ids:
            self.finish_failed(job_id, status="failed", error_code="interrupted", error=message, now=now)
        return len(ids)

    def delete_expired(self, now: datetime) -> list[str]:
        """Delete expired jobs and expired file rows; returns the file paths to delete from disk."""
        paths: list[str] = []
        while True:
            with self._begin() as session:
                job_ids = list(
                    session.scalars(select(JobRecord.id).where(JobRecord.expires_at < now).limit(SWEEP_BATCH))
                )
                columns = select(ResultFile.token, ResultFile.path)
                file_rows = dict(session.execute(columns.where(ResultFile.expires_at < now).limit(SWEEP_BATCH)).all())
                if job_ids:
                    file_rows.update(session.execute(columns.where(ResultFile.job_id.in_(job_ids))).all())
                if not job_ids and not file_rows:
                    return paths
                if file_rows:
                    session.execute(delete(ResultFile).where(ResultFile.token.in_(list(file_rows))))
                if job_ids:
                    session.execute(delete(JobRecord).where(JobRecord.id.in_(job_ids)))
            paths.extend(file_rows.values())

    # Reads -------------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._session() as session:
            return session.get(JobRecord, job_id)

    def get_by_address(self, task_address: str) -> JobRecord | None:
        with self._session() as session:
            return session.scalar(select(JobRecord).where(JobRecord.task_address == task_address))

    def files_of(self, job_id: str) -> list[ResultFile]:
        with self._session() as session:
            query = select(ResultFile).where(ResultFile.job_id == job_id).order_by(ResultFile.position)
            return list(session.scalars(query))

    def file(self, token: str) -> ResultFile | None:
        with self._session() as session:
            return session.get(ResultFile, token)

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        with self._session() as session:
            return set(session.scalars(select(ResultFile.path).where(ResultFile.path.in_(list(paths)))))

    def list_jobs(
        self,
        *,
        dialect: str | None = None,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        after: tuple[datetime, str] | None = None,
    ) -> list[JobRecord]:
        """Newest first, filtered (GenPicz history per owner, Genrex task lists). `after`: keyset pagination, the
        records that come after the job with this (created_at, id) in this order (a cursor that new jobs cannot
        shift, and that still works when that job has been deleted)."""
        query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
        query = query.where(*_filters(dialect, owner, status))
        if after is not None:
            created_at, job_id = after
            query = query.where(
                or_(
                    JobRecord.created_at < created_at,
                    and_(JobRecord.created_at == created_at, JobRecord.id > job_id),
                )
            )
        with self._session() as session:
            return list(session.scalars(query))

    def count_jobs(self, *, dialect: str | None = None, owner: str | None = None, status: str | None = None) -> int:
        query = select(func.count()).select_from(JobRecord).where(*_filters(dialect, owner, status))
        with self._session() as session:
            return int(session.scalar(query) or 0)


def _filters(dialect: str | None, owner: str | None, status: str | None) -> list[Any]:
    conditions: list[Any] = []
    if dialect is not None:
        conditions.append(JobRecord.dialect == dialect)
    if owner is not None:
        conditions.append(JobRecord.owner == owner)
    if status is not None:
        conditions.append(JobRecord.status == status)
    return conditions
