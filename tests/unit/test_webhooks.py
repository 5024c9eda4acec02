"""server/webhooks: signed deliveries queued in the job database, retried, and SSRF-guarded.

Jobs run through a real JobService (SQLite file, fake engine); deliveries go to a receiver this test starts on
127.0.0.1, allowed through `webhook_allowed_networks`. Nothing here sends a packet off loopback: refused targets are
refused before a connection is opened, and the fake resolvers hand out only loopback or private addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipelines.errors import GenerationFailed
from pipelines.registry import Registry
from pipelines.request import GenerationRequest
from server.access.keys import KeyStore
from server.app import create_app
from server.errors import ApiError
from server.fetch import FetchFailed
from server.jobs import JobService, JobSpec
from server.jobs.db import JobRecord, utcnow
from server.jobs.files import ResultFiles
from server.jobs.service import file_url
from server.jobs.store import JobStore
from server.settings import Settings
from server.webhooks import WebhookService, check_webhook_url, get_webhook_service, verify_signature
from server.webhooks.signing import server_secret, sign
from server.webhooks.store import INTERRUPTED_ERROR, DeliveryStore
from tests.api.fake_engine import FakeEngine

SECRET = "whsec_test_secret"
BASE_URL = "https://images.example.test"


# A loopback receiver -------------------------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers POSTs by path from a script: `script["/flaky"] = [500, 200]` answers 500 once, then 200 for good."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [h.path for h in self.hits]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.hits.append(Hit(self.path, dict(self.headers.items()), body, time.monotonic()))
            answers = state.script.get(self.path, [200])
            status = answers.pop(0) if len(answers) > 1 else answers[0]
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "/ok")
            reply = b'{"secret": "internal page"}'
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# Jobs and the webhook service ----------------------------------------------------------------------------------------


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data",
        webhook_allow_http=True,
        webhook_allowed_networks=["127.0.0.1/32"],
        webhook_secret=SecretStr(SECRET),
        webhook_retry_base_s=0.05,
        webhook_retry_max_s=0.2,
        webhook_poll_interval_s=0.05,
        webhook_timeout_s=5.0,
    )
    return Settings(**{**values, **overrides})


def make_jobs(tmp_path: Path) -> JobService:
    return JobService(
        JobStore(f"sqlite:///{tmp_path / 'jobs.db'}"), ResultFiles(tmp_path / "results"), default_ttl_s=600
    )


@pytest.fixture
def engine(registry: Registry) -> Iterator[FakeEngine]:
    eng = FakeEngine(registry)
    yield eng
    eng.release()


@dataclass
class Harness:
    jobs: JobService
    webhooks: WebhookService
    engine: FakeEngine
    settings: Settings
    listened: dict[str, threading.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Listeners run in order after the job's future resolves: once this one has run, the webhook one has.
        self.jobs.add_listener(lambda record: self.listened.setdefault(record.id, threading.Event()).set())

    def run(
        self, webhook_url: str | None, *, dialect: str = "gateway", owner: str | None = None, **kw: Any
    ) -> JobRecord:
        """Submit a 64x48 job and return its finished record (the listener has run by then)."""
        request = GenerationRequest(model="demo-qwen-image", prompt="a cat", width=64, height=48, steps=2, seed=7)
        spec = JobSpec(
            request=request,
            dialect=dialect,
            route="qwen",
            request_json={"prompt": "a cat"},
            render=lambda result, images: {"images": [im.as_url() for im in images]},
            webhook_url=webhook_url,
            owner=owner,
            base_url=BASE_URL,
            **kw,
        )
        ticket = self.jobs.submit(self.engine, spec)
        record = ticket.finished.result(timeout=10)
        assert self.listened.setdefault(record.id, threading.Event()).wait(10)
        return record

    def settled(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The job's single delivery once it is delivered or failed."""
        deadline = time.monotonic() + timeout
        while True:
            deliveries = self.webhooks.deliveries_for(job_id)
            if deliveries and deliveries[0]["status"] != "pending":
                assert len(deliveries) == 1, deliveries
                return deliveries[0]
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.02)


