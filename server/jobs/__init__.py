"""Jobs shared by every dialect: records in a SQL database, result files on disk, the JobService that ties them to
the engine. See service.py for the flow."""

from __future__ import annotations

from fastapi import Request

from server.jobs import links as links_module
from server.jobs.files import ResultFiles
from server.jobs.links import ResultLinks
from server.jobs.service import JobService, JobSpec, StoredImage, TaskView, Ticket
from server.jobs.store import JobStore
from server.secretfile import persistent_secret
from server.settings import Settings

__all__ = ["JobService", "JobSpec", "StoredImage", "TaskView", "Ticket", "create_job_service", "get_job_service"]


def create_job_service(settings: Settings) -> JobService:
    """A service on the settings' database and `<data_dir>/results`, charging API keys' credits. Opens nothing yet
    (see ensure_started)."""
    from server.access.accounting import Accounting
    from server.access.keys import KeyStore

    store = JobStore(settings.resolved_database_url)
    links = None if settings.result_urls_require_auth else ResultLinks(lambda: result_url_secret(settings))
    return JobService(
        store,
        ResultFiles(settings.data_dir / "results"),
        default_ttl_s=settings.result_ttl_s,
        sweep_interval_s=settings.sweep_interval_s,
        accounting=Accounting(KeyStore(store.engine), settings.credits_per_image),
        shared_database=settings.shared_database,
        unattached_stale_after_s=settings.request_timeout_s + settings.sync_timeout_s,
        links=links,
    )


def result_url_secret(settings: Settings) -> str:
    """`result_url_secret`, else one made once and kept in <data_dir>/result_url_secret (shared by every process
    on the data directory, kept across restarts, so URLs handed out stay valid)."""
    if settings.result_url_secret is not None:
        return settings.result_url_secret.get_secret_value()
    return persistent_secret(settings.data_dir / links_module.SECRET_FILE, "rusec_")


def get_job_service(request: Request) -> JobService:
    """FastAPI dependency: the app's JobService (created by create_app)."""
    return request.app.state.jobs
