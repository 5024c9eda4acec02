"""S5: no CORS unless configured (a web page in a visitor's browser cannot read this API), CORS exactly as configured
when it is, and `X-Content-Type-Options: nosniff` on images and every other answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.registry import Registry, load_registry
from server.app import create_app
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine

EVIL = "https://evil.example"
APP = "https://app.example"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REPO_ROOT / "models.yaml")


def client_for(registry: Registry, tmp_path: Path, **settings: object) -> TestClient:
    return TestClient(
        create_app(Settings(data_dir=tmp_path, **settings), engine=FakeEngine(registry), registry=registry)
    )


@pytest.fixture
def default_client(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    with client_for(registry, tmp_path) as client:
        yield client


def preflight(client: TestClient, path: str, origin: str) -> dict[str, str]:
    r = client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    return {k.lower(): v for k, v in r.headers.items()}


def test_no_cors_by_default(default_client: TestClient) -> None:
    for path in ("/sdapi/v1/txt2img", "/v2/image/flux/generate", "/v1/images/generations", "/readyz"):
        headers = preflight(default_client, path, EVIL)
        assert not any(k.startswith("access-control-") for k in headers), (path, headers)
    r = default_client.get("/sdapi/v1/samplers", headers={"Origin": EVIL})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = default_client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in r.headers


def test_cors_only_for_the_configured_origins(registry: Registry, tmp_path: Path) -> None:
    with client_for(registry, tmp_path, cors_allow_origins=[APP]) as client:
        allowed = preflight(client, "/sdapi/v1/txt2img", APP)
        assert allowed["access-control-allow-origin"] == APP
        assert "POST" in allowed["access-control-allow-methods"]
        assert "access-control-allow-credentials" not in allowed  # credentials only when configured
        refused = preflight(client, "/sdapi/v1/txt2img", EVIL)
        assert "access-control-allow-origin" not in refused

        r = client.get("/sdapi/v1/samplers", headers={"Origin": APP})
        assert r.headers["access-control-allow-origin"] == APP
        r = client.get("/sdapi/v1/samplers", headers={"Origin": EVIL})
        assert "access-control-allow-origin" not in r.headers


def test_cors_origin_regex(registry: Registry, tmp_path: Path) -> None:
    with client_for(registry, tmp_path, cors_allow_origin_regex=r"https://[a-z]+\.example\.org") as client:
        assert preflight(client, "/v2/tasks/x", "https://ui.example.org")["access-control-allow-origin"]
        assert "access-control-allow-origin" not in preflight(client, "/v2/tasks/x", "https://ui.example.org.evil")


def test_result_images_are_never_sniffed(default_client: TestClient) -> None:
    r = default_client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64"})
    assert r.status_code == 200, r.text
    url = r.json()["urls"][0]
    image = default_client.get(url)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(image.content)).format == "PNG"
    head = default_client.head(url)
    assert head.headers["x-content-type-options"] == "nosniff"


def test_every_answer_carries_nosniff(default_client: TestClient) -> None:
    """Not only images: JSON, errors, probes, 404s and 413s (an answer a browser might render)."""
    answers = [
        default_client.get("/readyz"),
        default_client.get("/livez"),
        default_client.get("/sdapi/v1/samplers"),
        default_client.get("/v2/results/nothing.png"),
        default_client.get("/no/such/route"),
        default_client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": -1}),
        default_client.post("/sdapi/v1/txt2img", content=b"x" * (51 * 1024 * 1024)),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 404, 422, 413]
    for r in answers:
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.status_code)