@pytest.fixture
def make_harness(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., Harness]]:
    opened: list[Harness] = []

    def make(start: bool = True, **kw: Any) -> Harness:
        resolver = kw.pop("resolver", None)
        key_lookup = kw.pop("key_lookup", None)
        settings = make_settings(tmp_path, **kw)
        jobs = make_jobs(tmp_path)
        webhooks = WebhookService(settings, jobs, key_lookup=key_lookup, resolver=resolver)
        jobs.add_listener(webhooks.on_job_finished)
        if start:
            webhooks.start()
        harness = Harness(jobs, webhooks, engine, settings)
        opened.append(harness)
        return harness

    yield make
    for h in opened:
        h.webhooks.close()
        h.jobs.close()


def received_json(hit: Hit) -> dict[str, Any]:
    return json.loads(hit.body)


# Delivery and signatures ---------------------------------------------------------------------------------------------


def test_completed_job_is_delivered_signed_with_the_seed_payload(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness()
    record = h.run(receiver.url("/ok"))
    delivery = h.settled(record.id)
    assert delivery["status"] == "delivered"
    assert (delivery["attempts"], delivery["last_status_code"], delivery["last_error"]) == (1, 200, None)
    assert delivery["delivered_at"] and delivery["next_attempt_at"] is None

    [hit] = receiver.hits
    payload = received_json(hit)
    files = h.jobs.store.files_of(record.id)
    assert payload == {
        "event": "generation.completed",
        "generation_id": record.task_address,
        "status": "completed",
        "image_url": file_url(BASE_URL, files[0].token, "image/png"),
        "created_at": record.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timestamp": int(hit.headers["X-Easel-Timestamp"]),
    }
    image_path = payload["image_url"].partition("?")[0]  # the query signs the URL (capability URL)
    assert image_path.startswith(f"{BASE_URL}/v2/results/") and image_path.endswith(".png")
    assert abs(payload["timestamp"] - time.time()) < 30
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Easel-Event"] == "generation.completed"
    assert "X-GenPicz-Signature" not in hit.headers  # only GenPicz jobs carry the seed's header

    # A receiver verifies the raw body with the timestamp header.
    ts, signature = hit.headers["X-Easel-Timestamp"], hit.headers["X-Easel-Signature"]
    assert signature == f"t={ts},v1={hmac.new(SECRET.encode(), f'{ts}.'.encode() + hit.body, 'sha256').hexdigest()}"
    assert verify_signature(SECRET, ts, hit.body, signature)
    assert not verify_signature("whsec_other", ts, hit.body, signature)
    assert not verify_signature(SECRET, ts, hit.body.replace(b"completed", b"failed"), signature)
    assert not verify_signature(SECRET, int(ts) + 1, hit.body, signature)  # header and signed time disagree
    assert not verify_signature(SECRET, ts, hit.body, signature, now=int(ts) + 301)  # a replay, too old
    assert verify_signature(SECRET, ts, hit.body, signature, now=int(ts) + 299)
    assert not verify_signature(SECRET, ts, hit.body, None)
    # The stored body is byte for byte what was sent.
    assert h.webhooks.store.for_job(record.id)[0].body.encode() == hit.body


def test_genpicz_job_is_signed_with_its_api_keys_secret(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness()  # no key_lookup: the real one, reading api_keys in the job database
    key = KeyStore(h.jobs.store.engine).create("client")
    record = h.run(receiver.url("/ok"), dialect="genpicz", owner=key.id)
    assert h.settled(record.id)["status"] == "delivered"
    [hit] = receiver.hits
    payload = received_json(hit)
    assert payload["generation_id"] == "gen_" + record.task_address
    assert payload["timestamp"] == int(hit.headers["X-Easel-Timestamp"])
    # Seed 001: hex HMAC-SHA256 of the raw body with the webhook secret.
    expected = hmac.new(key.webhook_secret.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-GenPicz-Signature"] == expected
    ts, signature = hit.headers["X-Easel-Timestamp"], hit.headers["X-Easel-Signature"]
    assert verify_signature(key.webhook_secret, ts, hit.body, signature)
    assert not verify_signature(SECRET, ts, hit.body, signature)  # not the server-wide secret


def test_failed_genrex_job_reports_the_error_under_its_uuid(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness()
    h.engine.fail_with = GenerationFailed("generation failed: RuntimeError: boom")
    record = h.run(receiver.url("/ok"), dialect="genrex")
    assert record.status == "failed"
    assert h.settled(record.id)["status"] == "delivered"
    payload = received_json(receiver.hits[0])
    assert payload["event"] == "generation.failed" and payload["status"] == "failed"
    assert payload["generation_id"] == str(uuid.UUID(record.id))
    assert payload["image_url"] is None
    assert payload["error"] == {"code": "generation_failed", "message": "generation failed: RuntimeError: boom"}


def test_unknown_key_owner_fails_without_sending(make_harness: Callable[..., Harness], receiver: Receiver) -> None:
    h = make_harness(key_lookup=lambda key_id: None)
    record = h.run(receiver.url("/ok"), owner="key_gone")
    delivery = h.settled(record.id)
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    assert "API key" in delivery["last_error"]
    assert receiver.hits == []


def test_server_secret_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = server_secret(settings)
    path = tmp_path / "data" / "webhook_secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert first.startswith("whsec_") and len(first) > 40
    assert server_secret(Settings(data_dir=tmp_path / "data")) == first  # the next process signs the same way
    assert server_secret(Settings(data_dir=tmp_path / "data", webhook_secret=SecretStr("set"))) == "set"
    assert sorted(p.name for p in path.parent.iterdir()) == ["webhook_secret"]  # no temporary files left


# Retries -------------------------------------------------------------------------------------------------------------


def test_a_failed_attempt_is_retried_with_a_new_timestamp(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness()
    receiver.script["/flaky"] = [500, 200]
    record = h.run(receiver.url("/flaky"))
    delivery = h.settled(record.id)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 2, 200)
    assert delivery["last_error"] is None
    assert receiver.paths() == ["/flaky", "/flaky"]
    first, second = receiver.hits
    assert second.at - first.at >= 0.05 * 0.9  # webhook_retry_base_s
    for hit in receiver.hits:  # each attempt is signed for its own time, and its body says the same time
        ts = hit.headers["X-Easel-Timestamp"]
        assert received_json(hit)["timestamp"] == int(ts)
        assert verify_signature(SECRET, ts, hit.body, hit.headers["X-Easel-Signature"])
    assert hit.headers["X-Easel-Delivery"] == first.headers["X-Easel-Delivery"]  # receivers deduplicate by it


def test_non_2xx_until_max_attempts_is_failed(make_harness: Callable[..., Harness], receiver: Receiver) -> None:
    h = make_harness(webhook_max_attempts=3, webhook_retry_base_s=0.1, webhook_retry_max_s=0.15)
    receiver.script["/down"] = [503]
    record = h.run(receiver.url("/down"))
    delivery = h.settled(record.id)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("failed", 3, 503)
    assert delivery["last_error"] == "answered HTTP 503" and delivery["delivered_at"] is None
    assert receiver.paths() == ["/down"] * 3
    gaps = [b.at - a.at for a, b in zip(receiver.hits, receiver.hits[1:], strict=False)]
    assert gaps[0] >= 0.1 * 0.9 and gaps[1] >= 0.15 * 0.9  # 0.1 * 2 = 0.2, capped at 0.15
    time.sleep(0.3)
    assert len(receiver.hits) == 3  # given up: no fourth attempt
    # The receiver's body is never kept where a client could read it.
    assert "internal page" not in json.dumps(h.webhooks.deliveries_for(record.id))


def test_a_redirect_is_a_failure_and_is_not_followed(make_harness: Callable[..., Harness], receiver: Receiver) -> None:
    h = make_harness(webhook_max_attempts=1)
    receiver.script["/moved"] = [302]
    record = h.run(receiver.url("/moved"))
    delivery = h.settled(record.id)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("failed", 1, 302)
    assert "redirects are not followed" in delivery["last_error"]
    assert receiver.paths() == ["/moved"]  # /ok, the Location, was never called


def test_pending_delivery_is_resumed_by_the_next_process(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    stopped = make_harness(start=False)  # the worker is not running: the delivery stays queued
    record = stopped.run(receiver.url("/ok"))
    [queued] = stopped.webhooks.deliveries_for(record.id)
    assert (queued["status"], queued["attempts"]) == ("pending", 0)
    time.sleep(0.2)
    assert receiver.hits == []
    stopped.webhooks.close()
    stopped.jobs.close()

    restarted = make_harness()  # a new JobService and WebhookService on the same database file
    delivery = restarted.settled(record.id)
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
    assert received_json(receiver.hits[0])["generation_id"] == record.task_address


def test_two_processes_cannot_claim_the_same_attempt(make_harness: Callable[..., Harness], receiver: Receiver) -> None:
    h = make_harness(start=False)
    record = h.run(receiver.url("/ok"))
    one, other = DeliveryStore(h.jobs.store.engine), DeliveryStore(h.jobs.store.engine)
    [row] = one.upcoming(utcnow(), limit=10)
    [same_row] = other.upcoming(utcnow(), limit=10)
    assert one.claim(row, utcnow(), 60, row.body)
    assert not other.claim(same_row, utcnow(), 60, same_row.body)  # the same attempt: lost
    assert other.upcoming(utcnow(), limit=10) == []  # leased while in flight
    # The holder dies mid-attempt: once the lease is over, the row is due again, for the next attempt.
    later = utcnow() + timedelta(seconds=61)
    [again] = other.upcoming(later, limit=10)
    assert again.attempts == 1 and other.claim(again, later, 60, again.body)
    assert h.webhooks.deliveries_for(record.id)[0]["attempts"] == 2
    # That holder dies too, on the last allowed attempt: once its lease is over the delivery is given up.
    assert other.give_up_interrupted(later, max_attempts=2) == 0  # still leased
    assert other.give_up_interrupted(later + timedelta(seconds=61), max_attempts=2) == 1
    delivery = h.webhooks.deliveries_for(record.id)[0]
    assert (delivery["status"], delivery["last_error"]) == ("failed", INTERRUPTED_ERROR)
    assert receiver.hits == []


# Which jobs get a delivery -------------------------------------------------------------------------------------------


def test_listener_queues_completed_and_failed_jobs_with_a_url_only(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness(start=False)
    completed = h.run(receiver.url("/ok"))
    without_url = h.run(None)
    h.engine.fail_with = GenerationFailed("boom")
    failed = h.run(receiver.url("/ok"))
    assert [d["event"] for d in h.webhooks.deliveries_for(completed.id)] == ["generation.completed"]
    assert [d["event"] for d in h.webhooks.deliveries_for(failed.id)] == ["generation.failed"]
    assert h.webhooks.deliveries_for(without_url.id) == []
    assert h.webhooks.enqueue(completed) is None  # a second call queues nothing more
    assert h.webhooks.store.count_pending() == 2
    # A cancelled job (its client asked for that) gets no webhook.
    cancelled = h.jobs.store.get(without_url.id)
    cancelled.status, cancelled.webhook_url = "cancelled", receiver.url("/ok")
    assert h.webhooks.enqueue(cancelled) is None


# Where webhooks may go -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://hooks.example.com/x", "https://"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://10.0.0.1/x", "private"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://[::1]:8443/x", "loopback"),
        ("https://[::ffff:10.1.2.3]/x", "private"),
        ("https://2130706433/x", "loopback"),  # 127.0.0.1 in decimal
        ("https://127.1/x", "loopback"),
        ("https://localhost/x", "loopback"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("ftp://hooks.example.com/x", "https://"),
        ("https:///nohost", "host"),
        ("https://hooks.example.com/" + "x" * 2100, "2048"),
    ],
)
def test_check_webhook_url_refuses_internal_targets(url: str, reason: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ApiError) as caught:
        check_webhook_url(url, settings, field="callback_url")
    error = caught.value
    assert error.status == 422 and error.field == "callback_url"
    assert reason in error.message


def test_check_webhook_url_accepts_public_names_without_dns(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert check_webhook_url(" https://hooks.example.com/x?sig=1 ", settings) == "https://hooks.example.com/x?sig=1"
    assert check_webhook_url(None, settings) is None
    assert check_webhook_url("https://93.184.215.14/x", settings)  # a public literal
    # The allow-list and webhook_allow_http open loopback up (what these tests' receiver needs).
    opened = make_settings(tmp_path)
    assert check_webhook_url("http://127.0.0.1:9/x", opened) == "http://127.0.0.1:9/x"
    with pytest.raises(ApiError):
        check_webhook_url("http://127.0.0.2:9/x", opened)


def test_check_webhook_url_with_a_resolver_checks_every_answer(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    answers = {
        "hooks.example.com": ["93.184.215.14"],
        "rebind.example.com": ["93.184.215.14", "10.0.0.7"],  # one bad answer is enough
    }

    def resolver(host: str, port: int) -> list[Any]:
        if host not in answers:
            raise FetchFailed(f"the host '{host}' could not be resolved")
        return [ipaddress.ip_address(a) for a in answers[host]]

    assert check_webhook_url("https://hooks.example.com/x", settings, resolver=resolver)
    with pytest.raises(ApiError, match="private"):
        check_webhook_url("https://rebind.example.com/x", settings, resolver=resolver)
    with pytest.raises(ApiError, match="could not be resolved"):
        check_webhook_url("https://nowhere.example.com/x", settings, resolver=resolver)


def test_delivery_vets_the_resolved_address_and_pins_it(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    """Checked again at delivery (DNS may have changed): a name that now resolves to a private address is refused
    without connecting; an allowed one is connected to at the vetted address, with the name in the Host header."""
    answers = {"hooks.test": "127.0.0.1", "internal.test": "10.0.0.5"}
    looked_up: list[str] = []

    def resolver(host: str, port: int) -> list[Any]:
        looked_up.append(host)
        return [ipaddress.ip_address(answers[host])]

    h = make_harness(resolver=resolver, webhook_max_attempts=2)
    refused = h.run(receiver.url("/internal", host="internal.test"))
    delivery = h.settled(refused.id)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("failed", 2, None)
    assert delivery["last_error"].startswith("refused:") and "private address" in delivery["last_error"]
    assert "10.0.0.5" not in delivery["last_error"]  # internal DNS is not echoed

    pinned = h.run(receiver.url("/ok", host="hooks.test"))
    assert h.settled(pinned.id)["status"] == "delivered"
    assert receiver.paths() == ["/ok"]
    assert receiver.hits[0].headers["Host"] == f"hooks.test:{receiver.port}"
    assert looked_up == ["internal.test", "internal.test", "hooks.test"]


def test_http_target_is_refused_at_delivery_when_http_is_off(
    make_harness: Callable[..., Harness], receiver: Receiver
) -> None:
    h = make_harness(webhook_allow_http=False, webhook_max_attempts=1)
    record = h.run(receiver.url("/ok"))  # stored by a dialect while http was allowed, say
    delivery = h.settled(record.id)
    assert delivery["status"] == "failed" and "https://" in delivery["last_error"]
    assert receiver.hits == []


# Visible on the task -------------------------------------------------------------------------------------------------


def test_task_status_shows_the_webhook_deliveries(tmp_path: Path, registry: Registry, receiver: Receiver) -> None:
    settings = make_settings(tmp_path)
    engine = FakeEngine(registry)
    app = create_app(settings, engine=engine, registry=registry)
    with TestClient(app) as client:
        webhooks = get_webhook_service(app)
        assert webhooks is not None  # create_app wires it in
        try:
            h = Harness(app.state.jobs, webhooks, engine, settings)
            record = h.run(receiver.url("/ok"))
            h.settled(record.id)
            body = client.get(f"/v2/tasks/{record.task_address}").json()
            [delivery] = body["webhook"]
            assert delivery["event"] == "generation.completed"
            assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 1, 200)
            plain = h.run(None)
            assert client.get(f"/v2/tasks/{plain.task_address}").json()["webhook"] is None
        finally:
            webhooks.close()


def wait_for_hits(receiver: Receiver, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.hits) < n:
        assert time.monotonic() < deadline, receiver.paths()
        time.sleep(0.02)


def test_every_dialect_with_a_webhook_field_delivers_signed_with_the_callers_key(
    tmp_path: Path, registry: Registry, receiver: Receiver
) -> None:
    """Over HTTP with an API key: GenPicz, Genrex, the gateway and OpenAI each POST their job's event, signed with
    the key's own webhook secret (and X-GenPicz-Signature on GenPicz)."""
    app = create_app(make_settings(tmp_path), engine=FakeEngine(registry), registry=registry)
    with TestClient(app) as client:
        key = app.state.keys.create("alice", plan="studio")
        auth = {"Authorization": f"Bearer {key.secret}"}
        calls = [
            ("/v1/generate", {"prompt": "a fox", "width": 512, "height": 512}, "/genpicz"),
            ("/image/create", {"prompt": "a futuristic city at dusk", "size": "square"}, "/genrex"),
            ("/v2/image/gpt-image/generate", {"prompt": "a fox", "size": "auto", "quality": "low"}, "/gateway"),
            ("/v1/images/generations", {"prompt": "a fox", "size": "64x64", "steps": 1}, "/openai"),
        ]
        for path, body, hook in calls:
            r = client.post(path, json={**body, "webhook_url": receiver.url(hook)}, headers=auth)
            assert r.status_code == 200, (path, r.text)
        wait_for_hits(receiver, len(calls))
        by_path = {hit.path: hit for hit in receiver.hits}
        assert set(by_path) == {hook for *_, hook in calls}
        for hit in by_path.values():
            headers = {k.lower(): v for k, v in hit.headers.items()}
            timestamp = headers["x-easel-timestamp"]
            assert verify_signature(key.webhook_secret, timestamp, hit.body, headers["x-easel-signature"])
            assert not verify_signature(SECRET, timestamp, hit.body, headers["x-easel-signature"])
            payload = json.loads(hit.body)
            assert payload["event"] == "generation.completed" and payload["image_url"].startswith("http")
        genpicz = by_path["/genpicz"]
        expected = hmac.new(key.webhook_secret.encode(), genpicz.body, hashlib.sha256).hexdigest()
        assert {k.lower(): v for k, v in genpicz.headers.items()}["x-genpicz-signature"] == expected
        assert json.loads(genpicz.body)["generation_id"].startswith("gen_")
        # An internal target is refused when the job is submitted, in the dialect's own error shape.
        r = client.post(
            "/v1/images/generations", json={"prompt": "x", "webhook_url": "https://10.0.0.1/h"}, headers=auth
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url"


def test_sign_matches_the_documented_scheme() -> None:
    body = b'{"event":"generation.completed"}'
    expected = hmac.new(b"s", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s", 1700000000, body) == sign("s", 1700000000, body.decode()) == expected
    header = f"t=1700000000,v1=deadbeef,v1={expected}"  # several v1 entries: secret rotation
    assert verify_signature("s", "1700000000", body, header, now=1700000000)
    assert not verify_signature("s", "1700000000", body, "v1=" + expected, now=1700000000)  # no t=
    assert not verify_signature("s", "soon", body, header, now=1700000000)
