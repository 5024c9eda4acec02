"""Jobs shared by every dialect: records in a SQL database, result files on disk, the JobService that ties them to
the engine. See service.py for the flow."""

from __future__ import annotations

from fastapi import Request

from server.jobs.files import ResultFiles
from server.jobs.service import JobService, JobSpec, StoredImage, TaskView, Ticket
from server.jobs.store import JobStore
from server.settings import Settings

__all__ = ["JobService", "JobSpec", "StoredImage", "TaskView", "Ticket", "create_job_service", "get_job_service"]


def create_job_service(settings: Settings) -> JobService:
    """A service on the settings' database and `<data_dir>/results`, charging API keys' credits. Opens nothing yet
    (see ensure_started)."""
    from server.access.accounting import Accounting
    from server.access.keys import KeyStore

    store = JobStore(settings.resolved_database_url)
    return JobService(
        store,
        ResultFiles(settings.data_dir / "results"),
        default_ttl_s=settings.result_ttl_s,
        sweep_interval_s=settings.sweep_interval_s,
        accounting=Accounting(KeyStore(store.engine), settings.credits_per_image),
        shared_database=settings.shared_database,
    )


def get_job_service(request: Request) -> JobService:
    """FastAPI dependency: the app's JobService (created by create_app)."""
    return request.app.state.jobs
