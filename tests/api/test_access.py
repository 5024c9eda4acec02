"""API keys, HTTP Basic, per-key rate limits, credit quotas and the open-server refusal (issue #5), over HTTP with
the fake engine. Per-key isolation on every dialect's job routes is in test_isolation.py."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from pipelines.errors import GenerationFailed
from pipelines.registry import Registry
from server.access.keys import KeyStore, hash_secret
from server.access.ratelimit import RateLimiter
from server.app import create_app
from server.cli import main as cli_main
from server.cli import open_server_refusal
from server.jobs.db import create_tables, make_engine
from server.settings import Settings
from tests.api.fake_engine import FakeEngine

GPT = "/v2/image/gpt-image/generate"
SMALL = {"prompt": "a fox", "size": "auto", "quality": "low"}


@dataclass
class Server:
    client: TestClient
    engine: FakeEngine
    keys: KeyStore
    settings: Settings

    def auth(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}


def make_server(tmp_path: Path, registry: Registry, **settings_kw) -> Iterator[Server]:
    settings = Settings(data_dir=tmp_path, **settings_kw)
    engine = FakeEngine(registry)
    app = create_app(settings, engine=engine, registry=registry)
    with TestClient(app) as client:
        yield Server(client, engine, app.state.keys, settings)


@pytest.fixture
def server(tmp_path: Path, registry: Registry) -> Iterator[Server]:
    yield from make_server(tmp_path, registry)


def wait_for_next_window_if_close(margin_s: float = 4.0) -> None:
    """Rate windows reset at each UTC minute: a burst must not straddle a boundary."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.05)


# Keys -----------------------------------------------------------------------------------------------------------


def test_open_server_without_keys_ignores_credentials(server: Server) -> None:
    r = server.client.post(GPT, json=SMALL, headers=server.auth("anything"))  # SDKs always send some key
    assert r.status_code == 200, r.text
    assert "X-RateLimit-Limit" not in r.headers
    assert server.client.get("/v1/account").json()["plan"] == "open"


def test_key_lifecycle_create_use_revoke(server: Server) -> None:
    key = server.keys.create("alice", plan="pro")
    assert key.secret.startswith("esk_") and key.rate_limit == 30
    # Once a key exists the server requires one.
    r = server.client.post(GPT, json=SMALL)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"  # the gateway's own error shape
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert server.client.post(GPT, json=SMALL, headers=server.auth("esk_wrong")).json()["error"]["code"] == (
        "invalid_api_key"
    )
    assert server.client.post(GPT, json=SMALL, headers=server.auth(key.secret)).status_code == 200
    assert server.keys.revoke(key.id) == 1
    r = server.client.post(GPT, json=SMALL, headers=server.auth(key.secret))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unauthenticated_errors_use_each_dialects_shape(server: Server) -> None:
    server.keys.create("alice")
    a1111 = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
    assert a1111.status_code == 401 and a1111.json()["error"] == "Unauthorized"
    openai = server.client.post("/v1/images/generations", json={"prompt": "x"})
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "missing_api_key"
    genpicz = server.client.post("/v1/generate", json={"prompt": "x"})
    assert genpicz.status_code == 401 and genpicz.json()["error"]["status"] == 401


def test_probes_and_docs_stay_open(server: Server) -> None:
    server.keys.create("alice")
    assert server.client.get("/livez").status_code == 200
    assert server.client.get("/openapi.json").status_code == 200
    assert server.client.get("/docs").status_code == 200
    assert server.client.get("/readyz").status_code in (200, 503)
    assert server.client.get("/sdapi/v1/sd-models").status_code == 401


def test_secrets_are_stored_hashed(server: Server) -> None:
    key = server.keys.create("alice")
    server.client.post(GPT, json=SMALL, headers=server.auth(key.secret))
    db = (server.settings.data_dir / "easel.db").read_bytes()
    for suffix in ("", "-wal"):
        path = server.settings.data_dir / f"easel.db{suffix}"
        if path.exists():
            db += path.read_bytes()
    assert key.secret.encode() not in db
    assert key.secret[4:].encode() not in db  # not even without the prefix
    assert hash_secret(key.secret).encode() in db


