"""The job database: SQLAlchemy 2 models and engine set-up. SQLite by default, any SQLAlchemy URL by setting.

Two tables: `jobs` (one row per generation request of any dialect) and `result_files` (one row per image written to
the results directory, addressed by an unguessable token). Deleting a job deletes its file rows (ON DELETE CASCADE,
and the ORM cascade for backends that ignore it); the files themselves are removed by `server.jobs.files`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones and hands them back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    """One generation request, whatever dialect it came through.

    `task_address` is the public, unguessable handle (`GET /v2/tasks/{task_address}`); `id` is internal.
    `result_json` is the dialect's response body, rendered once when the job finished; images in it may be file
    references that are turned into URLs or base64 when the body is read (see `server.jobs.service`).
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_address: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    dialect: Mapped[str] = mapped_column(String(32), index=True)
    route: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(Text)
    request_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    seeds: Mapped[list[int] | None] = mapped_column(JSON)
    # The engine's queued_s, load_s, prepare_s, run_s; encode_s and store_s where the job service stored files.
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    result_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text)  # delivered by server.webhooks when the job finishes
    base_url: Mapped[str | None] = mapped_column(Text)  # the base URL the client used: for URLs in webhooks
    # The server process running the job and when it last said so: with a database shared by several processes,
    # only jobs whose runner stopped beating are failed as interrupted (server.jobs.service, shared_database).
    runner: Mapped[str | None] = mapped_column(String(32))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ttl_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)  # set when the job finishes

    files: Mapped[list[ResultFile]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="ResultFile.position"
    )


class ResultFile(Base):
    """An image written to `<data_dir>/results`, served at `/v2/results/{token}.{ext}` until `expires_at`."""

    __tablename__ = "result_files"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the results directory
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)  # seeds go past 2**31
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    job: Mapped[JobRecord] = relationship(back_populates="files")


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE
    cursor.execute("PRAGMA busy_timeout=10000")  # writers from several threads queue instead of failing
    cursor.close()


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine for `url`; SQLite gets WAL mode and is shared between threads."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker:
    # Objects stay readable after commit: the store hands them to other threads once their session is closed.
    return sessionmaker(engine, expire_on_commit=False)


def create_tables(engine: Engine) -> None:
    """Create missing tables, and add missing nullable columns to existing ones (additive schema changes need no
    migration tool; anything else would, e.g. Alembic)."""
    import server.access.db  # noqa: F401  (registers the access tables on Base; imported here to avoid a cycle)
    import server.webhooks.db  # noqa: F401  (registers the webhook_deliveries table)

    Base.metadata.create_all(engine)
    existing_tables = set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            present = {c["name"] for c in inspect(conn).get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    column_type = column.type.compile(dialect=engine.dialect)
                    conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {column_type}'))
