"""The /v2/image gateway, /v2/tasks and /v2/results over HTTP (ASGI test client) with the fake engine: no torch.

The real pipelines run in tests/e2e/test_gateway_e2e.py; here every field, limit, flow and error shape is checked fast.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import InvalidRequest, QueueFull
from pipelines.registry import Registry, load_registry
from pipelines.request import Task
from server.api.gateway.sizes import gemini_size
from server.jobs.db import utcnow
from server.jobs.store import RESTART_ERROR, JobStore, NewJob
from server.settings import Settings
from tests.api.conftest import OpenApp
from tests.api.fake_engine import FakeEngine, seed_color
from tests.image_helpers import decode_b64
from tests.unit.test_jobs import CancellingFakeEngine

GATEWAY_ROUTES = {
    "flux": "/v2/image/flux/generate",
    "qwen": "/v2/image/qwen/generate",
    "qwen-edit": "/v2/image/qwen/edit",
    "gpt-image": "/v2/image/gpt-image/generate",
    "gpt-image-edit": "/v2/image/gpt-image/edit",
    "gemini-3": "/v2/image/gemini-3/generate",
}


def png_b64(width: int = 64, height: int = 64, color: Any = (10, 200, 30), mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# Small requests for each route (the fake engine draws solid colours at the requested size).
SMALL = {
    "flux": {"prompt": "a fox", "width": 64, "height": 96, "seed": 11},
    "qwen": {"prompt": "a fox", "size": "96x64", "seed": 12},
    "qwen-edit": {"prompt": "make it blue", "image": png_b64(), "size": "64x64", "seed": 13},
    "gpt-image": {"prompt": "a fox", "size": "auto", "quality": "low"},
    "gpt-image-edit": {"prompt": "add a hat", "image": png_b64(), "size": "auto"},
    "gemini-3": {"prompt": "a fox", "aspect_ratio": "16:9"},
}


@dataclass
class Gateway:
    client: TestClient
    engine: FakeEngine
    app: FastAPI
    settings: Settings

    def post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(GATEWAY_ROUTES[route], json=body)

    def poll(self, task_address: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get(f"/v2/tasks/{task_address}").json()
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.02)


@pytest.fixture
def make_gateway(tmp_path: Path, open_app: Callable[..., OpenApp]) -> Callable[..., Gateway]:
    def make(reg: Registry | None = None, data_dir: Path | None = None, **overrides: Any) -> Gateway:
        opened = open_app(reg, CancellingFakeEngine, data_dir=data_dir or tmp_path / "data", **overrides)
        return Gateway(opened.client, opened.engine, opened.app, opened.settings)

    return make


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


def assert_field_error(r: httpx.Response, field: str, status: int = 422) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["field"] == field, body
    assert body["error"]["message"]
    if status == 422:
        assert [d["loc"][-1] for d in body["detail"]][0] == field


# Validation: every limit is a 422 naming its field --------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, patch, field",
    [
        ("flux", {"prompt": None}, "prompt"),
        ("flux", {"prompt": ""}, "prompt"),
        ("flux", {"width": 32}, "width"),
        ("flux", {"width": 100}, "width"),
        ("flux", {"height": 48}, "height"),
        ("flux", {"height": 1000}, "height"),
        ("flux", {"width": 4096}, "width"),  # above max_width
        ("flux", {"height": "tall"}, "height"),
        ("flux", {"seed": -2}, "seed"),
        ("flux", {"seed": 2**64}, "seed"),
        ("flux", {"safety_tolerance": -1}, "safety_tolerance"),
        ("flux", {"safety_tolerance": 7}, "safety_tolerance"),
        ("flux", {"output_format": "gif"}, "output_format"),
        ("flux", {"input_image": "not base64!"}, "input_image"),
        ("flux", {"input_image_3": base64.b64encode(b"not an image").decode()}, "input_image_3"),
        ("flux", {"async": "maybe"}, "async"),
        ("qwen", {"size": "big"}, "size"),
        ("qwen", {"size": "65x64"}, "size"),
        ("qwen", {"size": "64x72"}, "size"),
        ("qwen", {"size": "32x64"}, "size"),
        ("qwen", {"size": "4096x1024"}, "size"),
        ("qwen", {"seed": "x"}, "seed"),
        ("qwen-edit", {"image": None}, "image"),
        ("qwen-edit", {"image": "%%%"}, "image"),
        ("qwen-edit", {"image": "ftp://example.com/a.png"}, "image"),
        ("qwen-edit", {"prompt": None}, "prompt"),
        ("qwen-edit", {"size": "64"}, "size"),
        ("gpt-image", {"size": "512x512"}, "size"),
        ("gpt-image", {"quality": "ultra"}, "quality"),
        ("gpt-image", {"n": 0}, "n"),
        ("gpt-image", {"n": 5}, "n"),
        ("gpt-image-edit", {"image": None}, "image"),
        ("gpt-image-edit", {"image": png_b64()[:40]}, "image"),
        ("gpt-image-edit", {"mask": "@@@"}, "mask"),
        ("gpt-image-edit", {"n": 5}, "n"),
        ("gpt-image-edit", {"size": "100x100"}, "size"),
        ("gpt-image-edit", {"quality": "best"}, "quality"),
        ("gemini-3", {"aspect_ratio": "7:3"}, "aspect_ratio"),
        ("gemini-3", {"image_size": "8K"}, "image_size"),
        ("gemini-3", {"prompt": ""}, "prompt"),
    ],
)
def test_each_limit_is_a_422_naming_the_field(gw: Gateway, route: str, patch: dict[str, Any], field: str) -> None:
    body = {**SMALL[route], **patch}
    body = {k: v for k, v in body.items() if v is not None}
    assert_field_error(gw.post(route, body), field)
    assert gw.engine.requests == []  # nothing ran
    assert gw.client.app.state.jobs.list_jobs() == []  # nothing recorded


def test_prompt_length_limit(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(max_prompt_chars=10)
    for route in GATEWAY_ROUTES:
        assert_field_error(gw.post(route, {**SMALL[route], "prompt": "x" * 11}), "prompt")


def test_loopback_image_url_is_refused_without_allow_list(gw: Gateway) -> None:
    r = gw.post("qwen-edit", {**SMALL["qwen-edit"], "image": "http://127.0.0.1:9/image.png"})
    assert_field_error(r, "image")
    assert "loopback" in r.json()["error"]["message"]
    r = gw.post("qwen-edit", {**SMALL["qwen-edit"], "image": "http://169.254.169.254/latest/meta-data"})
    assert_field_error(r, "image")
    assert "metadata" in r.json()["error"]["message"]


def test_image_urls_only_on_qwen_edit(gw: Gateway) -> None:
    r = gw.post("gpt-image-edit", {**SMALL["gpt-image-edit"], "image": "https://example.com/a.png"})
    assert_field_error(r, "image")  # the document says base64 here; refused without any connection


# Routes: sync bodies --------------------------------------------------------------------------------------------------


def test_flux_sync_returns_base64_images_of_the_requested_size(gw: Gateway) -> None:
    r = gw.post("flux", SMALL["flux"])
    assert r.status_code == 200, r.text
    assert list(r.json()) == ["images"]
    image = decode_b64(r.json()["images"][0])
    assert (image.format, image.size, image.getpixel((0, 0))) == ("PNG", (64, 96), seed_color(11))
    req = gw.engine.requests[0]
    assert (req.model, req.task, req.width, req.height, req.seed) == ("demo-flux", Task.TXT2IMG, 64, 96, 11)
    assert req.steps == 8 and req.guidance == 3.5  # the model's defaults (models.yaml)
    assert req.tags["safety_tolerance"] == 2


def test_flux_jpeg_and_defaults(gw: Gateway) -> None:
    r = gw.post("flux", {"prompt": "a fox", "output_format": "jpeg", "safety_tolerance": 6})
    image = decode_b64(r.json()["images"][0])
    assert (image.format, image.size) == ("JPEG", (1024, 1024))  # width/height default 1024
    assert gw.engine.requests[0].seed == -1 and gw.engine.requests[0].tags["safety_tolerance"] == 6


def test_flux_seed_reproducible(gw: Gateway) -> None:
    first = gw.post("flux", SMALL["flux"]).json()
    assert gw.post("flux", SMALL["flux"]).json() == first
    other = gw.post("flux", {**SMALL["flux"], "seed": 12}).json()
    assert other != first


def test_flux_reference_images(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    gw = make_gateway()
    one = gw.post("flux", {**SMALL["flux"], "input_image": png_b64(80, 80)})
    assert one.status_code == 200 and len(one.json()["images"]) == 1
    req = gw.engine.requests[-1]
    assert (req.task, len(req.init_images), req.strength) == (Task.IMG2IMG, 1, 0.75)

    # Several references on an image-to-image model: one output per reference.
    references = {"input_image": png_b64(), "input_image_2": png_b64(color="red"), "input_image_4": png_b64()}
    body = {**SMALL["flux"], **references}
    r = gw.post("flux", body)
    assert r.status_code == 200 and len(r.json()["images"]) == 3
    req = gw.engine.requests[-1]
    assert (req.task, len(req.init_images), req.batch_size) == (Task.IMG2IMG, 3, 3)

    # An edit model (Kontext-style) mapped to the route gets the references stitched into one.
    edit = registry_with_routes(tmp_path, {"flux": "demo-qwen-image-edit"})
    gw2 = make_gateway(edit, data_dir=tmp_path / "data2")
    r = gw2.post("flux", {**body, "width": 128, "height": 64})
    assert r.status_code == 200, r.text
    req = gw2.engine.requests[-1]
    assert (req.task, len(req.init_images), req.init_images[0].size) == (Task.EDIT, 1, (192, 64))


def test_flux_kontext_gets_one_stitched_reference(make_gateway: Callable[..., Gateway], registry: Registry) -> None:
    kontext = registry.get("demo-flux").model_copy(update={"id": "kontext", "variant": "flux-kontext"})
    gw = make_gateway(Registry([kontext], routes={"flux": "kontext"}))
    references = {"input_image": png_b64(64, 64), "input_image_2": png_b64(32, 64)}
    r = gw.post("flux", {**SMALL["flux"], **references})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    req = gw.engine.requests[0]
    assert (req.task, len(req.init_images), req.init_images[0].size) == (Task.IMG2IMG, 1, (96, 64))


def test_qwen_returns_absolute_urls_to_png_files(gw: Gateway) -> None:
    r = gw.post("qwen", SMALL["qwen"])
    assert r.status_code == 200 and list(r.json()) == ["urls"]
    (url,) = r.json()["urls"]
    assert url.startswith("http://testserver/v2/results/") and url.partition("?")[0].endswith(".png")
    image = gw.client.get(url)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(image.content)).size == (96, 64)
    job = gw.app.state.jobs.list_jobs()[0]
    expires = job.expires_at - job.finished_at
    assert expires.total_seconds() == 7 * 24 * 3600


def test_qwen_edit_with_base64_runs_the_edit_model(gw: Gateway) -> None:
    r = gw.post("qwen-edit", SMALL["qwen-edit"])
    assert r.status_code == 200, r.text
    req = gw.engine.requests[0]
    assert (req.model, req.task, req.width, req.height) == ("demo-qwen-image-edit", Task.EDIT, 64, 64)
    assert req.init_images[0].size == (64, 64)


@pytest.fixture
def image_server() -> Iterator[str]:
    files = {"/cat.png": base64.b64decode(png_b64(40, 30, "blue")), "/big.png": b"\x89PNG" + bytes(64 * 1024)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path.split("?")[0], b"missing")
            self.send_response(200 if body != b"missing" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_qwen_edit_fetches_an_allowed_url(make_gateway: Callable[..., Gateway], image_server: str) -> None:
    gw = make_gateway(fetch_allowed_networks=["127.0.0.1/32"])
    r = gw.post("qwen-edit", {**SMALL["qwen-edit"], "image": f"{image_server}/cat.png?sig=secret"})
    assert r.status_code == 200, r.text
    assert gw.engine.requests[0].init_images[0].size == (40, 30)
    recorded = gw.app.state.jobs.list_jobs()[0].request_json
    assert recorded["image"] == f"{image_server}/cat.png"  # no query string (signatures) in the database
    r = gw.post("qwen-edit", {**SMALL["qwen-edit"], "image": f"{image_server}/nothing.png"})
    assert_field_error(r, "image")
    assert "HTTP 404" in r.json()["error"]["message"]


def test_qwen_edit_url_size_cap(make_gateway: Callable[..., Gateway], image_server: str) -> None:
    gw = make_gateway(fetch_allowed_networks=["127.0.0.0/8"], fetch_max_bytes=4096)
    r = gw.post("qwen-edit", {**SMALL["qwen-edit"], "image": f"{image_server}/big.png"})
    assert_field_error(r, "image", status=413)
    assert "limit" in r.json()["error"]["message"] and gw.engine.requests == []


def test_gpt_image_sizes_quality_and_n(gw: Gateway) -> None:
    r = gw.post("gpt-image", {"prompt": "a fox", "size": "1536x1024", "quality": "high", "n": 3})
    assert r.status_code == 200, r.text
    urls = r.json()["images"]
    assert len(urls) == 3 and all(u.startswith("http://testserver/v2/results/") for u in urls)
    assert Image.open(io.BytesIO(gw.client.get(urls[2]).content)).size == (1536, 1024)
    req = gw.engine.requests[0]
    assert (req.model, req.batch_size, req.steps) == ("demo-sdxl", 3, 30)  # high = 1.5 x 20
    steps = {}
    for quality in ("low", "medium", "auto"):
        gw.post("gpt-image", {"prompt": "a fox", "size": "auto", "quality": quality})
        steps[quality] = gw.engine.requests[-1].steps
    assert steps == {"low": 10, "medium": 20, "auto": 20}
    assert (gw.engine.requests[-1].width, gw.engine.requests[-1].height) == (512, 512)  # auto: the model's default


def test_gpt_image_quality_steps_setting(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(gpt_image_quality_steps={"low": 0.01, "high": 100.0})
    gw.post("gpt-image", {"prompt": "a fox", "size": "auto", "quality": "low"})
    gw.post("gpt-image", {"prompt": "a fox", "size": "auto", "quality": "high"})
    assert [r.steps for r in gw.engine.requests] == [1, 150]  # at least 1, at most max_steps


def test_gpt_image_edit_with_mask_is_inpainting(gw: Gateway) -> None:
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    body = {"prompt": "add a hat", "image": png_b64(96, 64), "mask": base64.b64encode(buf.getvalue()).decode()}
    r = gw.post("gpt-image-edit", {**body, "size": "auto", "n": 2})
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    req = gw.engine.requests[0]
    assert (req.task, req.width, req.height, req.strength, req.batch_size) == (Task.INPAINT, 96, 64, 1.0, 2)
    assert req.mask.mode == "L" and req.mask.getpixel((0, 0)) == 255 and req.mask.getpixel((95, 0)) == 0
    assert req.inpaint.composite_original and not req.inpaint.full_res

    r = gw.post("gpt-image-edit", {"prompt": "add a hat", "image": png_b64(96, 64)})  # default size 1024x1024
    req = gw.engine.requests[1]
    assert (req.task, req.width, req.height, req.strength) == (Task.IMG2IMG, 1024, 1024, 0.75)


def test_gemini_sizes(gw: Gateway) -> None:
    r = gw.post("gemini-3", {"prompt": "a fox"})
    assert decode_b64(r.json()["images"][0]).size == (1024, 1024)  # defaults 1:1, 1K
    r = gw.post("gemini-3", {"prompt": "a fox", "aspect_ratio": "9:16", "image_size": "2K"})
    assert decode_b64(r.json()["images"][0]).size == (1152, 2048)  # 2K, capped by max_height 2048


def test_gemini_4k_is_made_at_the_model_size_and_upscaled(gw: Gateway) -> None:
    """Seed 003: 4K is 4096^2 for 1:1. Beyond the caps, the model (demo-flux, 512^2) makes the ratio at its own size and
    the stored image is resized to 4K; the response and the task say so."""
    r = gw.post("gemini-3", {"prompt": "a fox", "image_size": "4K"})
    assert r.status_code == 200, r.text
    image = decode_b64(r.json()["images"][0]).convert("RGB")
    assert image.size == (4096, 4096) and image.getpixel((4095, 0)) == image.getpixel((0, 4095))  # the fake's colour
    assert (gw.engine.requests[-1].width, gw.engine.requests[-1].height) == (512, 512)
    assert "made at 512x512 by demo-flux, then upscaled to 4096x4096 (lanczos)" in r.json()["info"]

    accepted = gw.post("gemini-3", {"prompt": "a fox", "image_size": "4K", "aspect_ratio": "16:9", "async": True})
    task = gw.poll(accepted.json()["task_address"])
    assert decode_b64(task["result"]["images"][0]).size == (5456, 3072) and "upscaled" in task["result"]["info"]
    assert (gw.engine.requests[-1].width, gw.engine.requests[-1].height) == (688, 384)

    r = gw.post("gemini-3", {"prompt": "a fox", "image_size": "2K"})
    assert "info" not in r.json() and decode_b64(r.json()["images"][0]).size == (2048, 2048)


def test_gemini_4k_within_raised_caps_is_made_by_the_model(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(max_width=4096, max_height=4096, max_output_pixels=4096 * 4096)
    r = gw.post("gemini-3", {"prompt": "a fox", "image_size": "4K"})
    assert "info" not in r.json() and (gw.engine.requests[-1].width, gw.engine.requests[-1].height) == (4096, 4096)
    capped = make_gateway(data_dir=gw.settings.data_dir.parent / "capped", gemini_4k_upscale=False)
    r = capped.post("gemini-3", {"prompt": "a fox", "image_size": "4K"})
    assert "info" not in r.json() and decode_b64(r.json()["images"][0]).size == (2048, 2048)  # the old cap


@pytest.mark.parametrize(
    "ratio, size, expected",
    [
        ("1:1", "1K", (1024, 1024)),
        ("16:9", "1K", (1360, 768)),
        ("21:9", "1K", (1568, 672)),
        ("2:3", "1K", (832, 1248)),
        ("1:1", "2K", (2048, 2048)),
        ("1:1", "4K", (2048, 2048)),
        ("16:9", "4K", (2048, 1152)),
        ("4:5", "2K", (1632, 2048)),
    ],
)
def test_gemini_size_table(ratio: str, size: str, expected: tuple[int, int]) -> None:
    w, h = gemini_size(ratio, size, 16, Settings())
    assert (w, h) == expected
    assert w % 16 == 0 and h % 16 == 0 and w * h <= Settings().max_output_pixels


def test_gemini_pixel_cap() -> None:
    settings = Settings(max_output_pixels=128 * 128)
    for ratio in ("1:1", "16:9", "21:9", "2:3"):
        w, h = gemini_size(ratio, "4K", 16, settings)
        assert w * h <= 128 * 128 and w % 16 == 0 and h % 16 == 0, (ratio, w, h)
        a, b = (int(p) for p in ratio.split(":"))
        assert abs(w / h - a / b) / (a / b) < 0.35


# Async tasks ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", list(GATEWAY_ROUTES))
def test_async_task_returns_the_sync_body(gw: Gateway, route: str) -> None:
    sync = gw.post(route, SMALL[route])
    assert sync.status_code == 200, sync.text
    r = gw.post(route, {**SMALL[route], "async": True})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"task_address", "status", "poll_url"} and len(accepted["task_address"]) >= 24
    assert r.headers["location"] == accepted["poll_url"] == f"http://testserver/v2/tasks/{accepted['task_address']}"
    task = gw.poll(accepted["task_address"])
    assert task["status"] == "completed" and task["progress"] == 1.0 and task["error"] is None
    assert task["route"] == route and task["seeds"]
    result, expected = task["result"], sync.json()
    assert list(result) == list(expected)
    key = next(iter(expected))
    if route in ("flux", "gemini-3"):  # base64
        got, want = [decode_b64(i) for i in result[key]], [decode_b64(i) for i in expected[key]]
    else:  # URLs: new files
        assert not set(result[key]) & set(expected[key])
        got = [Image.open(io.BytesIO(gw.client.get(u).content)) for u in result[key]]
        want = [Image.open(io.BytesIO(gw.client.get(u).content)) for u in expected[key]]
    assert [im.size for im in got] == [im.size for im in want]
    if "seed" in SMALL[route]:  # same seed, same picture
        assert [im.tobytes() for im in got] == [im.tobytes() for im in want]
    assert gw.client.get(accepted["poll_url"]).json()["result"] == result  # stable across reads


def test_sync_body_equals_the_task_result(gw: Gateway) -> None:
    """A synchronous call is recorded too; its task answers with byte-identical images."""
    sync = gw.post("flux", SMALL["flux"]).json()
    (record,) = gw.app.state.jobs.list_jobs()
    task = gw.client.get(f"/v2/tasks/{record.task_address}").json()
    assert task["result"] == sync


def test_running_task_reports_progress_then_cancel(gw: Gateway) -> None:
    gw.engine.block()
    address = gw.post("qwen", {**SMALL["qwen"], "async": True}).json()["task_address"]
    gw.engine.wait_for_running()
    queued = gw.post("qwen", {**SMALL["qwen"], "async": True}).json()["task_address"]
    running = gw.client.get(f"/v2/tasks/{address}").json()
    assert running["status"] == "running" and 0 < running["progress"] < 1 and running["started_at"]
    assert running["result"] is None and running["error"] is None
    assert gw.client.get(f"/v2/tasks/{queued}").json()["status"] == "queued"

    r = gw.client.delete(f"/v2/tasks/{address}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert r.json()["error"] == {"code": "cancelled", "message": "the task was cancelled"}
    r = gw.client.post(f"/v2/tasks/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert gw.client.delete(f"/v2/tasks/{address}").status_code == 200  # idempotent
    cancelled = gw.app.state.jobs.list_jobs(status="cancelled")
    assert len(cancelled) == 2 and all(gw.app.state.jobs.store.files_of(r.id) == [] for r in cancelled)


def test_cancel_finished_or_unknown(gw: Gateway) -> None:
    address = gw.post("qwen", {**SMALL["qwen"], "async": True}).json()["task_address"]
    gw.poll(address)
    r = gw.client.delete(f"/v2/tasks/{address}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_finished"
    r = gw.client.post("/v2/tasks/no-such-task/cancel")
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"


def test_failed_task_has_a_clear_error(gw: Gateway) -> None:
    from pipelines.errors import GenerationFailed

    gw.engine.fail_with = GenerationFailed("out of GPU memory for this request: try a smaller size or batch")
    address = gw.post("flux", {**SMALL["flux"], "async": True}).json()["task_address"]
    task = gw.poll(address)
    assert task["status"] == "failed" and task["result"] is None
    assert task["error"] == {
        "code": "generation_failed",
        "message": "out of GPU memory for this request: try a smaller size or batch",
    }
    r = gw.post("flux", SMALL["flux"])
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"


def test_sync_timeout_answers_with_the_task_address(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(sync_timeout_s=0.2)
    gw.engine.block()
    started = time.monotonic()
    r = gw.post("qwen", SMALL["qwen"])
    assert 0.2 <= time.monotonic() - started < 15  # generous: a loaded CI machine runs late; no timeout would hang
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "timeout" and '"async": true' in error["message"]
    assert error["poll_url"] == f"http://testserver/v2/tasks/{error['task_address']}" == r.headers["location"]
    assert error["task_address"] in error["message"]
    assert gw.client.get(error["poll_url"]).json()["status"] == "running"  # the job keeps going
    gw.engine.release()
    task = gw.poll(error["task_address"])
    assert task["status"] == "completed" and len(task["result"]["urls"]) == 1


# Results: URLs, expiry, restart ---------------------------------------------------------------------------------------


def test_result_urls_404_when_unknown_or_wrong_extension(gw: Gateway) -> None:
    url = gw.post("qwen", SMALL["qwen"]).json()["urls"][0]
    assert gw.client.get(url.replace(".png", ".jpg")).status_code == 404
    r = gw.client.get("/v2/results/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png")
    assert r.status_code == 404 and r.json()["error"]["code"] == "result_not_found"
    assert gw.client.get("/v2/results/..%2F..%2Feasel.db").status_code == 404
    assert gw.client.get("/v2/tasks/unknown").status_code == 404


def test_result_urls_expire_and_the_sweep_deletes_them(make_gateway: Callable[..., Gateway]) -> None:
    ttl = 3.0  # long enough that a loaded CI machine still serves the URL before it expires
    gw = make_gateway(result_ttl_s_by_route={"qwen": ttl})
    posted = time.monotonic()
    url = gw.post("qwen", SMALL["qwen"]).json()["urls"][0]
    assert gw.client.get(url).status_code == 200
    keep = gw.post("flux", SMALL["flux"])  # other routes keep the 7-day default
    assert keep.status_code == 200
    (record,) = gw.app.state.jobs.list_jobs(status="completed", limit=1, offset=1)
    assert record.route == "qwen"
    # Expired: gone at once, before the sweep runs (TTL counted from when the job finished).
    deadline = posted + ttl + 10
    while gw.client.get(url).status_code == 200:
        assert time.monotonic() < deadline, "the URL never expired"
        time.sleep(0.1)
    assert gw.client.get(url).status_code == 404
    assert gw.app.state.jobs.sweep() == 1
    assert gw.client.get(f"/v2/tasks/{record.task_address}").status_code == 404
    files = [p for p in (gw.settings.data_dir / "results").rglob("*") if p.is_file()]
    assert len(files) == 1  # the flux result only


def test_public_base_url_setting(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(public_base_url="https://images.example.com/easel/")
    url = gw.post("qwen", SMALL["qwen"]).json()["urls"][0]
    assert url.startswith("https://images.example.com/easel/v2/results/")
    accepted = gw.post("qwen", {**SMALL["qwen"], "async": True}).json()
    assert accepted["poll_url"].startswith("https://images.example.com/easel/v2/tasks/")


def test_restart_keeps_finished_jobs_and_fails_unfinished_ones(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    data = tmp_path / "shared"
    first = make_gateway(data_dir=data)
    url = first.post("qwen", SMALL["qwen"]).json()["urls"][0]
    address = first.app.state.jobs.list_jobs()[0].task_address
    # A job a killed process left behind, as it stood in the database.
    store = JobStore(first.settings.resolved_database_url)
    store.add(NewJob("ghost", "ghost-address", "gateway", "flux", "demo-flux", {"prompt": "p"}, 60.0), utcnow())
    store.mark_running("ghost", utcnow(), 0.5)
    store.close()

    second = make_gateway(data_dir=data)  # a new app on the same data directory: start-up recovery
    task = second.client.get(f"/v2/tasks/{address}").json()
    assert task["status"] == "completed" and task["result"]["urls"] == [url]
    assert second.client.get(url).status_code == 200
    ghost = second.client.get("/v2/tasks/ghost-address").json()
    assert ghost["status"] == "failed" and ghost["error"] == {"code": "interrupted", "message": RESTART_ERROR}


# Routing and engine errors --------------------------------------------------------------------------------------------


def registry_with_routes(tmp_path: Path, routes: dict[str, str]) -> Registry:
    lines = [
        "models:",
        "  demo-flux: {family: flux, source: 'demo:flux', defaults: {steps: 4}}",
        "  demo-qwen-image-edit: {family: qwen-image-edit, source: 'demo:qwen-image-edit'}",
        "routes:" if routes else "routes: {}",
        *(f"  {route}: {model}" for route, model in routes.items()),
    ]
    path = tmp_path / f"models-{len(list(tmp_path.glob('models-*')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_registry(path)


def test_unmapped_route_is_a_404_naming_the_route(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    gw = make_gateway(registry_with_routes(tmp_path, {"flux": "demo-flux"}))
    assert gw.post("flux", SMALL["flux"]).status_code == 200
    for route in ("qwen", "qwen-edit", "gpt-image", "gpt-image-edit", "gemini-3"):
        r = gw.post(route, SMALL[route])
        assert r.status_code == 404, (route, r.text)
        error = r.json()["error"]
        assert error["code"] == "route_not_mapped"
        assert f"route '{route}'" in error["message"] and f"`{route}: <model id>`" in error["message"]
        assert "routes:" in error["message"] and "models.yaml" in error["message"]


def test_route_mapped_to_a_model_that_cannot_do_it(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    gw = make_gateway(registry_with_routes(tmp_path, {"qwen": "demo-qwen-image-edit"}))
    r = gw.post("qwen", SMALL["qwen"])
    assert r.status_code == 500 and r.json()["error"]["code"] == "route_misconfigured"
    assert "demo-qwen-image-edit" in r.json()["error"]["message"]


def test_engine_refusals_name_the_wire_field(gw: Gateway) -> None:
    gw.engine.submit_error = InvalidRequest("width", "must be a multiple of 64 for this model")
    assert_field_error(gw.post("qwen", SMALL["qwen"]), "size")
    assert_field_error(gw.post("flux", SMALL["flux"]), "width")
    assert_field_error(gw.post("gemini-3", SMALL["gemini-3"]), "image_size")
    gw.engine.submit_error = InvalidRequest("model", "model 'demo-flux': a FLUX.1 Fill checkpoint only inpaints")
    r = gw.post("flux", SMALL["flux"])
    assert r.status_code == 500 and r.json()["error"]["code"] == "route_misconfigured"
    assert "route 'flux'" in r.json()["error"]["message"] and "only inpaints" in r.json()["error"]["message"]
    gw.engine.submit_error = QueueFull(retry_after_s=7)
    r = gw.post("flux", SMALL["flux"])
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["code"] == "queue_full"
    assert gw.app.state.jobs.list_jobs() == []  # refused submissions leave no record


def test_engine_not_ready_is_a_503(gw: Gateway) -> None:
    gw.app.state.engine = None
    r = gw.post("flux", SMALL["flux"])
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"


def test_request_record_holds_no_image_bytes(gw: Gateway) -> None:
    image = png_b64(64, 64)
    gw.post("flux", {**SMALL["flux"], "input_image": image, "safety_tolerance": 5})
    record = gw.app.state.jobs.list_jobs()[0]
    assert record.request_json["input_image"] == f"<base64 image, {len(image)} characters>"
    assert record.request_json["safety_tolerance"] == 5 and record.request_json["async"] is False
    assert record.dialect == "gateway" and record.route == "flux" and record.model == "demo-flux"


def test_openapi_lists_the_gateway(gw: Gateway) -> None:
    paths = gw.client.get("/openapi.json").json()["paths"]
    assert set(GATEWAY_ROUTES.values()) | {"/v2/tasks/{task_address}", "/v2/results/{filename}"} <= set(paths)
    assert "async" in str(paths["/v2/image/flux/generate"])


# The A1111 gateway copy: "async": true --------------------------------------------------------------------------------


def test_a1111_txt2img_async(gw: Gateway) -> None:
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5}
    sync = gw.client.post("/v2/automatic1111/sdapi/v1/txt2img", json=body)
    assert sync.status_code == 200 and "async" not in sync.json()["parameters"]
    r = gw.client.post("/v2/automatic1111/sdapi/v1/txt2img", json={**body, "async": True})
    assert r.status_code == 202, r.text
    task = gw.poll(r.json()["task_address"])
    assert task["status"] == "completed" and task["route"] == "txt2img"
    result = task["result"]
    assert set(result) == {"images", "parameters", "info"}
    assert decode_b64(result["images"][0]).getpixel((0, 0)) == seed_color(5)
    assert result["images"] == sync.json()["images"] and result["parameters"] == sync.json()["parameters"]
    record = gw.app.state.jobs.list_jobs()[0]
    assert record.dialect == "a1111" and record.request_json["prompt"] == "a fox"


def test_a1111_async_refusals_are_a1111_errors(gw: Gateway) -> None:
    r = gw.client.post("/v2/automatic1111/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0, "async": True})
    assert r.status_code == 422 and set(r.json()) == {"error", "detail", "body", "errors"}
    assert gw.app.state.jobs.list_jobs() == []
