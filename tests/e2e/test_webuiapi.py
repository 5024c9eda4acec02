"""The real `webuiapi` client against a real `easel serve` subprocess with the demo models."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(live_server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=live_server.port, sampler="DPM++ 2M Karras", steps=4)


def test_health_and_docs(live_server):
    assert httpx.get(f"{live_server.url}/livez").status_code == 200
    assert httpx.get(f"{live_server.url}/readyz").status_code == 200
    assert httpx.get(f"{live_server.url}/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in httpx.get(f"{live_server.url}/openapi.json").json()["paths"]


def test_txt2img_dpmpp_2m_karras_reproducible(api):
    r1 = api.txt2img(prompt="a lighthouse", width=128, height=96, steps=4, seed=1234, batch_size=2)
    assert len(r1.images) == 2
    assert all(im.size == (128, 96) for im in r1.images)
    info = r1.info
    assert info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in info["infotexts"][0] or info["extra_generation_params"].get("Schedule type") in (
        None,
        "Karras",
    )
    # image 1 of the batch is the same picture as a single request with seed+1
    r2 = api.txt2img(prompt="a lighthouse", width=128, height=96, steps=4, seed=1235)
    a = np.asarray(r1.images[1], dtype=np.int16)
    b = np.asarray(r2.images[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_png_info_roundtrip(api):
    r = api.txt2img(prompt="a red barn", negative_prompt="fog", width=64, height=64, steps=3, seed=77)
    info = api.png_info(r.image).info
    assert "a red barn" in info and "Negative prompt: fog" in info
    assert "Steps: 3" in info and "Seed: 77" in info and "Size: 64x64" in info


def test_img2img_with_mask_keeps_unmasked_pixels(api):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(mask).rectangle([40, 40, 87, 87], fill="white")
    r = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a window",
        width=128,
        height=128,
        steps=4,
        seed=3,
        denoising_strength=0.9,
        inpainting_fill=1,
        mask_blur=0,
    )
    out = np.asarray(r.image.convert("RGB"), dtype=np.int16)
    src = np.asarray(init, dtype=np.int16)
    assert out.shape == src.shape
    outside = np.ones((128, 128), bool)
    outside[32:96, 32:96] = False
    assert np.abs(out[outside] - src[outside]).max() <= 2  # composited back, as A1111 does
    assert np.abs(out[48:80, 48:80] - src[48:80, 48:80]).mean() > 5  # the masked square was repainted


def test_util_set_model_switches_checkpoint(api):
    api.util_set_model("demo-sdxl")
    assert api.util_get_current_model().startswith("demo-sdxl [")
    r = api.txt2img(prompt="a fox", width=64, height=64, steps=2, seed=1)
    assert r.info["sd_model_name"] == "demo-sdxl"
    api.util_set_model("demo-sd15")
    assert api.util_get_current_model().startswith("demo-sd15 [")


def test_progress_and_interrupt(api):
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0

    result: dict = {}

    def long_job():
        t = time.monotonic()
        result["r"] = api.txt2img(prompt="a long job", width=256, height=256, steps=300, seed=9)
        result["elapsed"] = time.monotonic() - t

    worker = threading.Thread(target=long_job)
    worker.start()
    busy = None
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = api.get_progress()
        step = p["state"]["sampling_step"]
        if p["state"]["job_count"] > 0 and step >= 1 and first is None:
            first = (time.monotonic(), step)
        if first and step >= first[1] + 5:
            busy = p
            break
        time.sleep(0.05)
    assert busy is not None and first is not None, "the job never showed progress"
    seconds_per_step = (time.monotonic() - first[0]) / (busy["state"]["sampling_step"] - first[1])
    assert 0 < busy["progress"] <= 1 and busy["state"]["sampling_steps"] == 300
    assert set(busy["state"]) >= {
        "skipped",
        "interrupted",
        "stopping_generation",
        "job",
        "job_count",
        "job_timestamp",
        "job_no",
        "sampling_step",
        "sampling_steps",
    }
    assert api.interrupt() == {}
    worker.join(120)
    assert not worker.is_alive()
    r = result["r"]
    assert len(r.images) == 1 and r.image.size == (256, 256)  # what was finished is returned
    assert result["elapsed"] < 0.5 * 300 * seconds_per_step  # it stopped early, not after all 300 steps
    p = api.get_progress()
    assert p["state"]["job_count"] == 0


@pytest.mark.parametrize("model", ["demo-flux", "demo-qwen-image", "demo-sdxl"])
def test_every_family_through_the_a1111_routes(live_server, model):
    """FLUX and Qwen-Image selected by title per request; sizes floored to the family's multiple."""
    title = next(
        m["title"] for m in httpx.get(f"{live_server.url}/sdapi/v1/sd-models").json() if m["model_name"] == model
    )
    body = {
        "prompt": "a harbour",
        "width": 72,
        "height": 100,
        "steps": 2,
        "seed": 5,
        "override_settings": {"sd_model_checkpoint": title},
    }
    r = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    multiple = 8 if model == "demo-sdxl" else 16
    expected = (72 // multiple * multiple, 100 // multiple * multiple)
    assert (info["width"], info["height"]) == expected and info["sd_model_name"] == model
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert img.size == expected


def test_bad_input_is_a_4xx_naming_the_field(live_server):
    url = f"{live_server.url}/sdapi/v1"
    cases = [
        ("txt2img", {"steps": -1}, "steps"),
        ("txt2img", {"steps": 10**6}, "steps"),
        ("txt2img", {"width": 0}, "width"),
        ("txt2img", {"width": 100000}, "width"),
        ("img2img", {"init_images": ["not-an-image!!"]}, "init_images"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, "sd_model_checkpoint"),
        ("options", {"sd_model_checkpoint": "nope.safetensors"}, "sd_model_checkpoint"),
    ]
    for route, body, field in cases:
        r = httpx.post(f"{url}/{route}", json={"prompt": "x", **body}, timeout=60)
        assert 400 <= r.status_code < 500, (route, body, r.status_code, r.text)
        err = r.json()
        assert set(err) >= {"error", "detail", "body", "errors"}
        assert field in r.text, (route, body, r.text)


def test_hires_fix_output_size(api):
    r = api.txt2img(
        prompt="a castle",
        width=64,
        height=64,
        steps=3,
        seed=4,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=webuiapi.HiResUpscaler.Latent,
        hr_second_pass_steps=2,
        denoising_strength=0.5,
    )
    assert r.image.size == (128, 128)
    assert r.info["width"] == 64 and "Hires upscale: 2" in r.info["infotexts"][0]
