"""The A1111 wire contract (/sdapi/v1 and /v2/automatic1111/sdapi/v1) against a fake engine: no torch, no GPU."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import EngineNotReady, GenerationFailed, InvalidRequest, ModelLoadError, QueueFull
from pipelines.registry import Registry
from pipelines.request import Task
from server.api.a1111.infotext import create_infotext, parse_generation_parameters, quote
from server.app import create_app
from server.errors import ApiError
from server.images import b64, decode_image, encode_image, encode_png, read_png_info
from server.settings import Settings
from tests.api.fake_engine import FakeEngine, seed_color

SD = "/sdapi/v1"
GW = "/v2/automatic1111/sdapi/v1"

MODELS_YAML = """
default_model: demo-sd15
models:
  demo-sd15:
    family: sd15
    source: demo:sd15
    aliases: [Realistic_Vision_V5.1.safetensors]
  demo-flux:
    family: flux
    source: demo:flux
    aliases: [flux-dev.safetensors]
"""

INFO_KEYS = {
    "prompt", "negative_prompt", "all_prompts", "all_negative_prompts", "seed", "all_seeds", "subseed", "all_subseeds",
    "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces",
    "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash", "seed_resize_from_w",
    "seed_resize_from_h", "denoising_strength", "extra_generation_params", "index_of_first_image", "infotexts",
    "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version",
}  # fmt: skip
STATE_KEYS = {
    "skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
    "sampling_steps",
}  # fmt: skip
A1111_ERROR_KEYS = {"error", "detail", "body", "errors"}


# Fixtures and helpers ------------------------------------------------------------------------------------------------


def make_settings(**overrides) -> Settings:
    limits = {"max_width": 2048, "max_height": 2048, "max_steps": 150, "max_images_per_request": 16}
    return Settings(**{**limits, **overrides})


def client_with(engine, registry, **settings) -> TestClient:
    return TestClient(create_app(make_settings(**settings), engine=engine, registry=registry))


def png_b64(size=(64, 64), color=(200, 10, 10), mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return b64(buf.getvalue())


def decode_png(data: str) -> Image.Image:
    assert not data.startswith("data:")
    img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert img.format == "PNG"
    return img


def info_of(response) -> dict:
    assert response.status_code == 200, response.text
    info = response.json()["info"]
    assert isinstance(info, str)
    return json.loads(info)


def assert_422_names(response, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert A1111_ERROR_KEYS <= set(body)
    locs = [d["loc"] for d in body["detail"]]
    assert ["body", *field.split(".")] in locs, locs
    assert field in body["errors"]


# txt2img -------------------------------------------------------------------------------------------------------------


def test_txt2img_response_shape_and_a1111_defaults(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/txt2img", json={"prompt": "a lighthouse"})
    info = info_of(r)
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert set(info) == INFO_KEYS and len(info) == 32
    params = body["parameters"]
    expected = {"steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "sampler_index": "Euler",
                "sampler_name": None, "seed": -1, "batch_size": 1, "n_iter": 1, "denoising_strength": 0.75,
                "send_images": True, "save_images": False, "negative_prompt": "", "styles": [], "subseed": -1,
                "override_settings_restore_afterwards": True, "enable_hr": False, "hr_scale": 2.0}  # fmt: skip
    assert {k: params[k] for k in expected} == expected
    req = engine.requests[-1]
    assert (req.model, req.task, req.steps, req.guidance, req.sampler, req.width, req.height) == (
        "demo-sd15", Task.TXT2IMG, 50, 7.0, "Euler", 512, 512
    )  # fmt: skip
    assert info["sd_model_name"] == "demo-sd15" and info["version"] == "v1.10.1"
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]  # -1 resolved by the engine
    assert len(info["job_timestamp"]) == 14 and info["index_of_first_image"] == 0
    assert r.headers["X-Process-Time"]


def test_images_are_raw_base64_pngs_with_infotext_chunk(client: TestClient):
    r = client.post(f"{SD}/txt2img", json={"prompt": "a red barn", "negative_prompt": "fog", "seed": 77, "steps": 3,
                                           "width": 64, "height": 64})  # fmt: skip
    info = info_of(r)
    img = decode_png(r.json()["images"][0])
    assert img.size == (64, 64)
    text = img.info["parameters"]
    assert text == info["infotexts"][0]
    assert text.startswith("a red barn\nNegative prompt: fog\nSteps: 3, Sampler: Euler, Schedule type: Automatic, ")
    assert "CFG scale: 7, Seed: 77, Size: 64x64, Model hash: " in text and "Model: demo-sd15, Version: v1.10.1" in text


def test_unknown_keys_ignored_and_nulls_mean_default(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/txt2img", json={"prompt": "x", "steps": None, "cfg_scale": None, "styles": None,
                                           "override_settings": None, "sampler_index": None, "no_such_field": 1,
                                           "alwayson_scripts": None, "width": 64, "height": 64})  # fmt: skip
    info = info_of(r)
    assert "no_such_field" not in r.json()["parameters"]
    assert r.json()["parameters"]["steps"] == 50 and info["steps"] == 50 and info["cfg_scale"] == 7.0
    assert engine.requests[-1].sampler == "Euler"


def test_seeds_batches_and_per_image_infotexts(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/txt2img", json={"prompt": "p", "seed": 1234, "batch_size": 2, "n_iter": 2, "width": 32,
                                           "height": 32, "steps": 2})  # fmt: skip
    info = info_of(r)
    images = [decode_png(d) for d in r.json()["images"]]
    assert len(images) == 4 and info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert info["all_prompts"] == ["p"] * 4 and info["batch_size"] == 2
    for i, img in enumerate(images):
        assert f"Seed: {1234 + i}," in img.info["parameters"] == info["infotexts"][i]
        assert img.getpixel((0, 0)) == seed_color(1234 + i)
    assert (engine.requests[-1].batch_size, engine.requests[-1].n_iter) == (2, 2)


def test_size_floored_to_model_multiple_and_reported(client: TestClient, engine: FakeEngine):
    info = info_of(client.post(f"{SD}/txt2img", json={"width": 100, "height": 71, "steps": 1}))
    assert (info["width"], info["height"]) == (96, 64) and "Size: 96x64" in info["infotexts"][0]
    assert (engine.requests[-1].width, engine.requests[-1].height) == (96, 64)
    flux = {"sd_model_checkpoint": "demo-flux"}
    info = info_of(client.post(f"{SD}/txt2img", json={"width": 520, "height": 250, "steps": 1,
                                                      "override_settings": flux}))  # fmt: skip
    assert (info["width"], info["height"]) == (512, 240)  # FLUX needs /16


def test_sampler_and_scheduler_pass_through_and_normalized_name_reported(client: TestClient, engine: FakeEngine):
    info = info_of(client.post(f"{SD}/txt2img", json={"sampler_name": "DPM++ 2M Karras", "sampler_index": "Euler a",
                                                      "scheduler": "automatic", "steps": 2}))  # fmt: skip
    assert (engine.requests[-1].sampler, engine.requests[-1].schedule) == ("DPM++ 2M Karras", "automatic")
    assert info["sampler_name"] == "DPM++ 2M" and "Sampler: DPM++ 2M," in info["infotexts"][0]
    client.post(f"{SD}/txt2img", json={"sampler_index": "Euler a", "steps": 1})
    assert engine.requests[-1].sampler == "Euler a"  # sampler_index is the fallback


def test_send_images_false_and_grid_only_with_save_images(client: TestClient):
    r = client.post(f"{SD}/txt2img", json={"send_images": False, "steps": 1, "width": 32, "height": 32})
    assert r.json()["images"] == [] and len(info_of(r)["infotexts"]) == 1
    r = client.post(f"{SD}/txt2img", json={"batch_size": 2, "steps": 1, "width": 32, "height": 32})
    assert len(r.json()["images"]) == 2
    r = client.post(f"{SD}/txt2img", json={"batch_size": 2, "save_images": True, "steps": 1, "width": 32,
                                           "height": 32})  # fmt: skip
    info = info_of(r)
    images = [decode_png(d) for d in r.json()["images"]]
    assert len(images) == 3 and info["index_of_first_image"] == 1 and images[0].size == (64, 32)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 100000}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"width": 0}, "width"),
        ({"width": 4096}, "width"),
        ({"height": -64}, "height"),
        ({"width": 4}, "width"),
        ({"batch_size": 8, "n_iter": 8}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"seed": -5}, "seed"),
        ({"prompt": "x" * 20_001}, "prompt"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"adetailer": {"args": []}}}, "alwayson_scripts.adetailer"),
    ],
)
def test_txt2img_invalid_fields_are_422_naming_the_field(client: TestClient, engine: FakeEngine, payload, field):
    assert_422_names(client.post(f"{SD}/txt2img", json=payload), field)
    assert engine.requests == []


def test_all_invalid_fields_reported_at_once(client: TestClient):
    r = client.post(f"{SD}/txt2img", json={"steps": 0, "width": 0})
    assert_422_names(r, "steps")
    assert_422_names(r, "width")


def test_engine_refusal_names_the_a1111_field(client: TestClient, engine: FakeEngine):
    engine.submit_error = InvalidRequest("guidance", "too high for this model")
    assert_422_names(client.post(f"{SD}/txt2img", json={}), "cfg_scale")


# img2img -------------------------------------------------------------------------------------------------------------


def test_img2img_data_url_repeated_for_batch_and_echo_without_images(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/img2img", json={"init_images": ["data:image/png;base64," + png_b64()], "batch_size": 3,
                                           "steps": 2, "width": 64, "height": 64})  # fmt: skip
    info = info_of(r)
    req = engine.requests[-1]
    assert req.task == Task.IMG2IMG and len(req.init_images) == 3 and req.init_images[0].mode == "RGB"
    assert req.strength == 0.75 and req.mask is None
    assert r.json()["parameters"]["init_images"] is None and r.json()["parameters"]["denoising_strength"] == 0.75
    assert info["extra_generation_params"] == {"Denoising strength": 0.75}
    assert "Denoising strength: 0.75" in info["infotexts"][0] and len(r.json()["images"]) == 3


def test_img2img_include_init_images_keeps_them_in_the_echo(client: TestClient):
    image = png_b64()
    r = client.post(f"{SD}/img2img", json={"init_images": [image], "include_init_images": True, "steps": 1})
    assert r.json()["parameters"]["init_images"] == [image]


def test_img2img_with_mask_is_inpainting_with_a1111_options(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/img2img", json={"init_images": [png_b64()], "mask": png_b64(color=(255, 255, 255)),
                                           "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False,
                                           "denoising_strength": 0.5, "steps": 1, "width": 64,
                                           "height": 64})  # fmt: skip
    info = info_of(r)
    req = engine.requests[-1]
    assert req.task == Task.INPAINT and req.mask.mode == "L" and req.mask.getpixel((0, 0)) == 255
    assert (req.inpaint.mask_blur, req.inpaint.inpainting_fill, req.inpaint.full_res) == (2, 1, False)
    assert req.strength == 0.5
    assert info["extra_generation_params"]["Mask blur"] == 2 and r.json()["parameters"]["mask"] is None
    # the defaults A1111's API uses (not its UI's)
    client.post(f"{SD}/img2img", json={"init_images": [png_b64()], "mask": png_b64(), "steps": 1})
    opts = engine.requests[-1].inpaint
    assert (opts.mask_blur, opts.inpainting_fill, opts.full_res, opts.invert) == (4, 0, True, False)


def test_rgba_mask_uses_alpha(client: TestClient, engine: FakeEngine):
    mask = png_b64(color=(0, 0, 0, 255), mode="RGBA")  # black but opaque -> alpha says "repaint"
    buf = io.BytesIO()
    half = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    half.paste((0, 0, 0, 255), (0, 0, 32, 64))
    half.save(buf, format="PNG")
    client.post(f"{SD}/img2img", json={"init_images": [png_b64()], "mask": b64(buf.getvalue()), "steps": 1})
    m = engine.requests[-1].mask
    assert (m.getpixel((0, 0)), m.getpixel((63, 0))) == (255, 0)
    client.post(f"{SD}/img2img", json={"init_images": [png_b64()], "mask": mask, "steps": 1})
    assert engine.requests[-1].mask.getpixel((0, 0)) == 0  # fully opaque: luminance (black = keep)


def test_img2img_without_init_images_is_404_as_a1111(client: TestClient):
    for payload in ({}, {"init_images": None}, {"init_images": []}):
        r = client.post(f"{SD}/img2img", json=payload)
        assert r.status_code == 404 and r.json()["detail"] == "Init image not found"
        assert A1111_ERROR_KEYS <= set(r.json())


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"init_images": ["not base64 at all!!"]}, "init_images"),
        ({"init_images": [b64(b"hello, I am not an image")]}, "init_images"),
        ({"init_images": [png_b64()[:40]]}, "init_images"),
        ({"init_images": ["data:text/plain;base64,aGVsbG8="]}, "init_images"),
        ({"init_images": [png_b64()], "mask": "%%%"}, "mask"),
        ({"init_images": [png_b64(), png_b64()], "batch_size": 1}, "init_images"),
        ({"init_images": [png_b64()], "inpainting_fill": 7}, "inpainting_fill"),
        ({"init_images": [png_b64()], "denoising_strength": -0.1}, "denoising_strength"),
    ],
)
def test_img2img_bad_inputs_are_422_naming_the_field(client: TestClient, engine: FakeEngine, payload, field):
    r = client.post(f"{SD}/img2img", json={"steps": 1, **payload})
    assert r.status_code == 422, r.text
    assert field in r.json()["errors"] and ["body", field] in [d["loc"] for d in r.json()["detail"]]
    assert engine.requests == []


def test_img2img_too_many_pixels_is_413(engine: FakeEngine, a1111_registry: Registry):
    with client_with(engine, a1111_registry, max_image_pixels=64 * 64) as c:
        r = c.post(f"{SD}/img2img", json={"init_images": [png_b64(size=(65, 64))]})
    assert r.status_code == 413 and "init_images" in r.json()["detail"]


# Models and options --------------------------------------------------------------------------------------------------


def test_sd_models_titles_contain_ids(client: TestClient, a1111_registry: Registry):
    models = client.get(f"{SD}/sd-models").json()
    assert [m["model_name"] for m in models] == ["demo-sd15", "demo-flux"]
    for m in models:
        assert m["title"].startswith(m["model_name"] + " [") and m["title"] == f"{m['model_name']} [{m['hash']}]"
        assert len(m["sha256"]) == 64 and m["filename"] and set(m) == {
            "title", "model_name", "hash", "sha256", "filename", "config"
        }  # fmt: skip


def test_options_get_has_checkpoint_title_from_sd_models(client: TestClient):
    options = client.get(f"{SD}/options").json()
    titles = [m["title"] for m in client.get(f"{SD}/sd-models").json()]
    assert options["sd_model_checkpoint"] == titles[0]
    sha = {m["title"]: m["sha256"] for m in client.get(f"{SD}/sd-models").json()}
    assert options["sd_checkpoint_hash"] == sha[titles[0]]
    expected = {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                "eta_noise_seed_delta": 0, "return_grid": True}  # fmt: skip
    assert {k: options[k] for k in expected} == expected
    assert "sd_checkpoints_limit" in options and "show_progress_every_n_steps" in options


def test_options_post_alias_loads_model_and_roundtrips(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/options", json={"sd_model_checkpoint": "flux-dev", "jpeg_quality": 90, "my_ext": [1]})
    assert r.status_code == 200 and r.json() is None
    assert engine.loaded == ["demo-flux"]
    options = client.get(f"{SD}/options").json()
    assert options["sd_model_checkpoint"].startswith("demo-flux [")
    assert options["jpeg_quality"] == 90 and options["my_ext"] == [1]
    client.post(f"{SD}/txt2img", json={"steps": 1, "width": 64, "height": 64})
    assert engine.requests[-1].model == "demo-flux"
    title = client.get(f"{SD}/sd-models").json()[0]["title"]
    client.post(f"{SD}/options", json={"sd_model_checkpoint": title})
    assert client.get(f"{SD}/options").json()["sd_model_checkpoint"] == title


def test_options_never_store_secrets(client: TestClient):
    secrets = {"hf_token": "abc", "api_key": "k", "password": "p", "gradio_auth": "u:p"}
    client.post(f"{SD}/options", json={**secrets, "harmless": 1, "token_merging_ratio": 0.5})
    options = client.get(f"{SD}/options").json()
    assert options["harmless"] == 1 and options["token_merging_ratio"] == 0.5 and not set(secrets) & set(options)


BAD_OPTIONS = {
    "jpeg_quality": "high",
    "img2img_background_color": "not a colour",
    "samples_format": "bmp",
    "n_rows": 10**6,
    "enable_pnginfo": "yes",
    "eta_ddim": 2.5,
    "sd_vae": "x" * 5000,
    "my_extension_option": "y" * 5000,  # unknown options are kept, but bounded in size
}


def test_every_option_is_checked_when_set_and_nothing_is_stored_then(client: TestClient):
    r = client.post(f"{SD}/options", json={**BAD_OPTIONS, "jpeg_quality": 95, **{"jpeg_quality": "high"}})
    assert r.status_code == 422 and set(r.json()) == A1111_ERROR_KEYS
    named = {e["loc"][-1] for e in r.json()["detail"]}
    assert named == set(BAD_OPTIONS), named
    options = client.get(f"{SD}/options").json()
    assert options["jpeg_quality"] == 80 and options["samples_format"] == "png" and "my_extension_option" not in options
    # Valid values of every kind pass, choices in any case.
    ok = {"jpeg_quality": 95, "img2img_background_color": "#00FF00", "samples_format": "WEBP", "eta_ddim": 1}
    assert client.post(f"{SD}/options", json=ok).status_code == 200
    assert client.get(f"{SD}/options").json()["samples_format"] == "webp"


def test_options_are_bounded_in_total(client: TestClient):
    statuses = [client.post(f"{SD}/options", json={f"ext_{i}": "z" * 4000}).status_code for i in range(20)]
    assert statuses[:15] == [200] * 15 and statuses[-1] == 422  # 4 KB each: the 16th or 17th passes 64 KiB
    r = client.post(f"{SD}/options", json={"ext_last": "z" * 4000})
    assert r.status_code == 422 and "at most" in r.json()["errors"]
    assert len(client.get(f"{SD}/options").content) < 80_000  # the 64 KiB kept and A1111's defaults (about 9 KB)


def test_no_stored_option_breaks_a_later_generation(client: TestClient):
    """Values stored before these checks existed (or by any other path) fall back to their defaults on read."""
    client.get(f"{SD}/options")
    state = client.app.state.a1111
    state.options.update({"jpeg_quality": "high", "img2img_background_color": "nope", "samples_format": "jpg",
                          "n_rows": "x", "enable_pnginfo": None})  # fmt: skip
    r = client.post(f"{SD}/txt2img", json={"steps": 1, "width": 64, "height": 64, "batch_size": 2})
    assert r.status_code == 200, r.text
    r = client.post(f"{SD}/img2img", json={"init_images": [png_b64()], "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    options = client.get(f"{SD}/options").json()
    assert options["jpeg_quality"] == 80 and options["img2img_background_color"] == "#ffffff"


def test_override_settings_are_checked_before_any_work(client: TestClient, engine: FakeEngine):
    body = {"steps": 1, "width": 64, "height": 64, "override_settings": {"jpeg_quality": "high"},
            "override_settings_restore_afterwards": False}  # fmt: skip
    r = client.post(f"{SD}/txt2img", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "override_settings", "jpeg_quality"]
    assert engine.requests == [] and client.get(f"{SD}/options").json()["jpeg_quality"] == 80


def test_options_unknown_checkpoint_is_404_naming_it(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert r.status_code == 404 and set(r.json()) == A1111_ERROR_KEYS
    assert "sd_model_checkpoint" in r.json()["detail"] and "nope.safetensors" in r.json()["detail"]
    assert engine.loaded == [] and client.get(f"{SD}/options").json()["sd_model_checkpoint"].startswith("demo-sd15")


def test_options_load_failure_is_reported(client: TestClient, engine: FakeEngine):
    engine.load_error = ModelLoadError("model 'demo-flux': weights are corrupt")
    r = client.post(f"{SD}/options", json={"sd_model_checkpoint": "demo-flux"})
    assert r.status_code == 500 and "weights are corrupt" in r.json()["detail"]
    assert client.get(f"{SD}/options").json()["sd_model_checkpoint"].startswith("demo-sd15")


def test_override_settings_checkpoint_per_request(client: TestClient, engine: FakeEngine):
    payload = {"steps": 1, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "flux-dev"}}
    info = info_of(client.post(f"{SD}/txt2img", json=payload))
    assert engine.requests[-1].model == "demo-flux" and info["sd_model_name"] == "demo-flux"
    assert client.get(f"{SD}/options").json()["sd_model_checkpoint"].startswith("demo-sd15")  # restored
    client.post(f"{SD}/txt2img", json={**payload, "override_settings_restore_afterwards": False})
    assert client.get(f"{SD}/options").json()["sd_model_checkpoint"].startswith("demo-flux")


def test_override_settings_unknown_checkpoint_is_4xx_naming_it(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/txt2img", json={"override_settings": {"sd_model_checkpoint": "missing_model"}})
    assert 400 <= r.status_code < 500 and set(r.json()) == A1111_ERROR_KEYS
    assert "override_settings.sd_model_checkpoint" in r.json()["detail"] and "missing_model" in r.json()["detail"]
    assert engine.requests == []


# Progress, interrupt, skip -------------------------------------------------------------------------------------------


def test_progress_idle_shape(client: TestClient):
    p = client.get(f"{SD}/progress").json()
    assert p["progress"] == 0 and p["eta_relative"] == 0 and p["current_image"] is None
    assert set(p["state"]) == STATE_KEYS and p["state"]["job_count"] == 0
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(p)


def test_progress_while_busy_and_interrupt_returns_finished_images(client: TestClient, engine: FakeEngine):
    engine.block()
    result: dict = {}
    payload = {"prompt": "long", "steps": 30, "n_iter": 3, "width": 32, "height": 32, "seed": 5}
    worker = threading.Thread(target=lambda: result.setdefault("r", client.post(f"{SD}/txt2img", json=payload)))
    worker.start()
    engine.wait_for_running()
    p = client.get(f"{SD}/progress").json()
    assert p["state"]["job_count"] == 3 and p["state"]["sampling_steps"] == 30 and p["state"]["sampling_step"] == 1
    assert 0.01 < p["progress"] < 1 and set(p["state"]) == STATE_KEYS and p["state"]["job_no"] == 0
    r = client.post(f"{SD}/interrupt")
    assert r.status_code == 200 and r.json() == {}
    assert client.get(f"{SD}/progress").json()["state"]["interrupted"] in (True, False)  # job may have finished
    worker.join(10)
    assert not worker.is_alive()
    r = result["r"]
    info = info_of(r)
    assert len(r.json()["images"]) == 1 and info["all_seeds"] == [5, 6, 7]  # the interrupted batch is returned
    assert client.get(f"{SD}/progress").json()["state"]["job_count"] == 0


def test_skip_goes_on_with_next_batch(client: TestClient, engine: FakeEngine):
    engine.block()
    result: dict = {}
    payload = {"steps": 10, "n_iter": 2, "width": 32, "height": 32}
    worker = threading.Thread(target=lambda: result.setdefault("r", client.post(f"{SD}/txt2img", json=payload)))
    worker.start()
    engine.wait_for_running()
    r = client.post(f"{SD}/skip")
    assert r.status_code == 200 and r.json() is None
    engine.release()
    worker.join(10)
    assert len(result["r"].json()["images"]) == 2


def test_control_endpoints_answer_json_when_idle(client: TestClient):
    assert client.post(f"{SD}/interrupt").json() == {}
    r = client.post(f"{SD}/skip")
    assert r.status_code == 200 and r.text == "null"
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings"):
        r = client.post(f"{SD}/{path}")
        assert r.status_code == 200 and r.text == "null", path
    for path in ("unload-checkpoint", "reload-checkpoint"):
        r = client.post(f"{SD}/{path}")
        assert r.status_code == 200 and r.json() == {}, path


# png-info ------------------------------------------------------------------------------------------------------------


def test_png_info_parses_infotext_back(client: TestClient):
    r = client.post(f"{SD}/txt2img", json={"prompt": "a red barn, at dusk", "negative_prompt": "fog", "seed": 77,
                                           "steps": 3, "width": 64, "height": 48,
                                           "sampler_name": "DPM++ 2M Karras"})  # fmt: skip
    image = r.json()["images"][0]
    res = client.post(f"{SD}/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert set(res) == {"info", "items", "parameters"} and res["info"] == info_of(r)["infotexts"][0]
    p = res["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Sampler"], p["Seed"]) == (
        "a red barn, at dusk", "fog", "3", "DPM++ 2M", "77"
    )  # fmt: skip
    assert (p["Size-1"], p["Size-2"], p["CFG scale"], p["Model"]) == ("64", "48", "7", "demo-sd15")


def test_png_info_of_image_without_infotext_and_jpeg_exif(client: TestClient):
    res = client.post(f"{SD}/png-info", json={"image": png_b64()}).json()
    assert res["info"] == "" and res["parameters"] == {}
    client.post(f"{SD}/options", json={"samples_format": "jpg"})
    r = client.post(f"{SD}/txt2img", json={"prompt": "jpeg", "seed": 3, "steps": 2, "width": 32, "height": 32})
    raw = base64.b64decode(r.json()["images"][0])
    assert raw[:2] == b"\xff\xd8"
    p = client.post(f"{SD}/png-info", json={"image": b64(raw)}).json()["parameters"]
    assert (p["Prompt"], p["Seed"], p["Steps"]) == ("jpeg", "3", "2")


def test_png_info_corrupt_image_is_422(client: TestClient):
    assert_422_names(client.post(f"{SD}/png-info", json={"image": "bm90IGFuIGltYWdl"}), "image")


# Gateway copy --------------------------------------------------------------------------------------------------------


def test_gateway_txt2img_defaults_and_model_field(client: TestClient, engine: FakeEngine):
    r = client.post(f"{GW}/txt2img", json={"prompt": "a cat"})
    info = info_of(r)
    req = engine.requests[-1]
    assert (req.steps, req.width, req.height, req.guidance) == (20, 512, 512, 7.0)
    assert req.model == "demo-sd15" and info["steps"] == 20 and r.json()["parameters"]["steps"] == 20
    assert len(r.json()["images"]) == 1 and not r.json()["images"][0].startswith("data:")
    client.post(f"{GW}/txt2img", json={"prompt": "a cat", "model": "demo-flux", "steps": 4})
    assert (engine.requests[-1].model, engine.requests[-1].steps) == ("demo-flux", 4)
    client.post(f"{GW}/txt2img", json={"prompt": "a cat", "model": "Realistic_Vision_V5.1.safetensors"})
    assert engine.requests[-1].model == "demo-sd15"


def test_gateway_errors(client: TestClient):
    r = client.post(f"{GW}/txt2img", json={"prompt": "x", "model": "sdxl-turbo"})
    assert r.status_code == 404 and "model" in r.json()["detail"] and set(r.json()) == A1111_ERROR_KEYS
    assert_422_names(client.post(f"{GW}/txt2img", json={"steps": 5}), "prompt")


def test_gateway_mounts_every_route(client: TestClient):
    for path in ("sd-models", "options", "progress", "samplers", "schedulers"):
        assert client.get(f"{GW}/{path}").json() == client.get(f"{SD}/{path}").json(), path
    r = client.post(f"{GW}/img2img", json={"init_images": [png_b64()], "steps": 1})
    assert r.status_code == 200


# Listings ------------------------------------------------------------------------------------------------------------


def test_samplers_schedulers_upscalers(client: TestClient):
    samplers = client.get(f"{SD}/samplers").json()
    names = [s["name"] for s in samplers]
    assert names[0] == "DPM++ 2M" and {"Euler a", "Euler", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert samplers[0]["aliases"] == ["k_dpmpp_2m"] and samplers[0]["options"] == {"scheduler": "karras"}
    schedulers = client.get(f"{SD}/schedulers").json()
    assert [s["name"] for s in schedulers][:3] == ["automatic", "uniform", "karras"]
    karras = schedulers[2]
    assert karras == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                      "need_inner_model": False}  # fmt: skip
    upscalers = client.get(f"{SD}/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = [m["name"] for m in client.get(f"{SD}/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and len(modes) == 6


def test_empty_listings_and_static_shapes(client: TestClient):
    assert client.get(f"{SD}/scripts").json()["txt2img"] == []  # the img2img ones: tests/api/test_a1111_scripts.py
    assert client.get(f"{SD}/embeddings").json() == {"loaded": {}, "skipped": {}}
    for path in ("loras", "sd-vae", "hypernetworks", "face-restorers",
                 "realesrgan-models", "extensions"):  # fmt: skip
        r = client.get(f"{SD}/{path}")
        assert r.status_code == 200 and r.json() == [], path
    memory = client.get(f"{SD}/memory").json()
    assert set(memory) == {"ram", "cuda"}


def test_cmd_flags_has_no_secrets(engine: FakeEngine, a1111_registry: Registry, monkeypatch: pytest.MonkeyPatch):
    with client_with(engine, a1111_registry, port=7861) as c:
        flags = c.get(f"{SD}/cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is True and flags["port"] == 7861 and flags["listen"] is False
    assert not [k for k in flags if any(w in k.lower() for w in ("auth", "token", "secret", "password", "key"))]


# Errors --------------------------------------------------------------------------------------------------------------


def test_error_body_shapes_by_dialect(client: TestClient):
    r = client.get(f"{SD}/no-such-route")
    assert r.status_code == 404 and set(r.json()) == A1111_ERROR_KEYS and r.json()["detail"] == "Not Found"
    r = client.get("/no-such-route")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = client.post(f"{SD}/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and set(r.json()) == A1111_ERROR_KEYS and isinstance(r.json()["detail"], list)
    r = client.post(f"{SD}/interrogate", json={"image": "x", "model": "clip"})
    assert r.status_code == 501 and set(r.json()) == A1111_ERROR_KEYS


def test_engine_errors_map_to_status_codes(client: TestClient, engine: FakeEngine):
    engine.submit_error = QueueFull(retry_after_s=7)
    r = client.post(f"{SD}/txt2img", json={})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.json()["error"] == "QueueFull"
    engine.submit_error = None
    engine.fail_with = GenerationFailed("generation failed: out of GPU memory for this request")
    r = client.post(f"{SD}/txt2img", json={"steps": 1})
    assert r.status_code == 500 and "out of GPU memory" in r.json()["detail"]


def test_engine_not_started_is_503_with_retry_after(a1111_registry: Registry):
    app = create_app(make_settings(), engine=FakeEngine(a1111_registry), registry=a1111_registry)
    app.state.engine = None  # as while the real engine is still starting
    with TestClient(app) as c:
        c.app.state.engine = None
        r = c.post(f"{SD}/txt2img", json={})
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"] == EngineNotReady.__name__
        assert c.get(f"{SD}/progress").json()["state"]["job_count"] == 0  # polling still works


def test_unexpected_error_is_500_without_internals(a1111_registry: Registry):
    engine = FakeEngine(a1111_registry)
    engine.submit_error = RuntimeError("boom in /srv/easel/secret/path.py line 3")
    with TestClient(
        create_app(make_settings(), engine=engine, registry=a1111_registry), raise_server_exceptions=False
    ) as c:
        r = c.post(f"{SD}/txt2img", json={})
    assert r.status_code == 500 and set(r.json()) == A1111_ERROR_KEYS
    assert "/srv/easel" not in r.text and "Traceback" not in r.text and "RuntimeError" in r.text


def test_sync_timeout_is_504_and_job_keeps_running(engine: FakeEngine, a1111_registry: Registry):
    engine.block()
    with client_with(engine, a1111_registry, sync_timeout_s=0.1) as c:
        r = c.post(f"{SD}/txt2img", json={"steps": 5, "width": 32, "height": 32})
        assert r.status_code == 504 and "sync_timeout_s" in r.json()["detail"]
        assert c.get(f"{SD}/progress").json()["state"]["job_count"] == 1
        engine.release()


# Images and infotext units -------------------------------------------------------------------------------------------


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims another size: the pixel cap must refuse it before decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decode_image_limits():
    limits = {"max_bytes": 10_000, "max_pixels": 100 * 100}
    img = decode_image("data:image/png;base64," + png_b64((10, 10)), "init_images", **limits)
    assert img.size == (10, 10)
    with pytest.raises(ApiError) as e:
        decode_image("A" * 20_000, "init_images", **limits)  # refused on length, before decoding
    assert e.value.status == 413 and e.value.field == "init_images"
    with pytest.raises(ApiError) as e:
        decode_image(b64(_png_with_header_size(50_000, 50_000)), "mask", **limits)
    assert e.value.status == 413 and e.value.field == "mask"
    with pytest.raises(ApiError) as e:
        decode_image("http://example.com/a.png", "init_images", **limits)
    assert e.value.status == 422
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="ICO")
    with pytest.raises(ApiError) as e:
        decode_image(b64(buf.getvalue()), "init_images", **limits)  # a real image, but not an accepted format
    assert e.value.status == 422


def test_encode_and_read_infotext_all_formats():
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    text = "a, b\nNegative prompt: ü\nSteps: 2, Sampler: Euler, Seed: 1"
    assert read_png_info(Image.open(io.BytesIO(encode_png(img, text)))) == text
    for fmt in ("jpeg", "webp"):
        assert read_png_info(Image.open(io.BytesIO(encode_image(img, fmt, 80, text)))) == text
    assert read_png_info(Image.open(io.BytesIO(encode_png(img, None)))) is None


def test_infotext_quote_and_roundtrip():
    assert quote("Euler a") == "Euler a" and quote("a, b") == '"a, b"' and quote(7) == 7
    text = create_infotext(
        "prompt",
        "neg",
        {
            "Steps": 20,
            "Sampler": "Euler a",
            "Schedule type": "Automatic",
            "CFG scale": "7",
            "Seed": 123,
            "Size": "512x512",
            "Model hash": "abc",
            "Model": "name",
            "Lora": None,
            "Note": "x: y, z",
            "Version": "v1.10.1",
        },  # fmt: skip
    )
    assert text == (
        "prompt\nNegative prompt: neg\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
        'Seed: 123, Size: 512x512, Model hash: abc, Model: name, Note: "x: y, z", Version: v1.10.1'
    )
    p = parse_generation_parameters(text)
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Size-1"], p["Size-2"], p["Note"]) == (
        "prompt", "neg", "20", "512", "512", "x: y, z"
    )  # fmt: skip
    assert parse_generation_parameters("just a prompt")["Prompt"] == "just a prompt"
    assert create_infotext("p", "", {"Steps": 1}) == "p\nSteps: 1"


def test_http_side_never_imports_torch():
    code = (
        "import sys, server.app, server.api.a1111, server.images, server.errors, tests.api.fake_engine; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_hires_fix_fields_reach_the_engine_and_the_infotext(client: TestClient, engine: FakeEngine):
    body = {
        "prompt": "a castle",
        "steps": 4,
        "width": 256,
        "height": 256,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent (bicubic)",
        "hr_second_pass_steps": 3,
        "denoising_strength": 0.55,
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    hires = engine.requests[-1].hires
    assert hires is not None and (hires.scale, hires.upscaler, hires.second_pass_steps) == (1.5, "Latent (bicubic)", 3)
    assert hires.denoising_strength == 0.55
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"]) == (256, 256)  # A1111 reports the first-pass size
    assert info["extra_generation_params"]["Hires upscale"] == 1.5
    assert "Hires upscaler: Latent (bicubic)" in info["infotexts"][0]
    client.post("/sdapi/v1/txt2img", json={"prompt": "no hires", "steps": 2})
    assert engine.requests[-1].hires is None


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_scale": 8.0, "width": 512}, "hr_scale"),  # 4096 px is above max_width
        ({"hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ],
)
def test_hires_fix_bad_values_are_422_naming_the_field(client: TestClient, extra: dict, field: str):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True, **extra})
    assert r.status_code == 422 and field in r.text


# 500s that must be 4xx (issue #14) -----------------------------------------------------------------------------------


def raw_post(client: TestClient, path: str, body: dict) -> Any:
    """JSON as any client may send it: json.dumps escapes a lone surrogate as \\ud800 (httpx would refuse it)."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_text_with_a_lone_surrogate_is_refused_naming_the_field(client: TestClient, engine: FakeEngine):
    small = {"steps": 1, "width": 64, "height": 64}
    r = raw_post(client, f"{SD}/txt2img", {**small, "prompt": "a \ud800 fox"})
    assert r.status_code == 422 and set(r.json()) == A1111_ERROR_KEYS
    assert r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = raw_post(client, f"{GW}/txt2img", {**small, "prompt": "x", "styles": ["ok", "\udfff"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "styles", 1]
    r = raw_post(client, f"{SD}/options", {"my_option": {"nested": "\ud800"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "my_option", "nested"]
    r = raw_post(client, "/v1/images/generations", {"prompt": "a \ud800 fox"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # OpenAI's shape and status
    assert engine.requests == []
    # A valid pair (an emoji, escaped as two surrogates) is text.
    assert raw_post(client, f"{SD}/txt2img", {**small, "prompt": "a \U0001f98a"}).status_code == 200


def test_seeds_that_cannot_be_stored_are_refused_before_any_work(client: TestClient, engine: FakeEngine):
    small = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    for seed, n_iter in ((2**63 - 1, 2), (2**63, 1), (10**30, 1)):
        r = client.post(f"{SD}/txt2img", json={**small, "seed": seed, "n_iter": n_iter})
        assert r.status_code == 422, (seed, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "seed"]
    assert engine.requests == []
    r = client.post(f"{GW}/txt2img", json={**small, "seed": 2**63 - 2, "n_iter": 2, "async": True})
    assert r.status_code == 202  # the last seed, 2**63 - 1, still fits
    r = client.post(f"{SD}/txt2img", json={**small, "seed": 2**63 - 2, "n_iter": 2})
    assert r.status_code == 200 and info_of(r)["all_seeds"] == [2**63 - 2, 2**63 - 1]


def test_a_resize_that_rounds_to_zero_pixels_is_refused(client: TestClient, engine: FakeEngine):
    body = {"init_images": [png_b64((1, 2000))], "resize_mode": 2, "steps": 1, "width": 64, "height": 64}
    r = client.post(f"{SD}/img2img", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images"]
    assert "0x64" in r.json()["errors"] and engine.requests == []
    assert client.post(f"{SD}/img2img", json={**body, "resize_mode": 0}).status_code == 200
