"""The GenPicz-style API (/v1/generate, /v1/generations, /v1/styles) over HTTP with the fake engine: no torch.

Every field's limit answers 422 in GenPicz's `{"error": {"code", "message", "status", "param"}}`; the styled prompt
reaches the engine and the job record; pagination, deletion and the job states are checked here. The real pipeline
runs in tests/e2e/test_genpicz_e2e.py.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import GenerationFailed, InvalidRequest, QueueFull
from pipelines.registry import Registry, load_registry
from pipelines.request import GenerationRequest
from server.api.genpicz.errors import render_genpicz
from server.errors import renderer_for
from server.jobs.db import JobRecord
from server.settings import Settings
from server.styles import StyleBook
from server.upscale import UPSCALER_NAMES, upscale
from tests.api.conftest import OpenApp
from tests.api.fake_engine import FakeEngine, seed_color

RESPONSE_KEYS = [
    "generation_id",
    "status",
    "image_url",
    "width",
    "height",
    "style",
    "seed",
    "created_at",
    "credits_used",
]
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SMALL = {"prompt": "a neon samurai", "width": 512, "height": 512}
DEMO_SDXL_STEPS = 20  # models.yaml: routes.genpicz -> demo-sdxl, defaults.steps 20


@dataclass
class GenPicz:
    client: TestClient
    engine: FakeEngine
    app: FastAPI

    def generate(self, **fields: Any) -> httpx.Response:
        return self.client.post("/v1/generate", json={**SMALL, **fields})

    def ok(self, **fields: Any) -> dict[str, Any]:
        r = self.generate(**fields)
        assert r.status_code == 200, r.text
        return r.json()

    def record(self, generation_id: str) -> JobRecord:
        view = self.app.state.jobs.task(generation_id.removeprefix("gen_"))
        assert view is not None
        return view.record

    def last_request(self) -> GenerationRequest:
        return self.engine.requests[-1]


@pytest.fixture
def make_genpicz(open_app: Callable[..., OpenApp]) -> Callable[..., GenPicz]:
    def make(reg: Registry | None = None, **overrides: Any) -> GenPicz:
        opened = open_app(reg, **overrides)
        return GenPicz(opened.client, opened.engine, opened.app)

    return make


@pytest.fixture
def gp(make_genpicz: Callable[..., GenPicz]) -> GenPicz:
    return make_genpicz()


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code and error["status"] == status and error["message"], error
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    return error


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# Generate -------------------------------------------------------------------------------------------------------------


def test_generate_answers_the_documented_body(gp: GenPicz):
    body = gp.ok(style="cinematic", seed=4829301)
    assert list(body) == RESPONSE_KEYS
    assert body["generation_id"].startswith("gen_") and len(body["generation_id"]) > 20
    assert (body["status"], body["width"], body["height"], body["style"]) == ("completed", 512, 512, "cinematic")
    assert (body["seed"], body["credits_used"]) == (4829301, 1)
    assert ISO_Z.match(body["created_at"]), body["created_at"]
    r = gp.client.get(body["image_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = png(r.content)
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert image.convert("RGB").getpixel((0, 0)) == seed_color(4829301)
    assert gp.record(body["generation_id"]).model == "demo-sdxl"  # models.yaml routes: genpicz


def test_defaults(gp: GenPicz):
    r = gp.client.post("/v1/generate", json={"prompt": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["style"]) == (1024, 1024, "auto")
    req = gp.last_request()
    assert (req.width, req.height, req.steps, req.prompt, req.negative_prompt) == (1024, 1024, 20, "x", "")
    assert req.guidance == 5.0  # demo-sdxl defaults.cfg
    assert gp.record(body["generation_id"]).webhook_url is None


def test_omitted_seed_reports_the_seed_used(gp: GenPicz):
    body = gp.ok()
    assert gp.last_request().seed == -1  # random: the engine draws it
    seed = body["seed"]
    assert isinstance(seed, int) and seed >= 0
    image = png(gp.client.get(body["image_url"]).content).convert("RGB")
    assert image.getpixel((0, 0)) == seed_color(seed)  # the fake engine paints the seed it used


@pytest.mark.parametrize(
    ("quality", "steps"),
    [("standard", DEMO_SDXL_STEPS // 2), ("hd", DEMO_SDXL_STEPS), ("ultra", DEMO_SDXL_STEPS * 3 // 2)],
)
def test_quality_maps_to_steps(gp: GenPicz, quality: str, steps: int):
    body = gp.ok(quality=quality)
    assert gp.last_request().steps == steps
    assert gp.record(body["generation_id"]).request_json["steps"] == steps


def test_quality_steps_are_settings_and_capped(make_genpicz: Callable[..., GenPicz]):
    gp = make_genpicz(genpicz_quality_steps={"standard": 0.05, "hd": 1.0, "ultra": 10.0}, max_steps=60)
    gp.ok(quality="standard")
    assert gp.last_request().steps == 1
    gp.ok(quality="ultra")
    assert gp.last_request().steps == 60  # 200 capped to max_steps


def test_style_is_applied_to_the_prompt_and_recorded(gp: GenPicz):
    cinematic = gp.app.state.styles.get("cinematic")
    body = gp.ok(prompt="a fox", negative_prompt="text, watermark", style="cinematic")
    expected_prompt, expected_negative = cinematic.apply("a fox", "text, watermark")
    assert expected_prompt.startswith("cinematic film still of a fox")
    assert expected_negative.startswith("text, watermark, ")  # the preset's negative joins the user's
    req = gp.last_request()
    assert (req.prompt, req.negative_prompt) == (expected_prompt, expected_negative)
    recorded = gp.record(body["generation_id"]).request_json
    assert recorded["style"] == "cinematic" and recorded["prompt"] == "a fox"
    assert recorded["final_prompt"] == expected_prompt and recorded["final_negative_prompt"] == expected_negative


def test_auto_style_leaves_the_prompt_as_written(gp: GenPicz):
    gp.ok(prompt="a fox", negative_prompt="blur", style="auto")
    assert (gp.last_request().prompt, gp.last_request().negative_prompt) == ("a fox", "blur")


def test_auto_works_without_an_auto_preset(make_genpicz: Callable[..., GenPicz], tmp_path: Path):
    styles = tmp_path / "styles.yaml"
    styles.write_text("styles:\n  ink:\n    name: Ink\n    prompt: 'ink drawing of {prompt}'\n")
    gp = make_genpicz(styles=styles)
    gp.ok(prompt="a fox")
    assert gp.last_request().prompt == "a fox"
    gp.ok(prompt="a fox", style="ink")
    assert gp.last_request().prompt == "ink drawing of a fox"
    assert_error(gp.generate(style="cinematic"), 422, "invalid_request", "style")


# Validation: every field, GenPicz error shape, the field named --------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1501}, "prompt"),
        ({"prompt": 12}, "prompt"),
        ({"style": "vaporwave"}, "style"),
        ({"style": 3}, "style"),
        ({"width": 500}, "width"),
        ({"width": 2048}, "width"),
        ({"width": "wide"}, "width"),
        ({"height": 64}, "height"),
        ({"quality": "max"}, "quality"),
        ({"negative_prompt": "x" * 501}, "negative_prompt"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "lucky"}, "seed"),
        ({"upscale": "maybe"}, "upscale"),
        ({"upscale": True, "width": 1280, "height": 1024}, "upscale"),
        ({"webhook_url": "http://example.com/hook"}, "webhook_url"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"webhook_url": "https://"}, "webhook_url"),
        ({"webhook_url": "https://127.0.0.1/hook"}, "webhook_url"),  # the webhook policy: no loopback targets
        ({"webhook_url": "https://user:pw@example.com/hook"}, "webhook_url"),
        ({"webhook_url": "https://example.com/" + "a" * 2100}, "webhook_url"),
    ],
)
def test_invalid_fields_are_named(gp: GenPicz, fields: dict[str, Any], param: str):
    body = {**SMALL, **fields}
    if fields.get("prompt", "") is None:
        del body["prompt"]
    assert_error(gp.client.post("/v1/generate", json=body), 422, "invalid_request", param)
    assert gp.engine.requests == []  # refused before it reached the engine


def test_limits_themselves_are_accepted(gp: GenPicz):
    body = gp.ok(prompt="x" * 1500, negative_prompt="y" * 500, seed=2**32 - 1, width=1920, height=768)
    assert (body["width"], body["height"], body["seed"]) == (1920, 768, 2**32 - 1)
    assert gp.ok(seed=0)["seed"] == 0


def test_unknown_style_lists_the_presets(gp: GenPicz):
    error = assert_error(gp.generate(style="vaporwave"), 422, "invalid_request", "style")
    assert "cinematic" in error["message"] and "technical_diagram" in error["message"]


def test_server_size_caps_name_the_field(make_genpicz: Callable[..., GenPicz]):
    gp = make_genpicz(max_width=1024)
    assert_error(gp.generate(width=1280), 422, "invalid_request", "width")
    assert gp.ok(width=1024, height=1280)["height"] == 1280  # max_height is still 2048


def test_not_json_is_an_error_in_genpicz_shape(gp: GenPicz):
    r = gp.client.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request")


# Upscale, webhooks ----------------------------------------------------------------------------------------------------


def test_upscale_is_4x_with_the_configured_upscaler(gp: GenPicz):
    body = gp.ok(upscale=True, seed=77)
    assert gp.last_request().width == 512  # the model makes 512; the stored image is 4x
    assert (body["width"], body["height"]) == (2048, 2048)
    image = png(gp.client.get(body["image_url"]).content)
    assert image.size == (2048, 2048) and image.convert("RGB").getpixel((2047, 2047)) == seed_color(77)
    assert gp.record(body["generation_id"]).request_json["upscale"] is True


def test_upscale_pixel_cap_is_a_setting(make_genpicz: Callable[..., GenPicz]):
    gp = make_genpicz(genpicz_max_upscaled_pixels=2048 * 2048)
    assert gp.ok(upscale=True)["width"] == 2048
    error = assert_error(gp.generate(upscale=True, width=768), 422, "invalid_request", "upscale")
    assert "genpicz_max_upscaled_pixels" in error["message"]
    assert gp.ok(upscale=False, width=768)["width"] == 768


@pytest.mark.parametrize("all_plans", [False, True])
def test_upscale_is_for_the_studio_plan(make_genpicz: Callable[..., GenPicz], all_plans: bool):
    """Seed 001: "Studio plan only": other plans get a 403 in GenPicz's shape, unless genpicz_upscale_all_plans."""
    gp = make_genpicz(genpicz_upscale_all_plans=all_plans)
    keys = gp.app.state.keys
    studio, pro = keys.create("s", plan="studio"), keys.create("p", plan="pro")
    admin = keys.create("root", plan="starter", admin=True)

    def post(key: Any, **fields: Any) -> httpx.Response:
        body = {**SMALL, "width": 512, "height": 512, **fields}
        return gp.client.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {key.secret}"})

    assert post(studio, upscale=True).json()["width"] == 2048
    assert post(admin, upscale=True).json()["width"] == 2048
    assert post(pro, upscale=False).json()["width"] == 512
    r = post(pro, upscale=True)
    if all_plans:
        assert r.status_code == 200 and r.json()["width"] == 2048
    else:
        error = assert_error(r, 403, "plan_not_allowed", "upscale")
        assert "Studio" in error["message"] and "'pro'" in error["message"]
        assert len(gp.engine.requests) == 3  # refused before it reached the engine


