"""A1111 parity (issue 16, part A) against a real `easel serve` with the demo models, as clients send it: the real
`webuiapi` client, and raw HTTP for what it cannot send (a body without Content-Type, the `infotext` field)."""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

SMALL = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_untyped_json_is_generated_and_foreign_origins_refused(live_server):
    body = json.dumps({**SMALL, "seed": 11}).encode()
    # httpx sends no Content-Type for raw bytes, as the integrations that post untyped JSON do
    r = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", content=body, timeout=120)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["seed"] == 11 and len(r.json()["images"]) == 1
    r = httpx.post(
        f"{live_server.url}/sdapi/v1/txt2img", content=body, headers={"Origin": "https://evil.example"}, timeout=60
    )
    assert r.status_code == 403 and "Content-Type" in r.json()["detail"]


def test_missing_lora_and_restore_faces_generate_and_say_so(api, live_server):
    r = api.txt2img(prompt="a fox <lora:not_installed:0.7>", width=64, height=64, steps=2, seed=3, restore_faces=True)
    assert r.image.size == (64, 64)
    extra = r.info["extra_generation_params"]
    assert extra["Lora not found"] == "not_installed"
    assert extra["Face restoration not applied"] == "no face-restoration model is installed"
    assert "Lora not found: not_installed" in r.info["infotexts"][0]
    log = live_server.log.read_text()
    assert "Lora not found: not_installed" in log and "restore_faces not applied" in log


def test_extras_with_webuiapi(api):
    src = Image.new("RGB", (40, 24), (10, 120, 200))
    r = api.extra_single_image(src, upscaler_1="Lanczos", upscaling_resize=2)
    assert r.image.size == (80, 48) and r.image.getpixel((5, 5)) == (10, 120, 200)
    assert r.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    r = api.extra_batch_images(
        [src, Image.new("RGB", (16, 16), "white")],
        resize_mode=1,
        upscaling_resize_w=32,
        upscaling_resize_h=32,
        upscaler_1="Nearest",
        upscaler_2="Lanczos",
        extras_upscaler_2_visibility=0.5,
    )
    assert [im.size for im in r.images] == [(32, 32), (32, 32)]
    assert "Postprocess upscaler 2: Lanczos" in r.info
    with pytest.raises(RuntimeError) as err:
        api.extra_single_image(src, upscaler_1="Lanczos", codeformer_visibility=0.5)
    assert err.value.args[0] == 422 and "no face-restoration model is installed" in err.value.args[1]


def test_infotext_field_fills_the_request(live_server):
    infotext = "a snowy hill\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 321, Size: 64x48"
    r = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={"infotext": infotext}, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a snowy hill", "fog", 321, 2)
    assert (info["width"], info["height"], info["cfg_scale"], info["sampler_name"]) == (64, 48, 5.0, "Euler a")


def test_interrogate_unknown_model_is_404(api):
    with pytest.raises(RuntimeError) as err:
        api.interrogate(Image.new("RGB", (8, 8)), model="no-such-captioner")
    assert err.value.args[0] == 404 and "Model not found" in err.value.args[1]
