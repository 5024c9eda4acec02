"""The OpenAI Images dialect (/v1/images/*, /v1/models) over HTTP with the fake engine: no torch.

Every field's validation (400 in OpenAI's error shape, `param` naming the field), the mapping of the wire fields to
the GenerationRequest the engine gets, the multipart variants of edits, and the official `openai` SDK's own requests
(through an ASGI transport). The real pipelines run in tests/e2e/test_openai_sdk.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import GenerationFailed, InvalidRequest, QueueFull
from pipelines.registry import Registry, load_registry
from pipelines.request import GenerationRequest, Task
from server.api.openai_images.adapter import image_tokens
from server.settings import Settings
from tests.api.conftest import OpenApp
from tests.api.fake_engine import FakeEngine, seed_color, with_background_removal

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


@dataclass
class Api:
    client: TestClient
    engine: FakeEngine
    settings: Settings

    def generate(self, **body: Any) -> httpx.Response:
        return self.client.post(GENERATIONS, json={"prompt": "a fox", "size": "64x64", **body})

    def edit(self, files: list[tuple[str, Any]], **fields: Any) -> httpx.Response:
        data = {"prompt": "add a hat", **{k: str(v) for k, v in fields.items()}}
        return self.client.post(EDITS, data=data, files=files)

    @property
    def last(self) -> GenerationRequest:
        return self.engine.requests[-1]


@pytest.fixture
def make_api(open_app: Callable[..., OpenApp]) -> Callable[..., Api]:
    def make(reg: Registry | None = None, **overrides: Any) -> Api:
        opened = open_app(reg, **overrides)
        return Api(opened.client, opened.engine, opened.settings)

    return make


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def png(width: int = 64, height: int = 64, color: Any = (10, 200, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def half_transparent_mask(width: int = 64, height: int = 64) -> bytes:
    """Left half fully transparent (edit), right half opaque (keep): OpenAI's mask convention."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def decode(data: str | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    image.load()
    return image


def assert_openai_error(r: httpx.Response, param: str | None, status: int = 400, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 429 else error["type"])
    if code is not None:
        assert error["code"] == code, error
    return error


# Generations: mapping -------------------------------------------------------------------------------------------------


