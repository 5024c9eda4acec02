"""WebhookService: queue a signed delivery when a job with a `webhook_url` finishes, and deliver it from a worker.

1. `on_job_finished` (a JobService listener, on a service thread) renders the payload and inserts a `pending` row;
2. a dispatcher thread finds due rows in the database (its own, other processes', and those a previous process left)
   and hands them to a small pool, at most `webhook_concurrency` in flight and `webhook_per_host_concurrency` per host;
3. each attempt claims its row (see store.py), restamps and signs the body, re-vets the target (DNS may have changed
   since submission), and POSTs to the vetted address: no redirects, no proxies from the environment, the response
   body never read. 2xx: `delivered`. Anything else is a failed attempt, retried after base * 2**(n-1) s (capped)
   until `webhook_max_attempts`, then `failed`. `last_status_code` / `last_error` say what happened.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx

from server.fetch import FetchError, IPAddress, Resolver, system_resolver
from server.jobs.db import JobRecord, utcnow
from server.jobs.service import JobService
from server.settings import Settings
from server.webhooks.db import WebhookDelivery
from server.webhooks.payload import EVENTS, build_payload, render_body, restamp
from server.webhooks.policy import TargetRefused, vet_target
from server.webhooks.signing import genpicz_signature, server_secret, signature_header
from server.webhooks.store import DeliveryStore, NewDelivery

log = logging.getLogger("easel.webhooks")

KEY_OWNER_PREFIX = "key_"  # jobs owned by an API key are signed with that key's webhook secret
USER_AGENT = "easel-webhooks/1"
SWEEP_INTERVAL_S = 3600.0
# KeyLookup: an API key id -> its webhook secret, None if there is no such key.
KeyLookup = Callable[[str], str | None]


class PermanentFailure(Exception):
    """An attempt that no retry could make succeed (e.g. the owning key no longer exists)."""


def key_store_lookup(jobs: JobService) -> KeyLookup:
    """Webhook secrets of API keys, read from the access tables in the job database."""
    from server.access.keys import KeyStore

    keys = KeyStore(jobs.store.engine)

    def lookup(key_id: str) -> str | None:
        info = keys.get(key_id)
        return info.webhook_secret if info is not None else None

    return lookup


def retry_delay_s(attempt: int, settings: Settings) -> float:
    """How long to wait after failed attempt number `attempt` (1-based)."""
    return min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_s)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host
    except (httpx.InvalidURL, TypeError, ValueError):
        return ""


class WebhookService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobService,
        *,
        key_lookup: KeyLookup | None = None,
        resolver: Resolver | None = None,
    ):
        self.settings = settings
        self.jobs = jobs
        self.store = DeliveryStore(jobs.store.engine)
        self._key_lookup = key_lookup or key_store_lookup(jobs)
        self._resolver = resolver or system_resolver(settings.webhook_timeout_s)
        self._server_secret: str | None = None
        # An attempt may take a DNS lookup plus connect, write and read timeouts; a lease outlives all of them.
        self.lease_s = 4 * settings.webhook_timeout_s + 30
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # delivery id -> host
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # Wiring ------------------------------------------------------------------------------------------------------

    def install(self, app: Any) -> None:
        """Register the job listener and expose the service as `app.state.webhooks` (status routes read it)."""
        app.state.webhooks = self
        self.jobs.add_listener(self.on_job_finished)

    def start(self) -> None:
        """Start delivering (blocking: creates tables; call off the event loop). Pending rows are simply due."""
        self.jobs.ensure_started()
        self.signing_secret(None)  # create the server secret now, not on a delivery thread
        if self._dispatcher is not None:
            return
        self._stop.clear()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.webhook_concurrency, thread_name_prefix="easel-webhook"
        )
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="easel-webhook-dispatch", daemon=True)
        self._dispatcher.start()

    def close(self) -> None:
        """Stop the worker. Attempts in flight finish (each is bounded by webhook_timeout_s); what is still pending
        stays in the database for the next start. Deliveries can still be queued (by the listener) afterwards."""
        self._stop.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(10)
            self._dispatcher = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # queued, unclaimed attempts are simply not made
            self._pool = None

    # Queueing ----------------------------------------------------------------------------------------------------

    def on_job_finished(self, record: JobRecord) -> None:
        """JobService listener: queue a delivery for a completed or failed job that has a webhook_url."""
        if self.enqueue(record) is not None:
            self._wake.set()

    def enqueue(self, record: JobRecord) -> str | None:
        """The new delivery's id; None if the job has no webhook_url, did not complete or fail, or is queued already."""
        if not record.webhook_url or record.status not in EVENTS:
            return None
        files = self.jobs.store.files_of(record.id) if record.status == "completed" else []
        payload = build_payload(record, files, self.settings, self.jobs.file_url)
        new = NewDelivery(
            job_id=record.id,
            owner=record.owner,
            dialect=record.dialect,
            url=record.webhook_url,
            event=payload["event"],
            body=render_body(payload, int(time.time())),
        )
        return self.store.add(new, utcnow())

    # Reading -----------------------------------------------------------------------------------------------------

    def deliveries_for(self, job_id: str) -> list[dict[str, Any]]:
        """A job's deliveries for its status body (blocking: call off the event loop). The receiver's answer is
        reduced to its status code: its body is never kept, so a webhook cannot be used to read internal pages."""
        return [
            {
                "event": row.event,
                "status": row.status,
                "attempts": row.attempts,
                "last_status_code": row.last_status_code,
                "last_error": row.last_error,
                "next_attempt_at": _iso(row.next_attempt_at) if row.status == "pending" else None,
                "delivered_at": _iso(row.delivered_at),
            }
            for row in self.store.for_job(job_id)
        ]

    # Signing -----------------------------------------------------------------------------------------------------

    def signing_secret(self, owner: str | None) -> str:
        """The owning API key's webhook secret, or the server's for jobs no key owns."""
        if owner and owner.startswith(KEY_OWNER_PREFIX):
            secret = self._key_lookup(owner)
            if secret is None:
                raise PermanentFailure("the API key that owns the job no longer exists; there is no secret to sign")
            return secret
        with self._lock:
            if self._server_secret is None:
                self._server_secret = server_secret(self.settings)
            return self._server_secret

    def headers(self, row: WebhookDelivery, body: str, timestamp: int) -> dict[str, str]:
        secret = self.signing_secret(row.owner)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Easel-Event": row.event,
            "X-Easel-Delivery": row.id,  # the same for every attempt: receivers deduplicate by it
            "X-Easel-Timestamp": str(timestamp),
            "X-Easel-Signature": signature_header(secret, timestamp, body),
        }
        if row.dialect == "genpicz":
            headers["X-GenPicz-Signature"] = genpicz_signature(secret, body)
        return headers

    # Delivering --------------------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()
            wait_s = self.settings.webhook_poll_interval_s
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                    self.sweep()
                wait_s = self.dispatch()
            except Exception:
                log.exception("webhook dispatch failed; retrying")
            self._wake.wait(wait_s)

    def dispatch(self) -> float:
        """Hand due deliveries to the pool; how long to wait before looking again."""
        now = utcnow()
        poll = self.settings.webhook_poll_interval_s
        with self._lock:
            in_flight = dict(self._in_flight)
        rows = self.store.upcoming(
            now + timedelta(seconds=poll), limit=4 * self.settings.webhook_concurrency, exclude=in_flight
        )
        per_host = Counter(in_flight.values())
        limit, max_attempts = self.settings.webhook_concurrency, self.settings.webhook_max_attempts
        wait_s = poll
        for row in rows:
            if row.next_attempt_at > now:
                wait_s = min(wait_s, (row.next_attempt_at - now).total_seconds())
                continue
            if row.attempts >= max_attempts:  # its last attempt's process died before recording the outcome
                self.store.give_up_interrupted(now, max_attempts)
                continue
            if len(in_flight) >= limit:
                continue  # a finishing attempt wakes the loop
            host = _host_of(row.url)
            if per_host[host] >= self.settings.webhook_per_host_concurrency:
                continue
            per_host[host] += 1
            in_flight[row.id] = host
            with self._lock:
                self._in_flight[row.id] = host
            assert self._pool is not None
            self._pool.submit(self._attempt_and_release, row)
        return max(wait_s, 0.01)

    def _attempt_and_release(self, row: WebhookDelivery) -> None:
        try:
            self.attempt(row)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", row.id)
        finally:
            with self._lock:
                self._in_flight.pop(row.id, None)
            self._wake.set()

    def attempt(self, row: WebhookDelivery) -> bool:
        """Make the next attempt of a due row, if this process wins its claim. True if it was made."""
        timestamp = int(time.time())
        body = restamp(row.body, timestamp)
        attempt = row.attempts + 1
        if not self.store.claim(row, utcnow(), self.lease_s, body):
            return False  # another worker (or process) has it
        status_code: int | None = None
        permanent = False
        try:
            status_code, error = self._post(row, body, timestamp)
        except PermanentFailure as e:
            error, permanent = str(e), True
        retry_at = None
        if error is not None and not permanent and attempt < self.settings.webhook_max_attempts:
            retry_at = utcnow() + timedelta(seconds=retry_delay_s(attempt, self.settings))
        self.store.record(row.id, attempt, now=utcnow(), status_code=status_code, error=error, retry_at=retry_at)
        if error is None:
            log.info("webhook %s (%s) delivered on attempt %d", row.id, row.event, attempt)
        else:
            outcome = f"retrying at {retry_at:%H:%M:%S}" if retry_at else "giving up"
            log.warning("webhook %s attempt %d failed: %s; %s", row.id, attempt, error, outcome)
        return True

    def _post(self, row: WebhookDelivery, body: str, timestamp: int) -> tuple[int | None, str | None]:
        """One POST: (status code, None) on a 2xx, else (status code or None, why it failed)."""
        try:
            url, address = vet_target(row.url, self.settings, self._resolver)
        except TargetRefused as e:
            return None, f"refused: {e}"
        except FetchError as e:
            return None, str(e)
        headers = self.headers(row, body, timestamp)
        try:
            response = _send(url, address, headers, body.encode("ascii"), self.settings.webhook_timeout_s)
        except httpx.TimeoutException:
            return None, f"timed out after {self.settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as e:
            return None, f"could not connect or send ({type(e).__name__})"
        if 200 <= response < 300:
            return response, None
        if 300 <= response < 400:
            return response, f"answered HTTP {response}; redirects are not followed"
        return response, f"answered HTTP {response}"

    def sweep(self) -> int:
        """Forget deliveries that finished more than webhook_retention_s ago."""
        cutoff = utcnow() - timedelta(seconds=self.settings.webhook_retention_s)
        return self.store.delete_finished_before(cutoff)


def _send(url: httpx.URL, address: IPAddress, headers: dict[str, str], body: bytes, timeout_s: float) -> int:
    """POST to the vetted address, with the URL's host in the Host header and TLS SNI (and the certificate checked
    against it). The status code; the response body is not read."""
    # A client per attempt: a pooled connection verified for one host name must not carry a request for another.
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(timeout_s)) as client:
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        request = client.build_request(
            "POST",
            url.copy_with(host=str(address)),
            headers={**headers, "Host": url.netloc.decode("ascii")},
            content=body,
            extensions=extensions,
        )
        response = client.send(request, stream=True)
        response.close()
        return response.status_code