def test_upscalers_by_name():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    image.putpixel((0, 0), (250, 0, 0))
    for name in UPSCALER_NAMES:
        assert upscale(image, 4, name).size == (12, 8)
    nearest = upscale(image, 4, "Nearest")  # names are case-insensitive (A1111 writes "Lanczos")
    assert nearest.getpixel((3, 3)) == (250, 0, 0) and nearest.getpixel((4, 4)) == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown upscaler"):
        upscale(image, 4, "esrgan")
    with pytest.raises(ValueError):
        Settings(genpicz_upscaler="esrgan")


# Webhook targets on loopback (allowed here by setting): a delivery attempt, once webhooks are wired, stays local.
LOOPBACK_HOOKS = {"webhook_allowed_networks": ["127.0.0.1/32"]}


def test_webhook_url_is_stored_on_the_job_not_in_request_json(make_genpicz: Callable[..., GenPicz]):
    gp = make_genpicz(**LOOPBACK_HOOKS)
    url = "https://127.0.0.1:9/genpicz?token=secret"
    body = gp.ok(webhook_url=url)
    record = gp.record(body["generation_id"])
    assert record.webhook_url == url
    assert "webhook_url" not in record.request_json and "secret" not in str(record.request_json)


def test_http_webhooks_only_when_allowed(make_genpicz: Callable[..., GenPicz]):
    assert_error(make_genpicz(**LOOPBACK_HOOKS).generate(webhook_url="http://127.0.0.1:9/hook"), 422, "invalid_request")
    gp = make_genpicz(webhook_allow_http=True, **LOOPBACK_HOOKS)
    body = gp.ok(webhook_url="http://127.0.0.1:9/hook")
    assert gp.record(body["generation_id"]).webhook_url == "http://127.0.0.1:9/hook"
    assert_error(gp.generate(webhook_url="ftp://10.0.0.5/hook"), 422, "invalid_request", "webhook_url")