def test_cli_creates_lists_and_revokes_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "create", "--name", "bob", "--plan", "custom", "--data-dir", str(tmp_path)]) == 2
    assert "needs --rate-limit" in capsys.readouterr().err
    args = ["keys", "create", "--name", "bob", "--plan", "custom", "--rate-limit", "7", "--quota", "3"]
    assert cli_main([*args, "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    secret = out.split("store it now): ")[1].split()[0]
    engine = make_engine(f"sqlite:///{tmp_path / 'easel.db'}")
    store = KeyStore(engine)
    key = store.authenticate(secret)
    assert key is not None and key.rate_limit == 7 and key.quota == 3 and key.name == "bob"
    assert cli_main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert key.id in listing and secret not in listing
    assert cli_main(["keys", "revoke", "bob", "--data-dir", str(tmp_path)]) == 0
    assert store.authenticate(secret) is None
    assert cli_main(["keys", "revoke", "bob", "--data-dir", str(tmp_path)]) == 1


# Basic auth (A1111 --api-auth) --------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a1111_basic_auth(tmp_path: Path, registry: Registry) -> None:
    for server in make_server(tmp_path, registry, api_auth="ann:pw1,ben:pw2"):
        assert server.client.get("/sdapi/v1/sd-models", headers=basic("ben", "pw2")).status_code == 200
        r = server.client.get("/sdapi/v1/sd-models", headers=basic("ben", "wrong"))
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert server.client.get("/sdapi/v1/sd-models").status_code == 401
        # Basic credentials are for the A1111 routes only; keys work everywhere.
        assert server.client.post(GPT, json=SMALL, headers=basic("ann", "pw1")).status_code == 401
        key = server.keys.create("alice")
        assert server.client.get("/sdapi/v1/sd-models", headers=server.auth(key.secret)).status_code == 200


def test_basic_users_are_rate_limited_like_keys(tmp_path: Path, registry: Registry) -> None:
    for server in make_server(tmp_path, registry, api_auth="ann:pw1,ben:pw2", api_auth_rate_limit=2):
        wait_for_next_window_if_close()
        for left in (1, 0):
            r = server.client.get("/sdapi/v1/sd-models", headers=basic("ann", "pw1"))
            assert r.status_code == 200
            assert r.headers["X-RateLimit-Limit"] == "2" and r.headers["X-RateLimit-Remaining"] == str(left)
            assert int(r.headers["X-RateLimit-Reset"]) > time.time()
        r = server.client.get("/sdapi/v1/sd-models", headers=basic("ann", "pw1"))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert set(r.json()) == {"error", "detail", "body", "errors"}  # A1111's shape
        # Each user has a window of its own.
        assert server.client.get("/sdapi/v1/sd-models", headers=basic("ben", "pw2")).status_code == 200


def test_refusals_carry_no_timing_header(tmp_path: Path, registry: Registry) -> None:
    for server in make_server(tmp_path, registry, api_auth="ann:pw1"):
        refused = server.client.get("/sdapi/v1/sd-models", headers=basic("ann", "wrong"))
        assert refused.status_code == 401 and "X-Process-Time" not in refused.headers
        assert "X-Process-Time" in server.client.get("/sdapi/v1/sd-models", headers=basic("ann", "pw1")).headers


def test_easel_serve_sends_no_server_banner(tmp_path: Path, registry: Registry) -> None:
    """The uvicorn configuration `easel serve` runs, over a real socket: no `Server: uvicorn` header."""
    import socket
    import threading

    import uvicorn

    from server.cli import uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(data_dir=tmp_path, port=port)
    app = create_app(settings, engine=FakeEngine(registry), registry=registry)
    server = uvicorn.Server(uvicorn_config(app, settings, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)
        assert r.status_code == 200 and "server" not in r.headers, dict(r.headers)
    finally:
        server.should_exit = True
        thread.join(10)


# Rate limits ------------------------------------------------------------------------------------------------------


def test_rate_limit_headers_count_down_and_429(server: Server) -> None:
    key = server.keys.create("alice", plan="custom", rate_limit=3)
    wait_for_next_window_if_close()
    remaining = []
    for _ in range(3):
        r = server.client.get("/v1/account", headers=server.auth(key.secret))
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(r.headers["X-RateLimit-Remaining"]))
        reset = int(r.headers["X-RateLimit-Reset"])
        assert reset % 60 == 0 and 0 < reset - time.time() <= 60  # the start of the next UTC minute
    assert remaining == [2, 1, 0]
    r = server.client.post("/v1/generate", json={"prompt": "x"}, headers=server.auth(key.secret))
    assert r.status_code == 429
    error = r.json()["error"]  # seed 001's body
    assert (error["code"], error["message"], error["status"]) == (
        "rate_limit_exceeded",
        "You have exceeded 3 requests per minute.",
        429,
    )
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert server.engine.requests == []  # nothing reached the engine


def test_concurrent_burst_refuses_exactly_the_overflow(tmp_path: Path, registry: Registry) -> None:
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings, engine=FakeEngine(registry), registry=registry)
    limit, extra = 12, 5

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with app.router.lifespan_context(app):
                key = app.state.keys.create("burst", plan="custom", rate_limit=limit)
                wait_for_next_window_if_close(6.0)
                headers = {"Authorization": f"Bearer {key.secret}"}
                responses = await asyncio.gather(
                    *(client.get("/v1/account", headers=headers) for _ in range(limit + extra))
                )
                return [r.status_code for r in responses]

    codes = asyncio.run(burst())
    assert codes.count(200) == limit and codes.count(429) == extra


