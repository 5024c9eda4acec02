"""IndoxHub-style POST /api/v1/images/generations over HTTP (ASGI test client) with the fake engine: no torch.

The real pipelines run in tests/e2e/test_indoxhub_genrex_e2e.py; here every field, limit and error shape is checked.
"""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
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
from pipelines.registry import Registry
from server.api.indoxhub.adapter import aspect_size
from server.settings import Settings
from tests.api.conftest import OpenApp
from tests.api.fake_engine import FakeEngine, seed_color, with_background_removal
from tests.image_helpers import decode_b64

PATH = "/api/v1/images/generations"
SMALL = {"prompt": "a fox in the snow", "size": "64x64"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@dataclass
class Hub:
    client: TestClient
    engine: FakeEngine
    app: FastAPI

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(PATH, json=body)

    def ok(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.post(body)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def make_hub(open_app: Callable[..., OpenApp]) -> Callable[..., Hub]:
    def make(reg: Registry | None = None, **overrides: Any) -> Hub:
        opened = open_app(reg, **overrides)
        return Hub(opened.client, opened.engine, opened.app)

    return make


@pytest.fixture
def hub(make_hub: Callable[..., Hub]) -> Hub:
    return make_hub()


def assert_error(r: httpx.Response, field: str | None, status: int = 422) -> dict[str, Any]:
    """IndoxHub's envelope (`success`, `message`), FastAPI's `detail`, and the OpenAI-style `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["message"], body
    assert body["error"]["field"] == field and body["error"]["param"] == field, body
    assert body["error"]["message"] == body["message"]
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if status == 422:
        assert ".".join(str(p) for p in body["detail"][0]["loc"][1:]) == field
    else:
        assert body["detail"] == body["message"]
    return body


# Validation: each field is a 4xx naming it ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"size": "big"}, "size"),
        ({"size": "65x64"}, "size"),  # not a multiple of 8 (SDXL)
        ({"size": "32x64"}, "size"),  # below 64
        ({"size": "4096x1024"}, "size"),  # above max_width
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "two"}, "n"),
        ({"quality": "ultra"}, "quality"),
        ({"style": "baroque"}, "style"),
        ({"response_format": "png"}, "response_format"),
        ({"model": "demo-qwen-image-edit"}, "model"),  # edits images; cannot make one from text
        ({"provider": "x" * 101}, "provider"),
        ({"additional_params": "seed=1"}, "additional_params"),
        ({"additional_params": {"aspect_ratio": "wide"}}, "additional_params.aspect_ratio"),
        ({"additional_params": {"aspect_ratio": "1:9"}}, "additional_params.aspect_ratio"),
        ({"additional_params": {"aspect_ratio": "0:1"}}, "additional_params.aspect_ratio"),
        ({"additional_params": {"guidance_scale": -1}}, "additional_params.guidance_scale"),
        ({"additional_params": {"guidance_scale": "strong"}}, "additional_params.guidance_scale"),
        ({"additional_params": {"seed": -2}}, "additional_params.seed"),
        ({"additional_params": {"seed": 2**64}}, "additional_params.seed"),
        ({"additional_params": {"negative_prompt": ["blur"]}}, "additional_params.negative_prompt"),
        ({"additional_params": {"output_format": "gif"}}, "additional_params.output_format"),
        ({"additional_params": {"output_compression": 101}}, "additional_params.output_compression"),
        ({"additional_params": {"background": "purple"}}, "additional_params.background"),
        ({"additional_params": {"background": "transparent"}}, "additional_params.background"),  # no alpha model
        ({"additional_params": {"enhance_prompt": "very"}}, "additional_params.enhance_prompt"),
    ],
)
def test_each_field_is_a_422_naming_it(hub: Hub, patch: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**SMALL, **patch}.items() if v is not None}
    assert_error(hub.post(body), field)
    assert hub.engine.requests == [] and hub.app.state.jobs.list_jobs() == []  # nothing ran, nothing recorded


def test_byok_api_key_is_ignored_never_stored_or_logged(
    make_hub: Callable[..., Hub], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Seed 002 lists `byok_api_key`: accepted, said to be ignored, and found nowhere afterwards."""
    hub = make_hub()
    secret = "sk-byok-7f3a9c2e-do-not-keep"
    with caplog.at_level(logging.DEBUG):
        out = hub.ok({**SMALL, "byok_api_key": secret, "additional_params": {"seed": 4}})
        hub.ok({**SMALL, "byok_api_key": secret, "user": "u-2"})
        assert_error(hub.post({**SMALL, "byok_api_key": secret, "n": 99}), "n")  # a refused request keeps it neither
    assert "byok_api_key ignored" in out["message"] and "runs its own models" in out["message"]
    assert secret not in caplog.text and secret not in repr(hub.engine.requests)
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("easel.db") for p in stored)
    for path in stored:  # the job DB (and its WAL), result files: none holds the key
        assert secret.encode() not in path.read_bytes(), path
    quiet = hub.ok({**SMALL, "byok_api_key": None})  # null or empty: not given, nothing said
    assert quiet["message"] == "" and hub.ok({**SMALL, "byok_api_key": ""})["message"] == ""


def test_transparent_background_says_why(hub: Hub) -> None:
    body = assert_error(
        hub.post({**SMALL, "additional_params": {"background": "transparent"}}), "additional_params.background"
    )
    assert "alpha" in body["message"] and "demo-sdxl" in body["message"]
    for background in ("auto", "opaque"):
        assert hub.ok({**SMALL, "additional_params": {"background": background}})["success"]


def test_transparent_background_with_a_removal_model(make_hub: Callable[..., Hub], registry: Registry) -> None:
    hub = make_hub(with_background_removal(registry))
    body = {**SMALL, "response_format": "b64_json", "additional_params": {"background": "transparent"}}
    out = hub.ok(body)
    assert hub.engine.requests[-1].transparent_background
    assert decode_b64(out["data"][0]["b64_json"]).mode == "RGBA"
    jpeg = {**SMALL, "additional_params": {"background": "transparent", "output_format": "jpeg"}}
    assert "no alpha channel" in assert_error(hub.post(jpeg), "additional_params.output_format")["message"]


def test_alpha_capable_models_may_use_transparent(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(alpha_model_ids=["demo-sdxl"])
    ok = hub.ok({**SMALL, "additional_params": {"background": "transparent", "output_format": "webp"}})
    assert ok["success"]
    r = hub.post({**SMALL, "additional_params": {"background": "transparent", "output_format": "jpeg"}})
    assert_error(r, "additional_params.output_format")


def test_unknown_model_is_a_404_naming_model(hub: Hub) -> None:
    body = assert_error(hub.post({**SMALL, "model": "openai/gpt-9"}), "model", status=404)
    assert body["error"]["code"] == "model_not_found" and "demo-sdxl" in body["message"]


def test_server_limits(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(max_images_per_request=2, max_prompt_chars=20, max_width=512)
    assert_error(hub.post({**SMALL, "n": 3}), "n")
    assert_error(hub.post({**SMALL, "prompt": "x" * 21}), "prompt")
    assert_error(hub.post({**SMALL, "size": "1024x512"}), "size")
    assert hub.ok({**SMALL, "n": 2})["data"][1]["url"]


def test_nulls_mean_defaults(hub: Hub) -> None:
    body = {**SMALL, "model": None, "n": None, "response_format": None, "quality": None, "additional_params": None}
    out = hub.ok(body)
    assert len(out["data"]) == 1 and out["data"][0]["url"] and out["model"] == "demo-sdxl"


# The response ---------------------------------------------------------------------------------------------------------


def test_response_is_the_documented_envelope(hub: Hub) -> None:
    started = time.monotonic()
    out = hub.ok({"prompt": "a serene mountain landscape", "size": "64x96"})
    elapsed_ms = (time.monotonic() - started) * 1000
    assert list(out) == [
        "request_id",
        "created_at",
        "duration_ms",
        "provider",
        "model",
        "success",
        "message",
        "data",
        "usage",
    ]
    (record,) = hub.app.state.jobs.list_jobs(dialect="indoxhub")
    assert out["request_id"] == str(uuid.UUID(record.id))
    assert ISO_Z.match(out["created_at"])
    assert 0 < out["duration_ms"] <= elapsed_ms + 1
    assert (out["provider"], out["model"], out["success"], out["message"]) == ("easel", "demo-sdxl", True, "")
    assert out["usage"] == {
        "tokens_prompt": 0,
        "tokens_completion": 0,
        "tokens_total": 0,
        "cost": 0.0,
        "latency": out["duration_ms"],
    }
    (item,) = out["data"]
    assert item["b64_json"] is None and item["url"].startswith("http://testserver/v2/results/")
    image = hub.client.get(item["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 96)
    req = hub.engine.requests[0]
    assert (req.model, req.width, req.height, req.steps, req.guidance, req.seed) == ("demo-sdxl", 64, 96, 20, 5.0, -1)
    assert record.route == "indoxhub" and record.request_json["prompt"] == "a serene mountain landscape"


def test_b64_json_and_output_format(hub: Hub) -> None:
    body = {**SMALL, "n": 2, "response_format": "b64_json", "additional_params": {"output_format": "webp", "seed": 5}}
    out = hub.ok(body)
    assert [d["url"] for d in out["data"]] == [None, None]
    images = [decode_b64(d["b64_json"]) for d in out["data"]]
    assert [(im.format, im.size) for im in images] == [("WEBP", (64, 64))] * 2
    assert images[0].convert("RGB").getpixel((0, 0)) == pytest.approx(seed_color(5), abs=3)
    jpeg = hub.ok({**SMALL, "additional_params": {"output_format": "jpg", "output_compression": 30}})
    fetched = hub.client.get(jpeg["data"][0]["url"])
    assert fetched.headers["content-type"] == "image/jpeg"


def test_seed_reproduces_the_image(hub: Hub) -> None:
    body = {**SMALL, "response_format": "b64_json", "additional_params": {"seed": 77}}
    first, second = hub.ok(body), hub.ok(body)
    assert decode_b64(first["data"][0]["b64_json"]).tobytes() == decode_b64(second["data"][0]["b64_json"]).tobytes()
    other = hub.ok({**body, "additional_params": {"seed": 78}})
    assert decode_b64(other["data"][0]["b64_json"]).tobytes() != decode_b64(first["data"][0]["b64_json"]).tobytes()


def test_google_params_reach_the_request(hub: Hub) -> None:
    params = {"negative_prompt": "blurry", "guidance_scale": 9.5, "seed": 123}
    hub.ok({**SMALL, "additional_params": params})
    req = hub.engine.requests[0]
    assert (req.negative_prompt, req.guidance, req.seed) == ("blurry", 9.5, 123)


# Models and providers -------------------------------------------------------------------------------------------------


def test_provider_prefixed_models_and_the_echo(hub: Hub) -> None:
    out = hub.ok({**SMALL, "model": "openai/dall-e-3"})  # the document's example
    assert (out["provider"], out["model"]) == ("openai", "dall-e-3")
    assert hub.engine.requests[-1].model == "demo-sdxl"
    out = hub.ok({**SMALL, "model": "gpt-image-1", "provider": "openai"})
    assert (out["provider"], out["model"]) == ("openai", "gpt-image-1")
    out = hub.ok({**SMALL, "model": "google/demo-flux", "provider": "google"})
    assert (out["provider"], out["model"]) == ("google", "demo-flux") and hub.engine.requests[-1].model == "demo-flux"
    out = hub.ok({**SMALL, "model": "demo-sd15"})
    assert (out["provider"], out["model"]) == ("easel", "demo-sd15")


def test_the_full_model_name_is_tried_first(make_hub: Callable[..., Hub], registry: Registry) -> None:
    sd15 = registry.get("demo-sd15").model_copy(update={"aliases": ["acme/dall-e-3"]})
    reg = Registry([sd15, registry.get("demo-sdxl")], routes={"indoxhub": "demo-sdxl"})
    hub = make_hub(reg)
    out = hub.ok({**SMALL, "model": "acme/dall-e-3"})
    assert (out["provider"], out["model"], hub.engine.requests[-1].model) == ("easel", "acme/dall-e-3", "demo-sd15")
    out = hub.ok({**SMALL, "model": "openai/dall-e-3"})
    assert (out["provider"], out["model"], hub.engine.requests[-1].model) == ("openai", "dall-e-3", "demo-sdxl")


def test_unmapped_route_without_model(make_hub: Callable[..., Hub], registry: Registry) -> None:
    hub = make_hub(Registry([registry.get("demo-sd15")]))
    body = assert_error(hub.post(SMALL), None, status=404)
    assert "indoxhub" in body["message"] and "routes:" in body["message"]
    assert hub.ok({**SMALL, "model": "demo-sd15"})["model"] == "demo-sd15"


# Size, aspect ratio, quality, style -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, ratio, expected",
    [
        ("256x256", "16:9", (344, 192)),
        ("256x256", "9:16", (192, 344)),
        ("256x256", "1:1", (256, 256)),
        ("1024x1024", "16:9", (1368, 768)),
        ("1024x1024", "3:4", (888, 1184)),
        ("2048x2048", "21:9", (2048, 880)),  # capped by max_width, the ratio kept
        ("64x64", "4:1", (128, 64)),  # never below the 64-pixel minimum
    ],
)
def test_aspect_ratio_picks_the_shape_at_the_size_area(
    hub: Hub, size: str, ratio: str, expected: tuple[int, int]
) -> None:
    hub.ok({**SMALL, "size": size, "additional_params": {"aspect_ratio": ratio}})
    req = hub.engine.requests[0]
    assert (req.width, req.height) == expected


def test_aspect_size_respects_the_model_multiple() -> None:
    settings = Settings()
    for ratio in ((16, 9), (9, 16), (4, 3), (21, 9), (1, 4)):
        for multiple in (8, 16):
            w, h = aspect_size(ratio, 1024 * 1024, multiple, settings)
            assert w % multiple == 0 and h % multiple == 0
            assert abs(w * h / (1024 * 1024) - 1) < 0.05 and abs(w / h - ratio[0] / ratio[1]) < 0.05


def test_auto_size_is_the_model_default(hub: Hub) -> None:
    hub.ok({**SMALL, "size": "auto"})
    assert (hub.engine.requests[0].width, hub.engine.requests[0].height) == (512, 512)


def test_quality_scales_the_steps(hub: Hub) -> None:
    steps = {}
    for quality in (None, "auto", "standard", "hd", "low", "medium", "high"):
        hub.ok({**SMALL, "quality": quality})
        steps[quality] = hub.engine.requests[-1].steps
    assert steps == {None: 20, "auto": 20, "standard": 20, "hd": 30, "low": 10, "medium": 20, "high": 30}


def test_style_preset_is_applied_and_recorded(hub: Hub) -> None:
    out = hub.ok({**SMALL, "style": "cinematic", "additional_params": {"negative_prompt": "text"}})
    assert out["message"] == ""
    req = hub.engine.requests[0]
    assert req.prompt.startswith("cinematic film still of a fox in the snow")
    assert req.negative_prompt == "text, cartoon, illustration, drawing, flat lighting, low quality, blurry"
    (record,) = hub.app.state.jobs.list_jobs()
    assert record.request_json["style"] == "cinematic" and record.request_json["final_prompt"] == req.prompt
    assert "byok_api_key" not in record.request_json


def test_ignored_params_are_listed_in_message(hub: Hub) -> None:
    params = {"enhance_prompt": True, "add_watermark": True, "person_generation": "allow_all", "seed": 3}
    out = hub.ok({**SMALL, "style": "vivid", "user": "u-1", "additional_params": params})
    message = out["message"]
    for name in (
        "user",
        "additional_params.enhance_prompt",
        "additional_params.add_watermark",
        "additional_params.person_generation",
        "style=vivid",
    ):
        assert name in message, message
    assert "seed" not in message.replace("additional_params.person_generation", "")
    quiet = hub.ok({**SMALL, "style": "natural", "additional_params": {"enhance_prompt": False}})
    assert quiet["message"] == "accepted but not applied by this server: style=natural"
    assert hub.engine.requests[-1].prompt == SMALL["prompt"]


# Engine errors in IndoxHub's shape ------------------------------------------------------------------------------------


def test_engine_errors_in_the_dialect_shape(hub: Hub) -> None:
    hub.engine.fail_with = GenerationFailed("out of GPU memory: try a smaller size")
    body = assert_error(hub.post(SMALL), None, status=500)
    assert body["error"]["code"] == "generation_failed" and "smaller size" in body["message"]
    hub.engine.fail_with = None

    hub.engine.submit_error = QueueFull(retry_after_s=7)
    r = hub.post(SMALL)
    assert_error(r, None, status=429)
    assert r.headers["retry-after"] == "7" and r.json()["error"]["code"] == "queue_full"

    hub.engine.submit_error = InvalidRequest("width", "too wide for this model")
    assert_error(hub.post(SMALL), "size")
    hub.engine.submit_error = InvalidRequest("guidance", "out of range")
    assert_error(hub.post(SMALL), "additional_params.guidance_scale")


def test_sync_timeout_is_a_504(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(sync_timeout_s=0.2)
    hub.engine.block()
    body = assert_error(hub.post(SMALL), None, status=504)
    assert body["error"]["code"] == "timeout" and "sync_timeout_s" in body["message"]


def test_other_errors_under_api_v1_use_the_shape(hub: Hub) -> None:
    assert_error(hub.client.get(PATH), None, status=405)
    assert_error(hub.client.post("/api/v1/nothing", json={}), None, status=404)
    r = hub.client.post(PATH, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["success"] is False