# Engine errors --------------------------------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(gp: GenPicz):
    gp.engine.submit_error = QueueFull(retry_after_s=7)
    r = gp.generate()
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.headers["retry-after"] == "7"


def test_failed_generation_is_500_and_reads_back_failed(gp: GenPicz):
    gp.engine.fail_with = GenerationFailed("the sampler produced NaNs")
    error = assert_error(gp.generate(seed=5), 500, "generation_failed")
    assert "NaNs" in error["message"]
    (failed,) = gp.client.get("/v1/generations").json()["data"]
    assert failed["status"] == "failed" and failed["image_url"] is None and failed["credits_used"] == 0
    assert failed["error"]["code"] == "generation_failed" and "NaNs" in failed["error"]["message"]
    assert failed["seed"] == 5 and failed["width"] == 512
    assert gp.client.get(f"/v1/generations/{failed['generation_id']}").json() == failed


def test_engine_field_errors_name_the_wire_field(gp: GenPicz):
    gp.engine.submit_error = InvalidRequest("steps", "too many steps for this model")
    assert_error(gp.generate(), 422, "invalid_request", "quality")


def test_unmapped_route(make_genpicz: Callable[..., GenPicz], tmp_path: Path):
    models = tmp_path / "models.yaml"
    models.write_text("default_model: m\nmodels:\n  m:\n    family: sdxl\n    source: demo:sdxl\n")
    gp = make_genpicz(reg=load_registry(models))
    error = assert_error(gp.generate(), 404, "route_not_mapped")
    assert "genpicz" in error["message"]