def test_generate_b64_json_by_default_with_openai_response_fields(api: Api) -> None:
    r = api.generate(seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    assert body["background"] == "opaque" and body["output_format"] == "png" and body["quality"] == "medium"
    assert body["size"] == "64x64"
    (item,) = body["data"]
    assert set(item) == {"b64_json"}  # no url, no revised_prompt
    image = decode(item["b64_json"])
    assert image.format == "PNG" and image.size == (64, 64)
    assert image.getpixel((3, 3)) == seed_color(5)
    usage = body["usage"]
    assert usage["input_tokens_details"]["text_tokens"] == 2  # "a fox": 5 characters, about 4 per token
    assert usage["input_tokens_details"]["image_tokens"] == 0
    assert usage["output_tokens"] == 85 + 170  # one 512-px tile
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # no model: models.yaml `routes: openai` (demo-sdxl), its default steps and cfg
    req = api.last
    assert (req.model, req.task, req.width, req.height) == ("demo-sdxl", Task.TXT2IMG, 64, 64)
    assert (req.steps, req.guidance, req.seed, req.batch_size) == (20, 5.0, 5, 1)


def test_fields_map_to_the_generation_request(api: Api) -> None:
    r = api.generate(
        model="demo-sd15",
        size="96x64",
        n=3,
        seed=42,
        negative_prompt="blurry",
        steps=7,
        guidance_scale=3.5,
        user="alice",
        style="vivid",
        moderation="low",
    )
    assert r.status_code == 200, r.text
    req = api.last
    assert (req.model, req.width, req.height, req.batch_size) == ("demo-sd15", 96, 64, 3)
    assert (req.seed, req.negative_prompt, req.steps, req.guidance) == (42, "blurry", 7, 3.5)
    images = [decode(item["b64_json"]) for item in r.json()["data"]]
    assert [im.size for im in images] == [(96, 64)] * 3
    assert [im.getpixel((0, 0)) for im in images] == [seed_color(42 + i) for i in range(3)]  # seed, seed+1, ...
    assert r.json()["size"] == "96x64"


@pytest.mark.parametrize(
    "quality, steps, label",
    [("low", 10, "low"), ("medium", 20, "medium"), ("high", 30, "high"), ("auto", 20, "medium")]
    + [("standard", 20, "medium"), ("hd", 30, "high")],
)
def test_quality_scales_the_model_steps(api: Api, quality: str, steps: int, label: str) -> None:
    r = api.generate(quality=quality)
    assert r.status_code == 200, r.text
    assert api.last.steps == steps  # demo-sdxl: 20 steps x gpt_image_quality_steps
    assert r.json()["quality"] == label


def test_steps_extension_overrides_quality(api: Api) -> None:
    assert api.generate(quality="high", steps=2).status_code == 200
    assert api.last.steps == 2


def test_size_auto_or_absent_is_the_model_default(api: Api) -> None:
    r = api.client.post(GENERATIONS, json={"prompt": "a fox", "model": "demo-flux", "n": None, "size": None})
    assert r.status_code == 200, r.text
    assert (api.last.width, api.last.height) == (512, 512)
    assert api.client.post(GENERATIONS, json={"prompt": "a fox", "size": "auto"}).json()["size"] == "512x512"


@pytest.mark.parametrize("name", ["gpt-image-1", "gpt-image-1.5", "GPT-IMAGE-1-MINI", "demo-sdxl"])
def test_gpt_image_and_local_names_default_to_b64_json(api: Api, name: str) -> None:
    r = api.generate(model=name)
    assert r.status_code == 200, r.text
    assert "b64_json" in r.json()["data"][0] and api.last.model == "demo-sdxl"


@pytest.mark.parametrize("name", ["dall-e-3", "dall-e-2"])
def test_dall_e_names_default_to_urls_served_by_this_server(api: Api, name: str) -> None:
    r = api.generate(model=name, seed=3)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert set(item) == {"url"} and "/v2/results/" in item["url"]
    fetched = api.client.get(item["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert decode(fetched.content).getpixel((0, 0)) == seed_color(3)


@pytest.mark.parametrize(
    "fmt, pil_format, content_type", [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")]
)
def test_output_format_and_url(api: Api, fmt: str, pil_format: str, content_type: str) -> None:
    r = api.generate(output_format=fmt, response_format="url")
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == fmt
    fetched = api.client.get(r.json()["data"][0]["url"])
    assert fetched.headers["content-type"] == content_type
    assert decode(fetched.content).format == pil_format


def test_output_compression_is_the_jpeg_quality(api: Api) -> None:
    def max_quantizer(**fields: Any) -> int:
        r = api.generate(output_format="jpeg", **fields)
        assert r.status_code == 200, r.text
        tables = decode(r.json()["data"][0]["b64_json"]).quantization
        return max(max(table) for table in tables.values())

    assert max_quantizer() == 1  # default 100, as OpenAI's
    assert max_quantizer(output_compression=100) == 1
    assert max_quantizer(output_compression=10) > 50


def test_opaque_and_auto_backgrounds_are_fine(api: Api) -> None:
    for background in ("opaque", "auto"):
        assert api.generate(background=background).json()["background"] == "opaque"


def test_transparent_background_without_a_removal_model_says_how(api: Api) -> None:
    error = assert_openai_error(api.generate(background="transparent"), "background", code="invalid_value")
    assert "background_removal" in error["message"] and "models.yaml" in error["message"]


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_transparent_background_asks_the_engine_for_alpha(
    make_api: Callable[..., Api], registry: Registry, fmt: str
) -> None:
    api = make_api(with_background_removal(registry))
    r = api.generate(background="transparent", output_format=fmt, size="96x64")
    assert r.status_code == 200, r.text
    assert r.json()["background"] == "transparent" and api.last.transparent_background
    image = decode(r.json()["data"][0]["b64_json"])
    assert image.format == fmt.upper() and image.mode == "RGBA" and image.size == (96, 64)
    assert image.getpixel((0, 0))[3] == 0 and image.getpixel((95, 0))[3] == 255
    r = api.edit([("image", ("in.png", png(), "image/png"))], background="transparent")
    assert r.status_code == 200 and r.json()["background"] == "transparent" and api.last.transparent_background
    assert api.generate(background="auto").json()["background"] == "opaque" and not api.last.transparent_background
    error = assert_openai_error(api.generate(background="transparent", output_format="jpeg"), "output_format")
    assert "jpeg has no alpha" in error["message"]


def test_jobs_are_recorded_with_the_wire_request_but_no_image_bytes(api: Api) -> None:
    assert api.generate(user="alice", seed=1).status_code == 200
    image = png()
    assert api.edit([("image", ("in.png", image, "image/png"))]).status_code == 200
    jobs = api.client.app.state.jobs  # type: ignore[attr-defined]
    records = {record.route: record for record in jobs.list_jobs(dialect="openai")}
    assert records["openai"].request_json["user"] == "alice"
    assert records["openai-edit"].request_json["image"] == [f"<image, {len(image)} bytes>"]


# Generations: validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, param, code",
    [
        ({"prompt": None}, "prompt", None),
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"n": 11}, "n", "invalid_value"),
        ({"n": "many"}, "n", "invalid_value"),
        ({"size": "big"}, "size", "invalid_value"),
        ({"size": "65x64"}, "size", "invalid_value"),
        ({"size": "32x32"}, "size", "invalid_value"),
        ({"size": "4096x1024"}, "size", "invalid_value"),
        ({"size": 1024}, "size", "invalid_value"),
        ({"quality": "ultra"}, "quality", "invalid_value"),
        ({"response_format": "png"}, "response_format", "invalid_value"),
        ({"output_format": "gif"}, "output_format", "invalid_value"),
        ({"output_compression": 101}, "output_compression", "invalid_value"),
        ({"output_compression": -1}, "output_compression", "invalid_value"),
        ({"background": "transparent"}, "background", "invalid_value"),
        ({"background": "purple"}, "background", "invalid_value"),
        ({"stream": "sometimes"}, "stream", "invalid_value"),
        ({"partial_images": 4}, "partial_images", "invalid_value"),
        ({"moderation": "none"}, "moderation", "invalid_value"),
        ({"style": "cartoon"}, "style", "invalid_value"),
        ({"seed": -2}, "seed", "invalid_value"),
        ({"seed": 2**64}, "seed", "invalid_value"),
        ({"steps": 0}, "steps", "invalid_value"),
        ({"steps": 151}, "steps", "invalid_value"),  # above max_steps
        ({"guidance_scale": -1}, "guidance_scale", "invalid_value"),
        ({"negative": "blurry"}, "negative", "unknown_parameter"),  # a misspelt extension is not silently ignored
        ({"model": "demo-qwen-image-edit"}, "model", "invalid_value"),  # edits only
    ],
)
def test_invalid_fields_are_400_naming_the_param(api: Api, patch: dict[str, Any], param: str, code: str | None) -> None:
    body = {"prompt": "a fox", "size": "64x64", **patch}
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_openai_error(api.client.post(GENERATIONS, json=body), param, code=code)
    assert param in error["message"]
    assert not api.engine.requests  # refused before it reached the engine


def test_missing_prompt_says_so(api: Api) -> None:
    error = assert_openai_error(api.client.post(GENERATIONS, json={}), "prompt", code="missing_required_parameter")
    assert error["message"] == "Missing required parameter: 'prompt'."


def test_unknown_parameter_message(api: Api) -> None:
    error = assert_openai_error(api.generate(negative="x"), "negative", code="unknown_parameter")
    assert error["message"] == "Unknown parameter: 'negative'."


def test_server_limits_name_their_field(make_api: Callable[..., Api]) -> None:
    api = make_api(max_images_per_request=2, max_prompt_chars=10, max_width=128)
    assert "max_images_per_request=2" in assert_openai_error(api.generate(n=3), "n")["message"]
    assert "max_prompt_chars=10" in assert_openai_error(api.generate(prompt="x" * 11), "prompt")["message"]
    assert_openai_error(api.generate(negative_prompt="x" * 11), "negative_prompt")
    assert "max_width=128" in assert_openai_error(api.generate(size="136x64"), "size")["message"]
    assert api.generate(n=2, prompt="x" * 10, size="128x64").status_code == 200


def test_unknown_model_is_404_model_not_found(api: Api) -> None:
    error = assert_openai_error(api.generate(model="dall-e-9"), "model", status=404, code="model_not_found")
    assert "dall-e-9" in error["message"]


@pytest.mark.parametrize(
    "name, model_id, fmt",
    [("openai/dall-e-3", "demo-sdxl", "url"), ("openai/gpt-image-1", "demo-sdxl", "b64_json")]
    + [("google/demo-flux", "demo-flux", "b64_json"), ("OpenAI/DALL-E-2", "demo-sdxl", "url")],
)
def test_provider_prefixed_model_names_resolve(api: Api, name: str, model_id: str, fmt: str) -> None:
    """IndoxHub's `provider/name` form (seed 002's OpenAI SDK example) on /v1: the name after the slash runs."""
    r = api.generate(model=name)
    assert r.status_code == 200, r.text
    assert api.last.model == model_id and set(r.json()["data"][0]) == {fmt}
    assert api.client.get(f"/v1/models/{name}").json()["root"] == model_id
    r = api.edit([("image", ("in.png", png(), "image/png"))], model=name if model_id != "demo-flux" else "demo-sd15")
    assert r.status_code == 200, r.text
    assert_openai_error(api.generate(model="openai/dall-e-9"), "model", status=404, code="model_not_found")


def test_invalid_json_is_400_without_param(api: Api) -> None:
    r = api.client.post(GENERATIONS, content=b"{not json", headers={"Content-Type": "application/json"})
    assert_openai_error(r, None)


def test_queue_full_is_429_with_retry_after(api: Api) -> None:
    api.engine.submit_error = QueueFull(retry_after_s=7)
    r = api.generate()
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"


def test_engine_errors_name_the_wire_field(api: Api) -> None:
    api.engine.submit_error = InvalidRequest("width", "must be a multiple of 64")
    assert_openai_error(api.generate(), "size")
    api.engine.submit_error = InvalidRequest("model", "model 'x' cannot make images from text")
    assert_openai_error(api.generate(), "model")


def test_generation_failure_is_a_server_error(api: Api) -> None:
    api.engine.fail_with = GenerationFailed("out of GPU memory for this request")
    r = api.generate()
    assert r.status_code == 500, r.text
    assert r.json()["error"] == {
        "message": "out of GPU memory for this request",
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    api.engine.fail_with = RuntimeError("/secret/path exploded")
    r = api.generate()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "/secret/path" not in r.text  # no internals


def test_timeout_is_504_naming_the_task(make_api: Callable[..., Api]) -> None:
    api = make_api(sync_timeout_s=0.2)
    api.engine.block()
    r = api.generate()
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout" and "/v2/tasks/" in r.json()["error"]["message"]
    api.engine.release()
    assert r.headers["Location"].startswith("http://testserver/v2/tasks/")


def test_unknown_routes_and_methods_answer_in_openai_shape(api: Api) -> None:
    assert_openai_error(api.client.post("/v1/images/nope"), None, status=404)
    r = api.client.get(GENERATIONS)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# Models ---------------------------------------------------------------------------------------------------------------


def test_models_list_has_ids_and_openai_aliases(api: Api) -> None:
    body = api.client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    for card in cards.values():
        assert card["object"] == "model" and card["owned_by"] == "easel" and isinstance(card["created"], int)
    assert {"demo-sd15", "demo-sdxl", "demo-flux", "demo-qwen-image", "demo-qwen-image-edit"} <= set(cards)
    for alias in ("gpt-image-1", "gpt-image-1.5", "dall-e-3", "dall-e-2"):
        assert cards[alias]["root"] == "demo-sdxl"
    assert not any(name.endswith(".safetensors") for name in cards)  # A1111 file-name aliases are not model names


def test_model_by_id(api: Api) -> None:
    assert api.client.get("/v1/models/dall-e-3").json()["root"] == "demo-sdxl"
    assert api.client.get("/v1/models/demo-flux").json()["id"] == "demo-flux"
    error = assert_openai_error(api.client.get("/v1/models/nope"), "model", status=404, code="model_not_found")
    assert "nope" in error["message"]


# Edits ----------------------------------------------------------------------------------------------------------------


def test_edit_one_image_runs_img2img_at_its_size(api: Api) -> None:
    r = api.edit([("image", ("in.png", png(80, 64), "image/png"))], seed=4, steps=3)
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (80, 64)
    req = api.last
    assert (req.model, req.task, req.width, req.height) == ("demo-sdxl", Task.IMG2IMG, 80, 64)  # routes openai-edit
    assert (req.seed, req.steps, req.strength) == (4, 3, 0.75)
    assert req.init_images[0].getpixel((0, 0)) == (10, 200, 30)
    assert r.json()["usage"]["input_tokens_details"]["image_tokens"] == 85 + 170


def test_edit_size_auto_rounds_down_to_the_model_multiple(api: Api) -> None:
    assert api.edit([("image", ("in.png", png(70, 67), "image/png"))]).status_code == 200
    assert (api.last.width, api.last.height) == (64, 64)
    r = api.edit([("image", ("in.png", png(70, 67), "image/png"))], size="128x96", n=2)
    assert r.status_code == 200 and r.json()["size"] == "128x96"
    assert (api.last.width, api.last.height, api.last.batch_size) == (128, 96, 2)


@pytest.mark.parametrize("field", ["image", "image[]"])
def test_edit_several_images_as_repeated_parts(api: Api, field: str) -> None:
    """`image` repeated (curl -F) and `image[]` (the official SDK): an img2img model uses the first."""
    files = [(field, ("a.png", png(64, 64, (255, 0, 0)), "image/png")), (field, ("b.png", png(), "image/png"))]
    assert api.edit(files).status_code == 200
    assert api.last.task == Task.IMG2IMG and len(api.last.init_images) == 1
    assert api.last.init_images[0].getpixel((0, 0)) == (255, 0, 0)


def test_edit_model_stitches_several_images_as_one_reference(api: Api) -> None:
    files = [("image[]", ("a.png", png(64, 64, (255, 0, 0)), "image/png"))]
    files.append(("image[]", ("b.png", png(32, 32, (0, 0, 255)), "image/png")))
    r = api.edit(files, model="demo-qwen-image-edit", size="64x64")
    assert r.status_code == 200, r.text
    req = api.last
    assert req.task == Task.EDIT and req.model == "demo-qwen-image-edit"
    (reference,) = req.init_images
    assert reference.size == (128, 64)  # side by side at the first image's height
    assert reference.getpixel((10, 10)) == (255, 0, 0) and reference.getpixel((100, 10)) == (0, 0, 255)


def test_default_edit_model_comes_from_routes_openai_edit(tmp_path: Path, make_api: Callable[..., Api]) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  demo-sdxl: {family: sdxl, source: 'demo:sdxl'}\n"
        "  demo-qwen-image-edit: {family: qwen-image-edit, source: 'demo:qwen-image-edit'}\n"
        "routes: {openai: demo-sdxl, openai-edit: demo-qwen-image-edit}\n"
    )
    api = make_api(load_registry(models))
    assert api.edit([("image", ("in.png", png(), "image/png"))]).status_code == 200
    assert (api.last.model, api.last.task) == ("demo-qwen-image-edit", Task.EDIT)
    assert api.generate().status_code == 200
    assert api.last.model == "demo-sdxl"


def test_without_routes_the_default_model_serves(tmp_path: Path, make_api: Callable[..., Api]) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("default_model: demo-sd15\nmodels:\n  demo-sd15: {family: sd15, source: 'demo:sd15'}\n")
    api = make_api(load_registry(models))
    assert api.generate().status_code == 200 and api.last.model == "demo-sd15"
    assert api.edit([("image", ("in.png", png(), "image/png"))]).status_code == 200
    assert api.last.model == "demo-sd15"


def test_mask_convention_is_inverted_for_the_engine(api: Api) -> None:
    """OpenAI: transparent (alpha 0) = edit. Engine: white = repaint."""
    files = [("image", ("in.png", png(), "image/png")), ("mask", ("mask.png", half_transparent_mask(), "image/png"))]
    r = api.edit(files, n=2)
    assert r.status_code == 200, r.text
    req = api.last
    assert req.task == Task.INPAINT and req.batch_size == 2
    assert req.mask is not None and req.mask.size == (64, 64)
    assert req.mask.getpixel((5, 30)) == 255 and req.mask.getpixel((60, 30)) == 0
    assert req.inpaint.composite_original and req.strength == 1.0


def test_mask_applies_to_the_first_of_several_images(api: Api) -> None:
    files = [("image[]", ("a.png", png(64, 64, (255, 0, 0)), "image/png"))]
    files += [
        ("image[]", ("b.png", png(96, 96), "image/png")),
        ("mask", ("m.png", half_transparent_mask(), "image/png")),
    ]
    assert api.edit(files).status_code == 200
    assert api.last.task == Task.INPAINT and api.last.init_images[0].getpixel((0, 0)) == (255, 0, 0)


def test_edit_fields_are_validated_like_generations(api: Api) -> None:
    image = [("image", ("in.png", png(), "image/png"))]
    assert_openai_error(api.edit(image, n="many"), "n")
    assert_openai_error(api.edit(image, n=11), "n")
    assert_openai_error(api.edit(image, size="65x64"), "size")
    assert_openai_error(api.edit(image, background="transparent"), "background")
    assert_openai_error(api.edit(image, stream="sometimes"), "stream")
    assert_openai_error(api.edit(image, input_fidelity="max"), "input_fidelity")
    assert_openai_error(api.edit(image, negative="x"), "negative", code="unknown_parameter")
    assert_openai_error(api.edit(image, model="nope"), "model", status=404, code="model_not_found")
    r = api.client.post(EDITS, data={}, files=image)
    assert_openai_error(r, "prompt", code="missing_required_parameter")
    assert not api.engine.requests


@pytest.mark.parametrize(
    "files, param",
    [
        ([], "image"),
        ([("image", ("in.txt", b"not an image", "text/plain"))], "image"),
        ([("image", ("in.png", png(), "image/png")), ("mask", ("m.png", png(mode="RGB"), "image/png"))], "mask"),
        (
            [("image", ("in.png", png(), "image/png")), ("mask", ("m.png", half_transparent_mask(32, 64), "i/png"))],
            "mask",
        ),
        (
            [("image", ("in.png", png(), "image/png"))]
            + [("mask", ("m.png", half_transparent_mask(), "image/png"))] * 2,
            "mask",
        ),
        ([("image[]", ("in.png", png(), "image/png"))] * 17, "image"),
        ([("image", ("in.png", png(), "image/png")), ("prompt2", ("p.txt", b"x", "text/plain"))], "prompt2"),
    ],
)
def test_bad_edit_uploads_name_the_field(api: Api, files: list, param: str) -> None:
    data = {"prompt": "add a hat"}
    r = api.client.post(EDITS, data=data, files=files) if files else api.client.post(EDITS, data=data)
    assert_openai_error(r, param)


def test_edit_mask_without_alpha_explains_the_convention(api: Api) -> None:
    files = [("image", ("in.png", png(), "image/png")), ("mask", ("m.png", png(mode="L", color=255), "image/png"))]
    assert "transparent" in assert_openai_error(api.edit(files), "mask")["message"]


def test_edit_as_json_is_refused_naming_image(api: Api) -> None:
    r = api.client.post(EDITS, json={"prompt": "x", "image": "abc"})
    assert "multipart/form-data" in assert_openai_error(r, "image")["message"]


def test_edit_image_as_base64_text_part(api: Api) -> None:
    data = {"prompt": "add a hat", "image": "data:image/png;base64," + base64.b64encode(png(72, 64)).decode()}
    assert_openai_error(api.client.post(EDITS, data=data), "image")  # urlencoded, not multipart
    r = api.client.post(EDITS, data=data, files={"mask": ("m.png", half_transparent_mask(72, 64), "image/png")})
    assert r.status_code == 200, r.text
    assert api.last.init_images[0].size == (72, 64) and api.last.task == Task.INPAINT


def test_oversized_image_is_refused_before_decoding(make_api: Callable[..., Api]) -> None:
    api = make_api(max_image_pixels=64 * 64)
    r = api.edit([("image", ("in.png", png(128, 64), "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["param"] == "image"


# The official SDK's requests ------------------------------------------------------------------------------------------


def sdk_call(api: Api, fn: Callable[[openai.AsyncOpenAI], Any]) -> Any:
    """Run the official async client against the app in-process (the app's lifespan runs in the TestClient)."""

    async def run() -> Any:
        transport = httpx2.ASGITransport(app=api.client.app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
            client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
            return await fn(client)

    return asyncio.run(run())


def test_sdk_generate_and_edit_shapes(api: Api) -> None:
    result = sdk_call(api, lambda c: c.images.generate(model="gpt-image-1", prompt="a fox", size="64x64", n=2))
    assert [decode(d.b64_json).size for d in result.data] == [(64, 64)] * 2
    assert result.usage.total_tokens > 0 and result.size == "64x64"

    images = [("a.png", png(64, 64, (255, 0, 0)), "image/png"), ("b.png", png(), "image/png")]
    result = sdk_call(
        api,
        lambda c: c.images.edit(
            model="demo-qwen-image-edit", image=images, prompt="merge", extra_body={"steps": 2}, size="64x64"
        ),
    )
    assert len(result.data) == 1
    assert api.last.task == Task.EDIT and api.last.init_images[0].size == (128, 64) and api.last.steps == 2

    mask = ("m.png", half_transparent_mask(), "image/png")
    sdk_call(api, lambda c: c.images.edit(image=images[0], mask=mask, prompt="hat", response_format="url"))
    assert api.last.task == Task.INPAINT and api.last.mask.getpixel((0, 0)) == 255


def test_sdk_raises_bad_request_with_param(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk_call(api, lambda c: c.images.generate(prompt="a fox", size="65x64"))
    assert caught.value.param == "size" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk_call(api, lambda c: c.images.generate(prompt="a fox", model="no-such-model"))
    assert missing.value.code == "model_not_found"


# Variations -----------------------------------------------------------------------------------------------------------

VARIATIONS = "/v1/images/variations"


def vary(api: Api, image: bytes | None = None, **fields: Any) -> httpx.Response:
    files = [("image", ("in.png", png(96, 64, (200, 10, 10)) if image is None else image, "image/png"))]
    return api.client.post(VARIATIONS, data={k: str(v) for k, v in fields.items()}, files=files)


def test_variations_are_image_to_image_on_the_generations_model(api: Api) -> None:
    r = vary(api, size="64x64", n=3, seed=9)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [set(item) for item in body["data"]] == [{"url"}] * 3  # OpenAI's default for variations: url
    assert body["size"] == "64x64" and body["background"] == "opaque" and body["output_format"] == "png"
    req = api.last
    assert (req.model, req.task, req.width, req.height, req.batch_size) == ("demo-sdxl", Task.IMG2IMG, 64, 64, 3)
    assert (req.seed, req.prompt, req.strength, req.steps) == (9, "", 0.6, 20)  # openai_variation_strength
    assert req.init_images[0].getpixel((0, 0)) == (200, 10, 10) and req.init_images[0].size == (96, 64)
    fetched = api.client.get(body["data"][2]["url"])
    assert decode(fetched.content).getpixel((0, 0)) == seed_color(11)  # seed + 2: each variation differs
    assert body["usage"]["input_tokens_details"]["image_tokens"] == image_tokens(96, 64)


def test_variation_defaults_and_extensions(api: Api) -> None:
    assert vary(api).json()["size"] == "1024x1024"  # OpenAI's default size
    assert vary(api, size="auto").json()["size"] == "96x64"  # the image's own
    r = vary(api, size="64x64", model="dall-e-2", response_format="b64_json", user="bob", prompt="a red barn")
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    assert vary(api, size="64x64", model="openai/demo-sd15", strength=0.3, steps=4, guidance_scale=2).status_code == 200
    req = api.last
    assert (req.model, req.strength, req.steps, req.guidance) == ("demo-sd15", 0.3, 4, 2.0)
    records = api.client.app.state.jobs.list_jobs(dialect="openai")  # type: ignore[attr-defined]
    assert any(r.request_json.get("user") == "bob" and r.request_json["prompt"] == "a red barn" for r in records)
    assert all("image" not in r.request_json or r.request_json["image"].startswith("<image") for r in records)


@pytest.mark.parametrize(
    "fields, param, status",
    [
        ({"n": 11}, "n", 400),
        ({"n": 0}, "n", 400),
        ({"size": "65x64"}, "size", 400),
        ({"response_format": "png"}, "response_format", 400),
        ({"strength": 0}, "strength", 400),
        ({"prompt": "x", "quality": "hd"}, "quality", 400),  # not a variations field
        ({"model": "demo-qwen-image-edit"}, "model", 400),
        ({"model": "dall-e-9"}, "model", 404),
    ],
)
def test_variation_fields_are_validated(api: Api, fields: dict[str, Any], param: str, status: int) -> None:
    assert_openai_error(vary(api, **fields), param, status=status)
    assert not api.engine.requests


def test_variation_image_is_required_once_and_decoded(api: Api) -> None:
    assert_openai_error(api.client.post(VARIATIONS, data={"n": "1"}, files=[("x", ("a", b"", "text/plain"))]), "x")
    r = api.client.post(VARIATIONS, files=[("image", ("a.png", png(), "image/png"))] * 2)
    assert_openai_error(r, "image")
    assert_openai_error(vary(api, image=b"not an image"), "image")
    assert_openai_error(api.client.post(VARIATIONS, json={"n": 1}), "image")
    assert not api.engine.requests


def test_sdk_create_variation(api: Api) -> None:
    image = ("in.png", png(64, 64), "image/png")
    result = sdk_call(
        api, lambda c: c.images.create_variation(image=image, n=2, size="256x256", response_format="b64_json")
    )
    assert [decode(d.b64_json).size for d in result.data] == [(256, 256)] * 2
    result = sdk_call(api, lambda c: c.images.create_variation(image=image, model="dall-e-2", size="256x256"))
    assert result.data[0].url and "/v2/results/" in result.data[0].url
