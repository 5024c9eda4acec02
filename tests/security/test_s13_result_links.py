"""S8: result URLs are capability URLs. With API keys on, the URL each dialect hands out (Genrex `data.url`, GenPicz
`image_url`, IndoxHub `data[].url`, OpenAI `url`, gateway `urls`) loads with no `Authorization` header, as a
presigned object-store URL does; a tampered, expired, deleted or revoked one does not, and an unsigned one still
needs the key. A link that does not work is a 404 whatever the reason, as an unknown result.
`result_urls_require_auth` keeps every fetch authenticated."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry
from server.app import create_app
from server.jobs.links import ResultLinks
from server.settings import Settings
from tests.api.fake_engine import FakeEngine


class Keyed:
    def __init__(self, tmp_path: Path, registry: Registry, **settings: Any):
        self.engine = FakeEngine(registry)
        self.app = create_app(Settings(data_dir=tmp_path, **settings), engine=self.engine, registry=registry)
        self.client = TestClient(self.app)
        self.client.__enter__()
        self.key = self.app.state.keys.create("alice")
        self.auth = {"Authorization": f"Bearer {self.key.secret}"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json=body, headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    def fetch(self, url: str, **headers: str) -> int:
        """GET as a browser would: no credentials unless given."""
        return self.client.get(url, headers=headers).status_code

    def close(self) -> None:
        self.engine.release()
        self.client.__exit__(None, None, None)


@pytest.fixture
def keyed(tmp_path: Path, registry: Registry) -> Iterator[Keyed]:
    k = Keyed(tmp_path, registry)
    yield k
    k.close()


def genrex_url(k: Keyed) -> str:
    image_id = k.post("/image/create", {"prompt": "a fox in the snow", "size": "square", "quality": "low"})["id"]
    deadline = time.monotonic() + 10
    while True:
        body = k.client.get(f"/image/status/{image_id}", headers=k.auth).json()
        if body["status"] == "completed":
            return body["data"]["url"]
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


DIALECTS = {
    "genrex": genrex_url,
    "genpicz": lambda k: k.post("/v1/generate", {"prompt": "a fox", "width": 512, "height": 512})["image_url"],
    "indoxhub": lambda k: k.post("/api/v1/images/generations", {"prompt": "a fox", "size": "64x64"})["data"][0]["url"],
    "openai": lambda k: k.post(
        "/v1/images/generations", {"prompt": "a fox", "size": "64x64", "response_format": "url"}
    )["data"][0]["url"],
    "gateway": lambda k: k.post("/v2/image/qwen/generate", {"prompt": "a fox", "size": "64x64"})["urls"][0],
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_each_dialects_result_url_loads_without_a_header(keyed: Keyed, dialect: str) -> None:
    url = DIALECTS[dialect](keyed)
    parts = urlsplit(url)
    assert parts.path.startswith("/v2/results/") and set(parse_qs(parts.query)) == {"expires", "sig"}
    r = keyed.client.get(url)  # no Authorization header: an <img> tag
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
    assert keyed.fetch(parts.path) == 401  # the bare path is not a capability: it still needs the key
    assert keyed.fetch(parts.path, Authorization=keyed.auth["Authorization"]) == 200


def test_tampered_expired_deleted_and_revoked_links_do_not_load(keyed: Keyed) -> None:
    url = DIALECTS["gateway"](keyed)
    path, query = url.split("?")
    params = {k: v[0] for k, v in parse_qs(query).items()}
    sig, expires = params["sig"], params["expires"]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert keyed.fetch(f"{path}?expires={expires}&sig={flipped}") == 404
    assert keyed.fetch(f"{path}?expires={int(expires) + 3600}&sig={sig}") == 404  # a longer life is not granted
    other = keyed.client.post("/v2/image/qwen/generate", json={"prompt": "b", "size": "64x64"}, headers=keyed.auth)
    other_path = urlsplit(other.json()["urls"][0]).path
    assert keyed.fetch(f"{other_path}?expires={expires}&sig={sig}") == 404  # a signature is for one file

    # Expired: the signature itself says when (checked against the clock, not only the file's row).
    links: ResultLinks = keyed.app.state.jobs.links
    name = path.rpartition("/")[2]
    past = int(time.time()) - 1
    assert keyed.fetch(f"{path}?expires={past}&sig={links.signature(name, past)}") == 404

    # Revoked key: its links stop working.
    assert keyed.fetch(url) == 200
    keyed.app.state.keys.revoke(keyed.key.id)
    assert keyed.fetch(url) == 404


def test_deleted_generation_link_does_not_load(keyed: Keyed) -> None:
    body = keyed.post("/v1/generate", {"prompt": "a fox", "width": 512, "height": 512})
    url = body["image_url"]
    assert keyed.fetch(url) == 200
    r = keyed.client.delete(f"/v1/generations/{body['generation_id']}", headers=keyed.auth)
    assert r.status_code < 300, r.text
    assert keyed.fetch(url) == 404


def test_links_survive_a_restart_and_the_secret_is_kept_private(tmp_path: Path, registry: Registry) -> None:
    first = Keyed(tmp_path, registry)
    url = DIALECTS["gateway"](first)
    first.close()
    secret = tmp_path / "result_url_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    again = Keyed(tmp_path, registry)
    try:
        assert again.fetch(url) == 200  # the same secret signs and checks after a restart
    finally:
        again.close()


def test_require_auth_setting_keeps_every_fetch_authenticated(tmp_path: Path, registry: Registry) -> None:
    k = Keyed(tmp_path, registry, result_urls_require_auth=True)
    try:
        url = DIALECTS["gateway"](k)
        assert "sig=" not in url
        assert k.fetch(url) == 401
        assert k.fetch(url + "?expires=9999999999&sig=" + "A" * 43) == 401  # a made-up signature is no way in
        assert k.fetch(url, Authorization=k.auth["Authorization"]) == 200
    finally:
        k.close()
