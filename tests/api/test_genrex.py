"""Genrex-style /image/create and /image/status/{uuid} (and under /v1) over HTTP with the fake engine: no torch.

The real pipelines run in tests/e2e/test_indoxhub_genrex_e2e.py; here every field, the status flow and the error
shape are checked.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import GenerationFailed, InvalidRequest, QueueFull
from pipelines.registry import Registry
from tests.api.conftest import OpenApp
from tests.api.fake_engine import FakeEngine, with_background_removal
from tests.unit.test_jobs import CancellingFakeEngine

PROMPT = "A futuristic city skyline at sunset with flying cars"
SMALL = {"prompt": PROMPT, "size": "square", "quality": "low"}
PREFIXES = ("", "/v1")
TERMINAL = ("completed", "failed")


@dataclass
class Genrex:
    client: TestClient
    engine: FakeEngine
    app: FastAPI

    def create(self, body: dict[str, Any], prefix: str = "") -> httpx.Response:
        return self.client.post(f"{prefix}/image/create", json=body)

    def submit(self, body: dict[str, Any], prefix: str = "") -> str:
        r = self.create(body, prefix)
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["success", "id"] and r.json()["success"] is True
        return r.json()["id"]

    def status(self, image_id: str, prefix: str = "") -> httpx.Response:
        return self.client.get(f"{prefix}/image/status/{image_id}")

    def poll(self, image_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status(image_id).json()
            if body["status"] in TERMINAL:
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.02)


@pytest.fixture
def make_genrex(open_app: Callable[..., OpenApp]) -> Callable[..., Genrex]:
    def make(reg: Registry | None = None, **overrides: Any) -> Genrex:
        opened = open_app(reg, CancellingFakeEngine, **overrides)
        return Genrex(opened.client, opened.engine, opened.app)

    return make


@pytest.fixture
def gx(make_genrex: Callable[..., Genrex]) -> Genrex:
    return make_genrex()


def assert_error(r: httpx.Response, field: str | None, status: int = 422) -> dict[str, Any]:
    """Genrex's shape: `success: false` and a `message`, with the code and the field in `error`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["message"], body
    assert body["error"]["field"] == field and body["error"]["message"] == body["message"], body
    if status == 422:
        assert body["detail"][0]["loc"][-1] == field
    return body


# Validation -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "patch, field",
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": "too short"}, "prompt"),  # 9 characters
        ({"prompt": "   short   "}, "prompt"),  # whitespace does not count
        ({"prompt": "x" * 2001}, "prompt"),
        ({"model": "premium"}, "model"),
        ({"style": "baroque"}, "style"),
        ({"size": "huge"}, "size"),
        ({"size": "1024x1024"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"format": "gif"}, "format"),
        ({"background": "clear"}, "background"),
        ({"background": "transparent"}, "background"),  # no alpha-capable model configured
        ({"webhook_url": "http://example.com/hook"}, "webhook_url"),  # https only
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"webhook_url": "https:///no-host"}, "webhook_url"),
        ({"webhook_url": "https://example.com/" + "x" * 2048}, "webhook_url"),
        ({"webhook_url": "https://127.0.0.1/hook"}, "webhook_url"),  # loopback: the webhook address policy
        ({"webhook_url": "https://user:pw@example.com/hook"}, "webhook_url"),  # credentials
    ],
)
def test_each_field_is_a_422_naming_it(gx: Genrex, prefix: str, patch: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**SMALL, **patch}.items() if v is not None}
    assert_error(gx.create(body, prefix), field)
    assert gx.engine.requests == [] and gx.app.state.jobs.list_jobs() == []


def test_prompt_bounds_are_inclusive(gx: Genrex) -> None:
    gx.submit({**SMALL, "prompt": "x" * 10})
    gx.submit({**SMALL, "prompt": "x" * 2000})


def test_transparent_background_says_why(gx: Genrex) -> None:
    body = assert_error(gx.create({**SMALL, "background": "transparent"}), "background")
    assert "alpha" in body["message"] and "demo-sdxl" in body["message"]