def test_sync_timeout_is_504_naming_the_generation(make_genpicz: Callable[..., GenPicz]):
    gp = make_genpicz(sync_timeout_s=0.3)
    gp.engine.block()
    r = gp.generate(seed=9)
    error = assert_error(r, 504, "timeout")
    gen_id = error["generation_id"]
    assert r.headers["location"].endswith(f"/v1/generations/{gen_id}")
    pending = gp.client.get(f"/v1/generations/{gen_id}").json()
    assert pending["status"] == "processing" and pending["image_url"] is None and pending["seed"] == 9
    gp.engine.release()
    deadline = time.monotonic() + 10
    while (done := gp.client.get(f"/v1/generations/{gen_id}").json())["status"] != "completed":
        assert time.monotonic() < deadline, done
        time.sleep(0.02)
    assert done["image_url"] and done["credits_used"] == 1


def test_queued_and_processing_states(gp: GenPicz):
    gp.engine.block()
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(gp.generate())) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(listed := gp.client.get("/v1/generations").json()["data"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gp.engine.wait_for_running()
    listed = gp.client.get("/v1/generations").json()["data"]
    states = sorted(g["status"] for g in listed)
    assert states == ["processing", "queued"], listed
    for g in listed:
        assert g["image_url"] is None and g["credits_used"] == 0 and "error" not in g
        assert list(g) == RESPONSE_KEYS
    gp.engine.release()
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200, 200]
    assert {g["status"] for g in gp.client.get("/v1/generations").json()["data"]} == {"completed"}


# Listing --------------------------------------------------------------------------------------------------------------


def test_list_pages_by_limit_cursor_and_page(gp: GenPicz):
    made = [gp.ok(seed=i)["generation_id"] for i in range(5)]
    newest_first = made[::-1]

    first = gp.client.get("/v1/generations", params={"limit": 2}).json()
    assert list(first) == ["data", "total", "limit", "has_more", "next_cursor", "page"]
    assert [g["generation_id"] for g in first["data"]] == newest_first[:2]
    assert (first["total"], first["limit"], first["has_more"], first["page"]) == (5, 2, True, 1)

    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = gp.client.get("/v1/generations", params=params).json()
        seen += [g["generation_id"] for g in page["data"]]
        assert page["total"] == 5 + pages  # one new generation per page so far
        pages += 1
        if cursor:
            assert page["page"] is None
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
        assert gp.ok(seed=99)  # a new generation does not shift the cursor's next page
    assert seen == newest_first and pages == 3

    by_page = [gp.client.get("/v1/generations", params={"limit": 2, "page": n}).json() for n in (2, 3, 4, 5)]
    newest_first = [g["generation_id"] for g in gp.client.get("/v1/generations", params={"limit": 100}).json()["data"]]
    assert len(newest_first) == 7
    assert [g["generation_id"] for g in by_page[0]["data"]] == newest_first[2:4]
    assert by_page[0]["page"] == 2 and by_page[0]["has_more"] is True
    assert [g["generation_id"] for g in by_page[2]["data"]] == newest_first[6:]
    assert by_page[2]["has_more"] is False and by_page[2]["next_cursor"] is None
    assert by_page[3]["data"] == [] and by_page[3]["total"] == 7


def test_list_default_limit_is_20(gp: GenPicz):
    for i in range(21):
        gp.ok(seed=i)
    page = gp.client.get("/v1/generations").json()
    assert (len(page["data"]), page["limit"], page["total"], page["has_more"]) == (20, 20, 21, True)
    assert gp.client.get("/v1/generations", params={"limit": 100}).json()["has_more"] is False


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"page": 0}, "page"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "YzE6"}, "cursor"),  # base64 of the prefix alone
        ({"cursor": "YzE6bm9uZQ", "page": 2}, "cursor"),
    ],
)
def test_list_parameters_are_validated(gp: GenPicz, params: dict[str, Any], param: str):
    assert_error(gp.client.get("/v1/generations", params=params), 422, "invalid_request", param)


