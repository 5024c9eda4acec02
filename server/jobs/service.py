"""JobService: submit a `GenerationRequest` to the engine as a recorded job, and keep the record true to the job.

A dialect hands over a `JobSpec`: the request, its wire request as JSON (no image bytes), and a `render` callable
that turns the engine's result into the dialect's response body. The service

1. submits to the engine (a refused request leaves no record), then records the job (`queued`);
2. persists `running` and progress from a housekeeping thread, which also sweeps expired results;
3. when the engine reports the job done (the done-callback runs on the engine's worker thread, so the work is handed
   to a small thread pool at once) writes the images to disk, calls `render`, and stores the body, the seeds and
   the file rows in one transaction; or stores the error (`failed` / `cancelled`).

The stored body is the body the synchronous call answers with, so `GET /v2/tasks/{task_address}` returns exactly
what the synchronous call would have. Images in it are file references (`StoredImage.as_url()` /
`.as_base64()`) that `result_body` turns into absolute URLs or base64 when the body is read: the database holds
no image bytes, and URLs follow the host the client used (or `public_base_url`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from PIL import Image

from pipelines.engine_api import EngineClient, JobHandle, JobStatus
from pipelines.errors import JobCancelled
from pipelines.request import GenerationRequest, GenerationResult
from server.errors import error_info
from server.images import b64, encode_image
from server.jobs.db import JobRecord, ResultFile, utcnow
from server.jobs.files import CONTENT_TYPES, EXTENSIONS, ResultFiles, WrittenFile
from server.jobs.store import FINISHED, RESTART_ERROR, JobStore, NewFile, NewJob

log = logging.getLogger("easel.jobs")

FILE_REF = "$easel_file"  # marks a file reference inside a stored body: {"$easel_file": token, "as": "url"}
RESULTS_PATH = "/v2/results"  # where result files are served: {RESULTS_PATH}/{token}.{ext}
SHUTDOWN_ERROR = "interrupted by a server shutdown"
ADDRESS_BYTES = 18  # task addresses: 144 random bits, 24 URL-safe characters


@dataclass(frozen=True)
class StoredImage:
    """A result image on disk, as a renderer sees it."""

    token: str
    content_type: str
    width: int
    height: int
    seed: int | None

    def as_url(self) -> dict[str, str]:
        """A placeholder that reads back as this image's absolute URL."""
        return {FILE_REF: self.token, "as": "url"}

    def as_base64(self) -> dict[str, str]:
        """A placeholder that reads back as this image's bytes, base64-encoded."""
        return {FILE_REF: self.token, "as": "base64"}


# (engine result, its images as stored files) -> the dialect's response body (JSON-serialisable).
Renderer = Callable[[GenerationResult, list[StoredImage]], dict[str, Any]]
Listener = Callable[[JobRecord], None]


class Accounting(Protocol):
    """Credits for the owner of a job (server.access.accounting): charged before the engine sees the job."""

    def charge(self, owner: str | None, images: int) -> int: ...

    def refund(self, owner: str | None, credits: int) -> None: ...

    def count_images(self, owner: str | None, images: int) -> None: ...


@dataclass
class JobSpec:
    """What a dialect submits. `route` names the endpoint (`flux`, `txt2img`, ...) and picks the result TTL."""

    request: GenerationRequest
    dialect: str
    route: str
    request_json: dict[str, Any]
    render: Renderer
    store_images: bool = True  # False: the renderer embeds what it needs (e.g. A1111's base64 + infotext)
    output_format: str = "png"  # png | jpeg | webp
    quality: int = 90  # jpeg / webp
    ttl_s: float | None = None  # None: the service's default
    owner: str | None = None  # who submitted it (API key id, user), for per-owner listings
    webhook_url: str | None = None  # POSTed to when the job finishes (server.webhooks)
    base_url: str | None = None  # the base URL the client used (server.jobs.http.submit fills it in)
    # Applied to each image before it is stored (e.g. GenPicz `upscale`); runs on a service thread, not the GPU's.
    postprocess: Callable[[Image.Image], Image.Image] | None = None


