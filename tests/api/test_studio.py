"""The studio page's server side (issue #20) over HTTP with the fake engine: the page and its assets (CSP, public
with keys, no path from the URL), and the APIs it uses: /v2/models, /v2/history, async gateway img2img."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry
from server.app import create_app
from server.settings import Settings
from server.studio import STATIC_DIR, load_assets, page_size
from tests.api.fake_engine import FakeEngine
from tests.api.test_gateway import png_b64
from tests.conftest import REPO_ROOT

A1111 = "/v2/automatic1111/sdapi/v1"
SMALL = {"prompt": "a fox", "model": "demo-sd15", "width": 64, "height": 64, "steps": 2, "async": True}


@pytest.fixture
def app_client(tmp_path: Path, registry: Registry) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path), engine=FakeEngine(registry), registry=registry)
    with TestClient(app) as client:
        yield client


def finish(client: TestClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 202, r.text
    address = r.json()["task_address"]
    deadline = time.monotonic() + 10
    while (task := client.get(f"/v2/tasks/{address}", headers=headers).json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, task
        time.sleep(0.02)
    assert task["status"] == "completed", task
    return address


# The page ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/studio"])
def test_the_page_is_served_with_a_strict_csp(app_client: TestClient, path: str) -> None:
    r = app_client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    # No inline script or style, and nothing loaded from elsewhere (air-gapped).
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", r.text))
    assert "<style" not in r.text and " style=" not in r.text and "on" + "click=" not in r.text
    for asset in load_assets().values():
        body = asset.body.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a namespace name, not a request
        assert not re.search(rb"https?://", body), "the page must not reach outside this server"


def test_assets_have_their_types_and_nothing_else_is_served(app_client: TestClient) -> None:
    assert app_client.get("/studio-assets/main.js").headers["content-type"].startswith("text/javascript")
    assert app_client.get("/studio-assets/studio.css").headers["content-type"].startswith("text/css")
    for name in ("nope.js", "..%2F__init__.py", "__init__.py", "index.html"):
        assert app_client.get(f"/studio-assets/{name}").status_code == 404
    r = app_client.get("/studio-assets/api.js")
    assert app_client.get("/studio-assets/api.js", headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_existing_pages_still_answer(app_client: TestClient) -> None:
    assert app_client.get("/docs").status_code == 200
    assert "/studio" not in app_client.get("/openapi.json").json()["paths"]
    assert app_client.get("/livez").status_code == 200


def test_with_keys_the_page_is_public_and_its_data_is_not(app_client: TestClient) -> None:
    key = app_client.app.state.keys.create("alice")
    assert app_client.get("/").status_code == 200
    assert app_client.get("/studio-assets/main.js").status_code == 200
    for path in ("/v2/models", "/v2/history", f"{A1111}/samplers"):
        assert app_client.get(path).status_code == 401, path
        assert app_client.get(path, headers={"Authorization": f"Bearer {key.secret}"}).status_code == 200, path


def test_every_static_file_ships_in_the_wheel() -> None:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    patterns = re.search(r'"server\.studio" = \[([^\]]*)\]', text)
    assert patterns is not None
    globs = re.findall(r'"([^"]+)"', patterns.group(1))
    for path in STATIC_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"static/{path.name}", g) for g in globs), path.name
    # The README and docs/studio.md state what a first load downloads: they stay true.
    size_kb = page_size(load_assets()) / 1000
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "studio.md"):
        stated = re.search(r"downloads\s+(?:\*\*)?about (\d+) KB", doc.read_text())
        assert stated is not None, doc
        assert abs(int(stated.group(1)) - size_kb) <= 2, (doc, size_kb)


# /v2/models ----------------------------------------------------------------------------------------------------------


def test_models_listing_gives_size_multiples_defaults_and_tasks(app_client: TestClient) -> None:
    body = app_client.get("/v2/models").json()
    models = {m["id"]: m for m in body["models"]}
    assert body["default_model"] == "demo-sd15"
    assert models["demo-sd15"]["size_multiple"] == 8 and models["demo-flux"]["size_multiple"] == 16
    assert models["demo-sdxl"]["default_cfg"] == 5.0
    assert "txt2img" not in models["demo-qwen-image-edit"]["tasks"]
    assert models["demo-sd15"]["tasks"] == ["txt2img", "img2img", "inpaint"]
    assert body["limits"]["max_width"] == 2048


# /v2/history ---------------------------------------------------------------------------------------------------------


def test_history_pages_newest_first_and_deletes(app_client: TestClient) -> None:
    addresses = [finish(app_client, f"{A1111}/txt2img", {**SMALL, "prompt": f"fox {i}"}) for i in range(3)]
    first = app_client.get("/v2/history", params={"limit": 2}).json()
    assert [i["task_address"] for i in first["items"]] == addresses[:0:-1]
    assert first["total"] == 3 and first["has_more"] is True
    second = app_client.get("/v2/history", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [i["task_address"] for i in second["items"]] == [addresses[0]]
    assert second["has_more"] is False and second["next_cursor"] is None
    item = second["items"][0]
    assert item["parameters"]["prompt"] == "fox 0" and item["parameters"]["width"] == 64
    assert item["route"] == "txt2img" and item["dialect"] == "a1111" and item["seeds"]
    image = item["images"][0]
    assert (image["width"], image["height"]) == (64, 64) and image["seed"] == item["seeds"][0]
    assert app_client.get(image["url"]).status_code == 200

    assert app_client.delete(f"/v2/history/{addresses[0]}").json() == {"deleted": True, "task_address": addresses[0]}
    assert app_client.get(image["url"]).status_code == 404
    r = app_client.delete(f"/v2/history/{addresses[0]}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    assert app_client.get("/v2/history").json()["total"] == 2


@pytest.mark.parametrize("params, field", [({"cursor": "bogus"}, "cursor"), ({"limit": 0}, "limit")])
def test_history_refuses_bad_paging(app_client: TestClient, params: dict[str, Any], field: str) -> None:
    r = app_client.get("/v2/history", params=params)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == field


def test_history_is_the_callers_own(app_client: TestClient) -> None:
    keys = app_client.app.state.keys
    alice, bob = keys.create("alice"), keys.create("bob")
    admin = keys.create("root", admin=True)
    as_alice, as_bob = ({"Authorization": f"Bearer {k.secret}"} for k in (alice, bob))
    address = finish(app_client, f"{A1111}/txt2img", SMALL, as_alice)
    assert [i["task_address"] for i in app_client.get("/v2/history", headers=as_alice).json()["items"]] == [address]
    assert app_client.get("/v2/history", headers=as_bob).json() == {
        "items": [], "total": 0, "limit": 20, "has_more": False, "next_cursor": None
    }  # fmt: skip
    as_admin = {"Authorization": f"Bearer {admin.secret}"}
    assert app_client.get("/v2/history", headers=as_admin).json()["total"] == 0  # its own jobs, not everyone's
    for method in ("get", "delete"):
        assert getattr(app_client, method)(f"/v2/history/{address}", headers=as_bob).status_code == 404
    assert app_client.get(f"/v2/history/{address}", headers=as_alice).status_code == 200


# Gateway img2img -----------------------------------------------------------------------------------------------------


def test_gateway_img2img_runs_async_with_a_mask(app_client: TestClient) -> None:
    body = {**SMALL, "init_images": [png_b64()], "mask": png_b64(color=(255, 255, 255)), "denoising_strength": 0.5}
    address = finish(app_client, f"{A1111}/img2img", body)
    item = app_client.get(f"/v2/history/{address}").json()
    assert item["route"] == "img2img" and item["model"] == "demo-sd15"
    assert item["parameters"]["init_images"] is None and item["parameters"]["mask"] is None  # no image bytes kept
    assert item["parameters"]["denoising_strength"] == 0.5
    assert len(item["images"]) == 1
    task = app_client.get(f"/v2/tasks/{address}").json()
    assert len(task["result"]["images"]) == 1  # the A1111 body as the synchronous call answers


def test_gateway_img2img_names_an_unknown_model(app_client: TestClient) -> None:
    r = app_client.post(f"{A1111}/img2img", json={**SMALL, "model": "nope", "init_images": [png_b64()]})
    assert r.status_code == 404 and "nope" in r.text
