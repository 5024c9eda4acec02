"""The job-store and JobService tests of test_jobs.py again, on PostgreSQL (the database a cluster of ingress replicas
shares), plus a race only a shared database has. Runs when EASEL_TEST_POSTGRES_URL names a server, e.g.
postgresql+psycopg://easel@127.0.0.1:55432/easel_test (`.ci/run` starts one when the PostgreSQL binaries are on the
machine); skipped otherwise. Each test starts from empty tables."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.jobs import JobService
from server.jobs.db import Base, create_tables, make_engine, utcnow
from server.jobs.files import ResultFiles
from server.jobs.store import JobStore
from tests.unit import test_jobs

POSTGRES_URL = os.environ.get("EASEL_TEST_POSTGRES_URL")

if not POSTGRES_URL:
    pytest.skip("EASEL_TEST_POSTGRES_URL is not set (no PostgreSQL server)", allow_module_level=True)

# Every test of test_jobs.py that works on the database through the `store` or `service` fixture, which are
# redefined below to point at PostgreSQL. (Tests that open their own SQLite file stay there.)
DATABASE_FIXTURES = {"store", "service"}
for _name, _test in vars(test_jobs).items():
    if _name.startswith("test_") and DATABASE_FIXTURES & set(inspect.signature(_test).parameters):
        globals()[_name] = _test

CancellingFakeEngine = test_jobs.CancellingFakeEngine
engine = test_jobs.engine  # the fake engine fixture the service tests use


def _empty_database(url: str) -> None:
    db = make_engine(url)
    try:
        create_tables(db)  # registers every table (jobs, access, webhooks) on Base
        Base.metadata.drop_all(db)
        create_tables(db)
    finally:
        db.dispose()


@pytest.fixture
def store() -> Iterator[JobStore]:
    assert POSTGRES_URL
    _empty_database(POSTGRES_URL)
    s = JobStore(POSTGRES_URL)
    yield s
    s.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[JobService]:
    assert POSTGRES_URL
    _empty_database(POSTGRES_URL)
    svc = JobService(JobStore(POSTGRES_URL), ResultFiles(tmp_path / "results"), default_ttl_s=60)
    yield svc
    svc.close()


def test_postgres_is_what_runs() -> None:
    assert POSTGRES_URL and make_engine(POSTGRES_URL).dialect.name == "postgresql"


def test_concurrent_finishes_of_one_job_have_one_winner(store: JobStore) -> None:
    """Two ingress replicas (or a cancel racing a completion) finishing the same job: the row lock lets exactly one
    write its outcome; the record then shows that one."""
    now = utcnow()
    store.add(test_jobs.new_job("race"), now)
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def finish(i: int) -> None:
        barrier.wait()
        if i % 2:
            won = store.finish_failed("race", status="cancelled", error_code="cancelled", error="c", now=now)
        else:
            won = store.finish_completed("race", seeds=[i], result_json={"i": i}, files=[], now=now)
        if won:
            wins.append("cancelled" if i % 2 else f"completed-{i}")

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    record = store.get("race")
    assert record.status == wins[0].split("-")[0]
    if record.status == "completed":
        assert record.seeds == [int(wins[0].split("-")[1])]