def test_transparent_background_with_a_removal_model(make_genrex: Callable[..., Genrex], registry: Registry) -> None:
    """Seed 000's `background: transparent`: the engine is asked for alpha (models.yaml background_removal)."""
    gx = make_genrex(with_background_removal(registry))
    done = gx.poll(gx.submit({**SMALL, "background": "transparent"}))
    assert done["status"] == "completed" and gx.engine.requests[-1].transparent_background
    image = Image.open(io.BytesIO(gx.client.get(done["data"]["url"]).content))
    assert image.format == "PNG" and image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0
    assert_error(gx.create({**SMALL, "background": "transparent", "format": "jpeg"}), "format")
    gx.poll(gx.submit({**SMALL, "background": "opaque"}))
    assert not gx.engine.requests[-1].transparent_background


def test_alpha_capable_model_setting(make_genrex: Callable[..., Genrex]) -> None:
    gx = make_genrex(alpha_model_ids=["demo-sdxl"])
    assert gx.poll(gx.submit({**SMALL, "background": "transparent", "format": "webp"}))["status"] == "completed"
    assert_error(gx.create({**SMALL, "background": "transparent", "format": "jpeg"}), "format")
    assert_error(gx.create({**SMALL, "model": "basic", "background": "transparent"}), "background")  # demo-sd15


def test_size_above_the_server_caps_names_size(make_genrex: Callable[..., Genrex]) -> None:
    gx = make_genrex(max_width=1024, max_height=1024)
    for size in ("landscape", "portrait", "auto"):
        body = assert_error(gx.create({**SMALL, "size": size}), "size")
        assert "max_" in body["message"]
    gx.submit({**SMALL, "size": "square"})


def test_prompt_length_setting(make_genrex: Callable[..., Genrex]) -> None:
    gx = make_genrex(max_prompt_chars=20)
    assert_error(gx.create({**SMALL, "prompt": "x" * 21}), "prompt")


def test_nulls_mean_defaults(gx: Genrex) -> None:
    body = {"prompt": PROMPT, "model": None, "style": None, "size": None, "quality": None, "format": None}
    gx.poll(gx.submit({**body, "background": None, "webhook_url": None}))
    req = gx.engine.requests[0]
    assert (req.model, req.width, req.height, req.steps) == ("demo-sdxl", 1536, 1024, 20)
    assert req.prompt.startswith("professional photograph of ")


# Mapping: tier, size, quality, format, style --------------------------------------------------------------------------


def test_defaults_follow_the_document(gx: Genrex) -> None:
    image_id = gx.submit({"prompt": PROMPT})
    assert str(uuid.UUID(image_id)) == image_id
    done = gx.poll(image_id)
    req = gx.engine.requests[0]
    # standard tier, landscape, high quality (the model's own steps), photograph style, png
    assert (req.model, req.width, req.height, req.steps, req.guidance) == ("demo-sdxl", 1536, 1024, 20, 5.0)
    assert req.seed == -1 and req.batch_size == 1
    assert done["data"]["url"].partition("?")[0].endswith(".png")


@pytest.mark.parametrize(
    "size, expected",
    [("landscape", (1536, 1024)), ("square", (1024, 1024)), ("portrait", (1024, 1536)), ("auto", (1536, 1024))],
)
def test_named_sizes(gx: Genrex, size: str, expected: tuple[int, int]) -> None:
    done = gx.poll(gx.submit({**SMALL, "size": size}))
    req = gx.engine.requests[0]
    assert (req.width, req.height) == expected
    assert Image.open(io.BytesIO(gx.client.get(done["data"]["url"]).content)).size == expected


def test_tiers_pick_the_routed_models_and_quality_scales_steps(gx: Genrex) -> None:
    seen = []
    for tier in ("basic", "standard", "advanced"):
        for quality in ("low", "medium", "high"):
            gx.poll(gx.submit({**SMALL, "model": tier, "quality": quality}))
            req = gx.engine.requests[-1]
            seen.append((tier, quality, req.model, req.steps))
    assert seen == [
        ("basic", "low", "demo-sd15", 10),
        ("basic", "medium", "demo-sd15", 15),
        ("basic", "high", "demo-sd15", 20),
        ("standard", "low", "demo-sdxl", 10),
        ("standard", "medium", "demo-sdxl", 15),
        ("standard", "high", "demo-sdxl", 20),
        ("advanced", "low", "demo-flux", 4),
        ("advanced", "medium", "demo-flux", 6),
        ("advanced", "high", "demo-flux", 8),
    ]
    routes = {r.route for r in gx.app.state.jobs.list_jobs(dialect="genrex")}
    assert routes == {"genrex-basic", "genrex-standard", "genrex-advanced"}