def test_rate_window_resets_at_the_minute(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'rl.db'}")
    create_tables(engine)
    now = [1_700_000_080.0]  # 20 s before a minute boundary (1_700_000_100)
    limiter = RateLimiter(engine, clock=lambda: now[0])
    assert [limiter.hit("k", 2).allowed for _ in range(3)] == [True, True, False]
    assert limiter.hit("k", 2).reset_at == 1_700_000_100
    now[0] += 20  # the next UTC minute
    decision = limiter.hit("k", 2)
    assert decision.allowed and decision.remaining == 1
    assert limiter.hit("other", 2).remaining == 1  # per key


# Quota and account -------------------------------------------------------------------------------------------------


def test_quota_exhaustion_refused_before_any_gpu_work(server: Server) -> None:
    key = server.keys.create("alice", quota=3)
    headers = server.auth(key.secret)
    body = {"prompt": "a fox", "size": "auto", "quality": "low", "n": 2}
    assert server.client.post(GPT, json=body, headers=headers).status_code == 200
    submitted = len(server.engine.requests)
    r = server.client.post(GPT, json=body, headers=headers)  # needs 2, has 1
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "quota_exceeded"
    assert len(server.engine.requests) == submitted
    account = server.client.get("/v1/account", headers=headers).json()
    assert account["credits_used"] == 2 and account["credits_remaining"] == 1 and account["images_generated"] == 2
    assert account["plan"] == "starter" and account["rate_limit"] == 10
    assert server.client.post(GPT, json=SMALL, headers=headers).status_code == 200  # 1 image still fits


def test_failed_jobs_give_credits_back(server: Server) -> None:
    key = server.keys.create("alice", quota=2)
    headers = server.auth(key.secret)
    server.engine.fail_with = GenerationFailed("boom")
    assert server.client.post(GPT, json=SMALL, headers=headers).status_code >= 500
    deadline = time.monotonic() + 5
    while server.keys.get(key.id).credits_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.keys.get(key.id).credits_used == 0


# Open-server refusal -----------------------------------------------------------------------------------------------


def test_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    assert open_server_refusal(Settings(data_dir=tmp_path, host="127.0.0.1")) is None
    assert open_server_refusal(Settings(data_dir=tmp_path, host="::1")) is None
    refusal = open_server_refusal(Settings(data_dir=tmp_path, host="0.0.0.0"))
    assert refusal is not None and "--insecure-no-auth" in refusal
    assert open_server_refusal(Settings(data_dir=tmp_path, host="0.0.0.0", insecure_no_auth=True)) is None
    assert open_server_refusal(Settings(data_dir=tmp_path, host="0.0.0.0", api_auth="a:b")) is None
    engine = make_engine(f"sqlite:///{tmp_path / 'easel.db'}")
    create_tables(engine)
    KeyStore(engine).create("alice")
    assert open_server_refusal(Settings(data_dir=tmp_path, host="0.0.0.0")) is None


def test_serve_exits_with_the_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "without authentication" in capsys.readouterr().err
