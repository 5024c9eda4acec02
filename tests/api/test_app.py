"""App-level behaviour: health probes, body-size limit, OpenAPI."""

from __future__ import annotations

from fastapi.testclient import TestClient

from pipelines.registry import load_registry
from server.app import create_app
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine


def test_readyz_is_503_until_the_engine_runs_and_livez_always_200():
    registry = load_registry(REPO_ROOT / "models.yaml")
    app = create_app(Settings(), registry=registry)
    client = TestClient(app)  # no lifespan: the engine never starts
    assert client.get("/livez").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not ready"

    app.state.engine = FakeEngine(registry)
    assert client.get("/readyz").status_code == 200


def test_engine_start_failure_is_reported_by_readyz():
    app = create_app(Settings(), registry=load_registry(REPO_ROOT / "models.yaml"))
    app.state.engine_error = "ModelLoadError: model 'demo-sd15' failed to load"
    r = TestClient(app).get("/readyz")
    assert r.status_code == 503 and "demo-sd15" in r.json()["reason"]


def test_oversized_body_is_refused_with_413_before_it_is_read():
    registry = load_registry(REPO_ROOT / "models.yaml")
    client = TestClient(create_app(Settings(max_body_bytes=2048), engine=FakeEngine(registry), registry=registry))
    r = client.post(
        "/sdapi/v1/txt2img", content=b"{" + b" " * 4096 + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "max_body_bytes" in r.text
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "ok", "steps": 2}).status_code == 200


def test_openapi_docs_are_served():
    registry = load_registry(REPO_ROOT / "models.yaml")
    client = TestClient(create_app(Settings(), engine=FakeEngine(registry), registry=registry))
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/livez", "/readyz", "/sdapi/v1/txt2img", "/v2/automatic1111/sdapi/v1/txt2img"} <= set(paths)


def test_chunked_oversized_body_is_refused_too():
    registry = load_registry(REPO_ROOT / "models.yaml")
    client = TestClient(create_app(Settings(max_body_bytes=2048), engine=FakeEngine(registry), registry=registry))

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_oversized_body_answers_in_each_dialects_error_shape():
    registry = load_registry(REPO_ROOT / "models.yaml")
    client = TestClient(create_app(Settings(max_body_bytes=2048), engine=FakeEngine(registry), registry=registry))
    big = {"content": b"{" + b" " * 4096 + b"}", "headers": {"content-type": "application/json"}}
    a1111 = client.post("/sdapi/v1/txt2img", **big)
    assert a1111.status_code == 413 and a1111.json()["error"] == "PayloadTooLarge"
    openai = client.post("/v1/images/generations", **big)
    assert openai.status_code == 413 and "max_body_bytes" in openai.json()["error"]["message"]
    genpicz = client.post("/v1/generate", **big)
    assert genpicz.status_code == 413 and genpicz.json()["error"]["status"] == 413
    gateway = client.post("/v2/image/flux/generate", **big)
    assert gateway.json()["error"]["code"] == "payload_too_large"


def test_api_pages_load_every_asset_from_the_server_itself(tmp_path):
    """/docs and /redoc render on an air-gapped box: the HTML names no other host, and each script, stylesheet and
    icon it names is served here (without a key, as the pages are, once keys exist)."""
    import re

    from server.access.keys import KeyStore
    from server.jobs.db import create_tables, make_engine

    settings = Settings(data_dir=tmp_path)
    db = make_engine(settings.resolved_database_url)
    create_tables(db)
    KeyStore(db).create("someone")
    db.dispose()
    registry = load_registry(REPO_ROOT / "models.yaml")
    client = TestClient(create_app(settings, engine=FakeEngine(registry), registry=registry))
    assert client.get("/sdapi/v1/sd-models").status_code == 401  # keys are in force
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200, page
        html = r.text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), f"{page} names an external URL"
        assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: ?'([^']+)'", html)
        assets = [a for a in assets if a.startswith("/docs-assets/")]
        assert any(a.endswith(".js") for a in assets), page
        for asset in assets:
            got = client.get(asset)
            assert got.status_code == 200, asset
            assert len(got.content) > 1000, asset
            expected = {"js": "javascript", "css": "text/css", "png": "image/png"}[asset.rsplit(".", 1)[1]]
            assert expected in got.headers["content-type"], asset