def test_quality_steps_setting(make_genrex: Callable[..., Genrex]) -> None:
    gx = make_genrex(genrex_quality_steps={"low": 0.01, "medium": 1.0, "high": 100.0})
    gx.poll(gx.submit({**SMALL, "quality": "low"}))
    gx.poll(gx.submit({**SMALL, "quality": "high"}))
    assert [r.steps for r in gx.engine.requests] == [1, 150]  # at least 1, at most max_steps


@pytest.mark.parametrize(
    "fmt, ext, content_type",
    [("png", "png", "image/png"), ("jpeg", "jpg", "image/jpeg"), ("webp", "webp", "image/webp")],
)
def test_formats(gx: Genrex, fmt: str, ext: str, content_type: str) -> None:
    done = gx.poll(gx.submit({**SMALL, "format": fmt}))
    assert done["data"]["url"].partition("?")[0].endswith("." + ext)
    image = gx.client.get(done["data"]["url"])
    assert image.headers["content-type"] == content_type
    assert Image.open(io.BytesIO(image.content)).format == fmt.upper()


def test_style_is_applied_and_recorded_with_the_final_prompt(gx: Genrex) -> None:
    gx.poll(gx.submit({**SMALL, "style": "technical_diagram"}))
    req = gx.engine.requests[0]
    assert req.prompt == (
        f"technical diagram of {PROMPT}, clean line art, labeled parts, white background, schematic, top-down view"
    )
    assert req.negative_prompt == "photo, painting, shading, cluttered background, blurry"
    (record,) = gx.app.state.jobs.list_jobs(dialect="genrex")
    recorded = record.request_json
    assert (recorded["style"], recorded["prompt"], recorded["final_prompt"]) == (
        "technical_diagram",
        PROMPT,
        req.prompt,
    )
    assert recorded["final_negative_prompt"] == req.negative_prompt
    assert (recorded["size"], recorded["quality"], recorded["format"], recorded["model"]) == (
        "square",
        "low",
        "png",
        "standard",
    )


@pytest.mark.parametrize(
    "style", ["photograph", "illustration", "digital_art", "3d_render", "painting", "sketch", "infographic"]
)
def test_every_documented_style_is_a_preset(gx: Genrex, style: str) -> None:
    gx.poll(gx.submit({**SMALL, "style": style}))
    assert gx.engine.requests[0].prompt != PROMPT and PROMPT in gx.engine.requests[0].prompt


def test_webhook_url_is_stored_on_the_job(gx: Genrex) -> None:
    url = "https://hooks.example.com/genrex/done?token=secret"
    image_id = gx.submit({**SMALL, "webhook_url": url})
    record = gx.app.state.jobs.task_by_id(uuid.UUID(image_id).hex).record
    assert record.webhook_url == url
    assert "webhook_url" not in record.request_json  # it may carry a secret; the record's own column has it
    image_id = gx.submit({**SMALL, "webhook_url": ""})  # empty: none
    assert gx.app.state.jobs.task_by_id(uuid.UUID(image_id).hex).record.webhook_url is None


def test_another_keys_image_is_404(gx: Genrex) -> None:
    alice, bob = gx.app.state.keys.create("alice"), gx.app.state.keys.create("bob")
    as_alice, as_bob = ({"Authorization": f"Bearer {k.secret}"} for k in (alice, bob))
    r = gx.client.post("/image/create", json=SMALL, headers=as_alice)
    assert r.status_code == 200, r.text
    image_id = r.json()["id"]
    assert_error(gx.client.get(f"/image/status/{image_id}", headers=as_bob), None, status=404)
    assert gx.client.get(f"/image/status/{image_id}", headers=as_alice).json()["id"] == image_id


