"""The GenPicz-style API end to end: the shared real `easel serve` (demo SDXL on CPU, models.yaml `routes: genpicz`).

The smallest GenPicz size (512x512) with quality=standard (half the model's 20 default steps) keeps each image to a
few seconds on CPU; the fake-engine tests in tests/api/test_genpicz.py cover every field and error.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

SMALL = {"prompt": "a neon samurai in a cyberpunk city", "width": 512, "height": 512, "quality": "standard"}


@pytest.fixture(scope="module")
def live(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=300) as client:
        yield client


def fetch_png(client: httpx.Client, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    image.load()
    assert image.format == "PNG"
    return image


def test_generate_upscale_get_list_delete(live: httpx.Client) -> None:
    request = {**SMALL, "style": "cinematic", "seed": 4829301}
    r = live.post("/v1/generate", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["generation_id"].startswith("gen_")
    assert (body["width"], body["height"], body["style"], body["seed"], body["credits_used"]) == (
        512,
        512,
        "cinematic",
        4829301,
        1,
    )
    assert body["created_at"].endswith("Z")
    image = fetch_png(live, body["image_url"])
    assert image.size == (512, 512)
    assert np.asarray(image.convert("L")).std() > 1  # a real picture (noise from random weights), not a blank

    # The same seed with upscale: the same picture, 4x with Lanczos (the default upscaler), pixel for pixel.
    r = live.post("/v1/generate", json={**request, "upscale": True})
    assert r.status_code == 200, r.text
    upscaled = r.json()
    assert (upscaled["width"], upscaled["height"], upscaled["seed"]) == (2048, 2048, 4829301)
    big = fetch_png(live, upscaled["image_url"])
    assert big.size == (2048, 2048)
    expected = image.convert("RGB").resize((2048, 2048), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(big.convert("RGB")), np.asarray(expected))

    gen_id = body["generation_id"]
    assert live.get(f"/v1/generations/{gen_id}").json() == body
    listed = live.get("/v1/generations", params={"limit": 2}).json()
    assert [g["generation_id"] for g in listed["data"]] == [upscaled["generation_id"], gen_id]  # newest first
    assert listed["total"] >= 2

    for done in (body, upscaled):
        assert live.delete(f"/v1/generations/{done['generation_id']}").json() == {
            "deleted": True,
            "id": done["generation_id"],
        }
        gone = live.get(f"/v1/generations/{done['generation_id']}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert live.get(done["image_url"]).status_code == 404


def test_errors_in_genpicz_shape(live: httpx.Client) -> None:
    r = live.post("/v1/generate", json={"prompt": "x", "style": "vaporwave"})
    assert r.status_code == 422
    assert r.json()["error"] | {"message": ""} == {
        "code": "invalid_request",
        "message": "",
        "status": 422,
        "param": "style",
    }
    styles = live.get("/v1/styles").json()["styles"]
    assert {"auto", "cinematic", "photograph"} <= {s["id"] for s in styles}


def test_style_thumbnail_is_made_by_the_default_model_and_kept(live: httpx.Client) -> None:
    styles = {s["id"]: s for s in live.get("/v1/styles").json()["styles"]}
    url = styles["sketch"]["thumbnail_url"]
    image = fetch_png(live, url)
    assert image.size == (128, 128)  # demo-sd15 (models.yaml default_model) at style_thumbnail_size (conftest)
    again = live.get(url)
    assert again.headers["cache-control"].startswith("public") and again.content == live.get(url).content