def test_list_shows_only_genpicz_generations(gp: GenPicz):
    gen_id = gp.ok()["generation_id"]
    r = gp.client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64"})
    assert r.status_code == 200, r.text
    page = gp.client.get("/v1/generations").json()
    assert page["total"] == 1 and [g["generation_id"] for g in page["data"]] == [gen_id]
    # A job of another dialect is not a generation here, even by its task address.
    other = gp.app.state.jobs.list_jobs(dialect="gateway")[0]
    assert_error(gp.client.get(f"/v1/generations/gen_{other.task_address}"), 404, "not_found")
    assert_error(gp.client.delete(f"/v1/generations/gen_{other.task_address}"), 404, "not_found")


# Get and delete -------------------------------------------------------------------------------------------------------


def test_get_returns_the_generate_body(gp: GenPicz):
    body = gp.ok(style="sketch", seed=3)
    assert gp.client.get(f"/v1/generations/{body['generation_id']}").json() == body


@pytest.mark.parametrize("gen_id", ["gen_nope", "nope", "gen_", "gen_" + "x" * 300])
def test_unknown_generation_is_404(gp: GenPicz, gen_id: str):
    assert_error(gp.client.get(f"/v1/generations/{gen_id}"), 404, "not_found")
    assert_error(gp.client.delete(f"/v1/generations/{gen_id}"), 404, "not_found")


def test_delete_removes_record_and_image(gp: GenPicz):
    keep = gp.ok(seed=1)
    body = gp.ok(seed=2)
    gen_id = body["generation_id"]
    assert gp.client.get(body["image_url"]).status_code == 200
    r = gp.client.delete(f"/v1/generations/{gen_id}")
    assert r.status_code == 200 and r.json() == {"deleted": True, "id": gen_id}
    assert_error(gp.client.get(f"/v1/generations/{gen_id}"), 404, "not_found")
    assert gp.client.get(body["image_url"]).status_code == 404
    assert_error(gp.client.delete(f"/v1/generations/{gen_id}"), 404, "not_found")
    page = gp.client.get("/v1/generations").json()
    assert page["total"] == 1 and [g["generation_id"] for g in page["data"]] == [keep["generation_id"]]
    assert gp.client.get(keep["image_url"]).status_code == 200


def test_cursor_survives_deleting_the_generation_it_points_after(gp: GenPicz):
    ids = [gp.ok(seed=i)["generation_id"] for i in range(3)]  # oldest first
    page = gp.client.get("/v1/generations", params={"limit": 1}).json()
    assert page["data"][0]["generation_id"] == ids[2]
    gp.client.delete(f"/v1/generations/{ids[2]}")
    r = gp.client.get("/v1/generations", params={"limit": 5, "cursor": page["next_cursor"]})
    assert r.status_code == 200
    assert [g["generation_id"] for g in r.json()["data"]] == [ids[1], ids[0]]


# Styles, other errors -------------------------------------------------------------------------------------------------