# Status flow ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_status_flow_queued_processing_completed(gx: Genrex, prefix: str) -> None:
    gx.engine.block()
    first = gx.submit(SMALL, prefix)
    gx.engine.wait_for_running()
    second = gx.submit(SMALL, prefix)
    running = gx.status(first, prefix).json()
    assert running == {"success": True, "id": first, "status": "processing", "data": None}
    assert gx.status(second, prefix).json() == {"success": True, "id": second, "status": "queued", "data": None}
    gx.engine.release()
    done = gx.poll(first)
    assert list(done) == ["success", "id", "status", "data"]
    assert (done["success"], done["id"], done["status"]) == (True, first, "completed")
    url = done["data"]["url"]
    assert url.startswith("http://testserver/v2/results/") and url.partition("?")[0].endswith(".png")
    image = gx.client.get(url)
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (1024, 1024)
    assert gx.status(first, prefix).json() == done  # stable across reads and prefixes
    assert gx.poll(second)["data"]["url"] != url


def test_status_accepts_the_id_in_any_uuid_spelling(gx: Genrex) -> None:
    image_id = gx.submit(SMALL)
    gx.poll(image_id)
    for spelling in (image_id.upper(), uuid.UUID(image_id).hex, f"{{{image_id}}}"):
        assert gx.status(spelling).json()["status"] == "completed"


def test_failed_job_has_a_clear_error(gx: Genrex) -> None:
    gx.engine.fail_with = GenerationFailed("out of GPU memory for this request: try a smaller size")
    done = gx.poll(gx.submit(SMALL))
    assert (done["status"], done["data"]) == ("failed", None)
    assert done["error"] == {
        "code": "generation_failed",
        "message": "out of GPU memory for this request: try a smaller size",
    }


def test_cancelled_job_reads_as_failed(gx: Genrex) -> None:
    gx.engine.block()
    image_id = gx.submit(SMALL)
    gx.engine.wait_for_running()
    record = gx.app.state.jobs.task_by_id(uuid.UUID(image_id).hex).record
    ticket = gx.app.state.jobs.cancel(record.task_address)
    ticket.finished.result(timeout=5)
    done = gx.status(image_id).json()
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_unknown_malformed_and_foreign_ids_are_404(gx: Genrex, prefix: str) -> None:
    for image_id in ("not-a-uuid", str(uuid.uuid4()), "7c9e6679-7425-40de-944b-e07fc1f90ae7x"):
        body = assert_error(gx.status(image_id, prefix), None, status=404)
        assert body["error"]["code"] == "image_not_found"
    # A job of another dialect is not a Genrex image.
    r = gx.client.post("/v2/image/qwen/generate", json={"prompt": "a fox", "size": "64x64"})
    assert r.status_code == 200, r.text
    (record,) = gx.app.state.jobs.list_jobs(dialect="gateway")
    assert_error(gx.status(str(uuid.UUID(record.id)), prefix), None, status=404)


def test_deleted_job_is_404(gx: Genrex) -> None:
    image_id = gx.submit(SMALL)
    url = gx.poll(image_id)["data"]["url"]
    assert gx.app.state.jobs.delete(uuid.UUID(image_id).hex)
    assert_error(gx.status(image_id), None, status=404)
    assert gx.client.get(url).status_code == 404


# Engine refusals in Genrex's shape ------------------------------------------------------------------------------------


def test_engine_refusals_in_the_dialect_shape(gx: Genrex) -> None:
    gx.engine.submit_error = QueueFull(retry_after_s=3)
    r = gx.create(SMALL)
    body = assert_error(r, None, status=429)
    assert body["error"]["code"] == "queue_full" and r.headers["retry-after"] == "3"
    gx.engine.submit_error = InvalidRequest("height", "too tall for this model")
    assert_error(gx.create(SMALL, "/v1"), "size")
    gx.engine.submit_error = None
    assert gx.app.state.jobs.list_jobs() == []  # refused jobs leave no record


def test_unmapped_tier_is_a_clear_404(make_genrex: Callable[..., Genrex], registry: Registry) -> None:
    gx = make_genrex(Registry([registry.get("demo-sd15")], routes={"genrex-basic": "demo-sd15"}))
    body = assert_error(gx.create({**SMALL, "model": "advanced"}), None, status=404)
    assert "genrex-advanced" in body["message"] and "routes:" in body["message"]
    gx.poll(gx.submit({**SMALL, "model": "basic"}))


def test_other_errors_under_image_use_the_shape(gx: Genrex) -> None:
    assert_error(gx.client.get("/image/create"), None, status=405)
    assert_error(gx.client.get("/v1/image/nothing"), None, status=404)
    r = gx.client.post("/image/create", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["success"] is False