@dataclass
class Ticket:
    """A job this process submitted and is still watching."""

    job_id: str
    task_address: str
    spec: JobSpec
    handle: JobHandle
    finished: concurrent.futures.Future[JobRecord] = field(default_factory=concurrent.futures.Future)
    cancel_requested: bool = False
    persisted_running: bool = False
    persisted_progress: float = 0.0
    credits: int = 0  # charged to the owner's quota at submission


@dataclass(frozen=True)
class TaskView:
    """A job's state for a status endpoint: the record, with live status and progress while it runs here."""

    record: JobRecord
    status: str
    progress: float
    started_at: datetime | None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _timestamp(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, timezone.utc) if epoch else None


def _result_of(handle: JobHandle) -> GenerationResult:
    # JobHandle hands out its result only through the async wait(); the job is done, so a private loop returns at once.
    return asyncio.run(handle.wait(timeout=None))


class JobService:
    def __init__(
        self,
        store: JobStore,
        files: ResultFiles,
        *,
        default_ttl_s: float,
        sweep_interval_s: float = 300.0,
        progress_interval_s: float = 0.5,
        accounting: Accounting | None = None,
        shared_database: bool = False,
        heartbeat_interval_s: float = 5.0,
        stale_after_s: float = 60.0,
    ):
        self.store = store
        self.accounting = accounting
        # Several server processes (Ray ingress replicas) on one database: a process starting must not fail the
        # others' jobs, and a cancel answered by one must stop the job another runs.
        self.shared_database = shared_database
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stale_after_s = stale_after_s
        self.runner_id = uuid.uuid4().hex
        self.files = files
        self.default_ttl_s = default_ttl_s
        self.sweep_interval_s = sweep_interval_s
        self.progress_interval_s = progress_interval_s
        self._live: dict[str, Ticket] = {}
        self._listeners: list[Listener] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="easel-jobs")
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None

    # Lifecycle ---------------------------------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Create the tables and fail what a previous process left unfinished. Once per process, before any submit."""
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self.files.root.mkdir(parents=True, exist_ok=True)
            self.store.create_tables()
            recovered = self._recover()
            if recovered:
                log.warning("marked %d job(s) failed: %s", recovered, RESTART_ERROR)
            self._started = True

    def start_background(self) -> None:
        """Start the housekeeping thread: progress persistence and the expiry sweep."""
        self.ensure_started()
        if self._housekeeper is None:
            self._housekeeper = threading.Thread(target=self._housekeeping, name="easel-jobs-housekeeping", daemon=True)
            self._housekeeper.start()

    def close(self) -> None:
        """Stop background work, finish pending result writes, mark jobs still unfinished as failed."""
        self._stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(10)
        self._pool.shutdown(wait=True)
        if self._started:
            for ticket in list(self._live.values()):
                self.store.finish_failed(
                    ticket.job_id, status="failed", error_code="interrupted", error=SHUTDOWN_ERROR, now=utcnow()
                )
                self._settle(ticket)
        self.store.close()

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(record)` on a service thread after each job is finished and stored (e.g. webhook delivery)."""
        self._listeners.append(fn)

    # Submitting and waiting --------------------------------------------------------------------------------------

    def submit(self, engine: EngineClient, spec: JobSpec) -> Ticket:
        """Submit and record a job. Blocking (database): call from a thread. Engine refusals propagate, unrecorded."""
        self.ensure_started()
        spec.request.tags["owner"] = spec.owner  # the engine-side views (A1111 progress, interrupt) scope by it
        images = spec.request.batch_size * spec.request.n_iter
        credits = self.accounting.charge(spec.owner, images) if self.accounting else 0
        try:
            handle = engine.submit(spec.request)
        except BaseException:
            self._refund(spec.owner, credits)
            raise
        ticket = Ticket(uuid.uuid4().hex, secrets.token_urlsafe(ADDRESS_BYTES), spec, handle, credits=credits)
        new = NewJob(
            id=ticket.job_id,
            task_address=ticket.task_address,
            dialect=spec.dialect,
            route=spec.route,
            model=handle.request.model,
            request_json=spec.request_json,
            ttl_s=spec.ttl_s if spec.ttl_s is not None else self.default_ttl_s,
            owner=spec.owner,
            webhook_url=spec.webhook_url,
            base_url=spec.base_url,
            runner=self.runner_id,
        )
        try:
            self.store.add(new, utcnow())
        except BaseException:
            handle.cancel()  # an unrecorded job must not run
            self._refund(spec.owner, credits)
            raise
        self._live[ticket.job_id] = ticket
        handle.add_done_callback(lambda _: self._on_done(ticket))
        return ticket

    async def wait(self, ticket: Ticket, timeout: float | None) -> JobRecord:
        """The finished, stored record. Raises TimeoutError after `timeout` s; the job goes on regardless."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ticket.finished)), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {ticket.task_address} did not finish within {timeout} s") from None

    # Reading -----------------------------------------------------------------------------------------------------

    def task(self, task_address: str) -> TaskView | None:
        self.ensure_started()
        return self._view(self.store.get_by_address(task_address))

    def live_ticket(self, job_id: str) -> Ticket | None:
        """The ticket of a job this process runs and has not finished storing; None otherwise."""
        return self._live.get(job_id)

    def task_by_id(self, job_id: str) -> TaskView | None:
        """As `task`, by the job's id (dialects whose public id is the job id, e.g. Genrex's UUIDs)."""
        self.ensure_started()
        return self._view(self.store.get(job_id))

    def _view(self, record: JobRecord | None) -> TaskView | None:
        if record is None:
            return None
        ticket = self._live.get(record.id)
        if record.status in FINISHED or ticket is None:
            return TaskView(record, record.status, record.progress, record.started_at)
        status = ticket.handle.status
        live = status.value if status in (JobStatus.QUEUED, JobStatus.RUNNING) else "running"  # being stored
        progress = ticket.handle.progress
        started_at = _timestamp(progress.started_at) or record.started_at
        return TaskView(record, live, progress.fraction, started_at, ticket.cancel_requested)

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
        """Records newest first, filtered (e.g. a user's history in one dialect); `after`: keyset pagination from
        a (created_at, id) pair."""
        self.ensure_started()
        return self.store.list_jobs(
            dialect=dialect, owner=owner, status=status, limit=limit, offset=offset, after=after
        )

    def count_jobs(self, *, dialect: str | None = None, owner: str | None = None, status: str | None = None) -> int:
        self.ensure_started()
        return self.store.count_jobs(dialect=dialect, owner=owner, status=status)

    def delete(self, job_id: str) -> bool:
        """Remove a job's record and its result files (their URLs then answer 404); an unfinished job is cancelled
        first. False if there is no such job."""
        self.ensure_started()
        ticket = self._live.get(job_id)
        if ticket is not None:
            ticket.cancel_requested = True
            ticket.handle.cancel()
        if self.store.get(job_id) is None:
            return False
        self.files.remove(self.store.delete(job_id))
        return True

    def result_body(self, record: JobRecord, base_url: str) -> dict[str, Any] | None:
        """The stored body with its file references resolved: absolute URLs under `base_url`, or base64."""
        if record.result_json is None:
            return None
        files = {f.token: f for f in self.store.files_of(record.id)}  # only this job's files can be referenced

        def resolve(node: Any) -> Any:
            if isinstance(node, dict):
                if FILE_REF in node and set(node) == {FILE_REF, "as"}:
                    return self._resolve_ref(files.get(str(node[FILE_REF])), str(node["as"]), base_url)
                return {k: resolve(v) for k, v in node.items()}
            if isinstance(node, list):
                return [resolve(v) for v in node]
            return node

        return resolve(record.result_json)

    def _resolve_ref(self, stored: ResultFile | None, kind: str, base_url: str) -> str | None:
        if stored is None:
            return None
        if kind == "url":
            return file_url(base_url, stored.token, stored.content_type)
        data = self.files.read(stored.path)
        return b64(data) if data is not None else None

    def file(self, token: str) -> tuple[ResultFile, bytes] | None:
        """A result file and its bytes, if it exists and has not expired."""
        self.ensure_started()
        stored = self.store.file(token)
        if stored is None or stored.expires_at <= utcnow():
            return None
        data = self.files.read(stored.path)
        return (stored, data) if data is not None else None

    # Cancelling --------------------------------------------------------------------------------------------------

    def cancel(self, task_address: str) -> Ticket | TaskView | None:
        """Ask a job to stop. Returns its ticket (wait on `ticket.finished`), its view if already finished or not
        run by this process, or None if unknown."""
        self.ensure_started()
        record = self.store.get_by_address(task_address)
        if record is None:
            return None
        ticket = self._live.get(record.id)
        if record.status in FINISHED:
            return TaskView(record, record.status, record.progress, record.started_at)
        if ticket is None:  # unfinished but not ours: nothing runs it any more
            self.store.finish_failed(
                record.id, status="cancelled", error_code="cancelled", error="the task was cancelled", now=utcnow()
            )
            return self.task(task_address)
        ticket.cancel_requested = True
        ticket.handle.cancel()
        return ticket

    # Completion (service threads) --------------------------------------------------------------------------------

    def _on_done(self, ticket: Ticket) -> None:
        """Engine worker thread: hand the slow part to the pool."""
        try:
            self._pool.submit(self._finish, ticket)
        except RuntimeError:  # shutting down: close() marks the job
            log.warning("job %s finished during shutdown; not stored", ticket.task_address)

    def _finish(self, ticket: Ticket) -> None:
        try:
            if ticket.handle.error is None and ticket.handle.status == JobStatus.COMPLETED:
                self._store_result(ticket)
            else:
                self._store_error(ticket, ticket.handle.error)
        except Exception as e:
            log.exception("storing the result of job %s failed", ticket.task_address)
            self.store.finish_failed(
                ticket.job_id,
                status="failed",
                error_code="result_storage_failed",
                error=f"the result could not be stored ({type(e).__name__}); the details are in the server log",
                now=utcnow(),
            )
        finally:
            record = self._settle(ticket)
        self._account(ticket, record)
        if record is not None:
            for fn in self._listeners:
                try:
                    fn(record)
                except Exception:
                    log.exception("job listener failed for %s", ticket.task_address)

    def _refund(self, owner: str | None, credits: int) -> None:
        if self.accounting is not None and credits:
            self.accounting.refund(owner, credits)

    def _account(self, ticket: Ticket, record: JobRecord | None) -> None:
        """Completed: count the images. Anything else produced nothing: give the credits back."""
        if self.accounting is None:
            return
        try:
            if record is not None and record.status == "completed":
                self.accounting.count_images(ticket.spec.owner, len(record.seeds or []))
            else:
                self._refund(ticket.spec.owner, ticket.credits)
        except Exception:
            log.exception("accounting failed for job %s", ticket.task_address)

    def _store_result(self, ticket: Ticket) -> None:
        spec = ticket.spec
        result = _result_of(ticket.handle)
        written: list[WrittenFile] = []
        stored: list[StoredImage] = []
        # Encoding and writing happen here, in the pool, not in a request: timed here for the Server-Timing header.
        timings = {k: round(float(v), 4) for k, v in result.timings.items()}
        encode_s = store_s = 0.0
        try:
            if spec.store_images:
                content_type = CONTENT_TYPES[spec.output_format]
                for i, image in enumerate(result.images):
                    t0 = time.perf_counter()
                    if spec.postprocess is not None:
                        image = spec.postprocess(image)
                    data = encode_image(image, spec.output_format, spec.quality)
                    t1 = time.perf_counter()
                    w = self.files.write(data, content_type)
                    encode_s += t1 - t0
                    store_s += time.perf_counter() - t1
                    written.append(w)
                    seed = result.seeds[i] if i < len(result.seeds) else None
                    stored.append(StoredImage(w.token, content_type, image.width, image.height, seed))
            body = spec.render(result, stored)
            new_files = [
                NewFile(w.token, i, w.path, w.content_type, w.size_bytes, s.width, s.height, s.seed)
                for i, (w, s) in enumerate(zip(written, stored, strict=True))
            ]
            done = self.store.finish_completed(
                ticket.job_id,
                seeds=list(result.seeds),
                result_json=body,
                files=new_files,
                now=utcnow(),
                started_at=_timestamp(ticket.handle.progress.started_at),
                timings={**timings, "encode_s": round(encode_s, 4), "store_s": round(store_s, 4)}
                if spec.store_images
                else timings,
            )
        except BaseException:
            self.files.remove(w.path for w in written)
            raise
        if not done:  # finished meanwhile (shutdown): the files belong to nothing
            self.files.remove(w.path for w in written)

    def _store_error(self, ticket: Ticket, error: BaseException | None) -> None:
        started_at = _timestamp(ticket.handle.progress.started_at)
        if isinstance(error, JobCancelled) or ticket.handle.status == JobStatus.CANCELLED:
            if ticket.cancel_requested:
                status, code, message = "cancelled", "cancelled", "the task was cancelled"
            else:  # cancelled by the engine itself (shutdown), not by the client
                status, code, message = "failed", "interrupted", str(error or SHUTDOWN_ERROR)
        else:
            info = error_info(error or RuntimeError("the job ended without a result"))
            status, code, message = "failed", info.code or "generation_failed", info.message
        self.store.finish_failed(
            ticket.job_id, status=status, error_code=code, error=message, now=utcnow(), started_at=started_at
        )

    def _settle(self, ticket: Ticket) -> JobRecord | None:
        """Forget a finished ticket and wake its waiters with the stored record."""
        self._live.pop(ticket.job_id, None)
        try:
            record = self.store.get(ticket.job_id)
        except Exception as e:
            if not ticket.finished.done():
                ticket.finished.set_exception(e)
            return None
        if not ticket.finished.done():
            if record is None:
                ticket.finished.set_exception(LookupError(f"job {ticket.task_address} vanished"))
            else:
                ticket.finished.set_result(record)
        return record

    # Housekeeping ------------------------------------------------------------------------------------------------

    def _recover(self) -> int:
        now = utcnow()
        if not self.shared_database:
            return self.store.recover_interrupted(now, RESTART_ERROR)
        stale_before = now - timedelta(seconds=self.stale_after_s)
        return self.store.recover_interrupted(now, RESTART_ERROR, stale_before=stale_before)

    def _housekeeping(self) -> None:
        next_sweep = next_beat = time.monotonic()
        while not self._stop.wait(self.progress_interval_s):
            try:
                self._persist_progress()
                if self.shared_database:
                    self._stop_jobs_finished_elsewhere()
                    if time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + self.heartbeat_interval_s
                        self.store.heartbeat(self.runner_id, utcnow())
                        recovered = self._recover()
                        if recovered:
                            log.warning("marked %d job(s) of stopped server processes failed", recovered)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval_s
                    self.sweep()
            except Exception:
                log.exception("job housekeeping failed; retrying")

    def _stop_jobs_finished_elsewhere(self) -> None:
        """A job this process runs that the database records as finished was cancelled through another process."""
        live = list(self._live.values())
        if not live:
            return
        for job_id in self.store.finished_ids([t.job_id for t in live]):
            ticket = self._live.get(job_id)
            if ticket is not None and not ticket.cancel_requested:
                ticket.cancel_requested = True
                ticket.handle.cancel()

    def _persist_progress(self) -> None:
        """Write `running` and progress of live jobs, so other readers (and a crash) see where they were."""
        for ticket in list(self._live.values()):
            if ticket.handle.status != JobStatus.RUNNING:
                continue
            progress = ticket.handle.progress
            if ticket.persisted_running and abs(progress.fraction - ticket.persisted_progress) < 0.01:
                continue
            started_at = _timestamp(progress.started_at) or utcnow()
            self.store.mark_running(ticket.job_id, started_at, progress.fraction)
            ticket.persisted_running, ticket.persisted_progress = True, progress.fraction

    def sweep(self, now: datetime | None = None) -> int:
        """Delete expired jobs and files, and files no record points to. Returns the number of rows' files removed."""
        self.ensure_started()
        paths = self.store.delete_expired(now or utcnow())
        self.files.remove(paths)
        candidates = self.files.stored()
        for i in range(0, len(candidates), 500):
            chunk = candidates[i : i + 500]
            known = self.store.known_paths(chunk)
            self.files.remove(p for p in chunk if p not in known)
        if paths:
            log.info("sweep: removed %d expired result file(s)", len(paths))
        return len(paths)


def file_url(base_url: str, token: str, content_type: str) -> str:
    return f"{base_url.rstrip('/')}{RESULTS_PATH}/{token}.{EXTENSIONS[content_type]}"