def test_styles_lists_the_presets(gp: GenPicz):
    book: StyleBook = gp.app.state.styles
    styles = gp.client.get("/v1/styles").json()["styles"]
    assert [s["id"] for s in styles] == book.ids()
    expected = {
        "photograph", "illustration", "digital_art", "3d_render", "painting", "sketch", "infographic",
        "technical_diagram", "cinematic", "auto",
    }  # fmt: skip
    assert expected <= {s["id"] for s in styles}
    for s in styles:
        assert set(s) == {"id", "name", "description", "thumbnail_url"} and s["name"] and s["description"]
    cinematic = next(s for s in styles if s["id"] == "cinematic")
    assert (cinematic["name"], cinematic["description"]) == ("Cinematic", book.get("cinematic").description)


def test_style_thumbnails_are_made_once_on_first_fetch(make_genpicz: Callable[..., GenPicz]):
    """Seed 001: /v1/styles lists example thumbnails. Listing makes nothing; the first fetch of a URL makes it with
    the default model (demo-sd15) at a small size, later fetches serve the stored file."""
    gp = make_genpicz(style_thumbnail_size=100, style_thumbnail_steps=2)
    styles = gp.client.get("/v1/styles").json()["styles"]
    urls = {s["id"]: s["thumbnail_url"] for s in styles}
    assert gp.engine.requests == [] and len(set(urls.values())) == len(urls)  # fast: nothing generated yet
    assert urls["cinematic"].startswith("http://testserver/v1/style-thumbnails/")
    r = gp.client.get(urls["cinematic"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert "immutable" in r.headers["cache-control"]
    assert png(r.content).size == (96, 96)  # 100 rounded down to the model's multiple
    (req,) = gp.engine.requests
    assert (req.model, req.steps, req.seed) == ("demo-sd15", 2, 0)
    assert req.prompt.startswith("cinematic film still of a lighthouse")
    again = gp.client.get(urls["cinematic"])
    assert again.content == r.content and len(gp.engine.requests) == 1  # cached in the data directory
    assert list((gp.app.state.settings.data_dir / "style-thumbnails").glob("*.png"))
    assert gp.client.get(urls["cinematic"].replace(".png", ".jpg")).status_code == 404
    assert_error(gp.client.get("/v1/style-thumbnails/" + "0" * 32 + ".png"), 404, "not_found")


def test_style_thumbnails_change_with_the_model_or_the_style(make_genpicz: Callable[..., GenPicz], tmp_path: Path):
    styles = tmp_path / "styles.yaml"
    styles.write_text("styles:\n  ink:\n    name: Ink\n    prompt: 'ink drawing of {prompt}'\n")
    data = tmp_path / "shared-data"
    first = make_genpicz(styles=styles, data_dir=data, style_thumbnail_steps=1)
    url = first.client.get("/v1/styles").json()["styles"][0]["thumbnail_url"]
    assert first.client.get(url).status_code == 200
    other_model = make_genpicz(styles=styles, data_dir=data, style_thumbnail_model="demo-sdxl")
    moved = other_model.client.get("/v1/styles").json()["styles"][0]["thumbnail_url"]
    assert moved != url and other_model.client.get(moved).status_code == 200
    assert other_model.client.get(url).status_code == 404  # made for the old model: removed when the new one came
    styles.write_text("styles:\n  ink:\n    name: Ink\n    prompt: 'sumi-e ink painting of {prompt}'\n")
    restyled = make_genpicz(styles=styles, data_dir=data, style_thumbnail_steps=1)
    new_url = restyled.client.get("/v1/styles").json()["styles"][0]["thumbnail_url"]
    assert new_url != url and restyled.client.get(new_url).status_code == 200
    assert restyled.engine.requests[-1].prompt.startswith("sumi-e ink painting of")


def test_style_thumbnails_are_public_when_keys_are_required(gp: GenPicz):
    key = gp.app.state.keys.create("alice")
    assert gp.client.get("/v1/styles").status_code == 401
    listed = gp.client.get("/v1/styles", headers={"Authorization": f"Bearer {key.secret}"})
    url = listed.json()["styles"][0]["thumbnail_url"]
    assert gp.client.get(url).status_code == 200  # no key: a public picture, as result URLs


def test_other_errors_under_genpicz_paths(gp: GenPicz):
    assert_error(gp.client.get("/v1/generations/a/b"), 404, "not_found")
    assert renderer_for(gp.app, "/v1/account") is render_genpicz  # the account route's errors, too
    assert_error(gp.client.put("/v1/generate", json=SMALL), 405, "method_not_allowed")
    assert_error(gp.client.post("/v1/styles"), 405, "method_not_allowed")
