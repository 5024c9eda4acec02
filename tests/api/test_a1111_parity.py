"""A1111 parity (issue 16, part A) over raw HTTP as clients send it, against a fake engine: untyped JSON bodies, missing
LoRAs and face restoration reported, extras, the `infotext` request field, interrogate and unknown routes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.registry import Registry
from server.api.a1111.extras import plaintext_to_html
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import A1111_ERROR_KEYS, GW, SD, client_with, info_of

SMALL = {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64}


def png(size=(40, 24), color=(200, 10, 10), mode="RGB", text: str | None = None) -> str:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def image_of(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


# 1. JSON without Content-Type ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [SD, GW])
def test_json_body_without_content_type_is_read_as_json(client: TestClient, engine: FakeEngine, prefix: str):
    body = json.dumps({**SMALL, "seed": 5}).encode()
    r = client.post(f"{prefix}/txt2img", content=body)  # raw bytes: httpx sends no Content-Type
    assert "content-type" not in r.request.headers
    info = info_of(r)
    assert info["seed"] == 5 and engine.requests[-1].prompt == "a lighthouse"
    # options too (the integration that sends no types sets them this way)
    r = client.post(f"{SD}/options", content=json.dumps({"jpeg_quality": 55}).encode(), headers={"Content-Type": ""})
    assert r.status_code == 200, r.text
    assert client.get(f"{SD}/options").json()["jpeg_quality"] == 55


def test_untyped_body_from_a_foreign_origin_is_refused(engine: FakeEngine, a1111_registry: Registry):
    body = json.dumps(SMALL).encode()
    with client_with(engine, a1111_registry) as c:  # no CORS configured: no origin is allowed
        r = c.post(f"{SD}/txt2img", content=body, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and A1111_ERROR_KEYS <= set(r.json())
        assert "Content-Type" in r.json()["detail"] and "evil.example" in r.json()["detail"]
        assert not engine.requests
        # With its type the browser would have needed a preflight; typed JSON is the route's business as before.
        assert c.post(f"{SD}/txt2img", json=SMALL, headers={"Origin": "https://evil.example"}).status_code == 200
    with client_with(engine, a1111_registry, cors_allow_origins=["https://app.example"],
                     cors_allow_origin_regex=r"https://.*\.trusted\.example") as c:  # fmt: skip
        for origin in ("https://app.example", "https://ui.trusted.example"):
            r = c.post(f"{SD}/txt2img", content=body, headers={"Origin": origin})
            assert r.status_code == 200, (origin, r.text)
            assert r.headers["access-control-allow-origin"] == origin
        r = c.post(f"{SD}/txt2img", content=body, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403


# 2 and 6. Missing LoRAs and face restoration: generated, and said -----------------------------------------------------


def test_missing_lora_generates_with_a_warning(
    engine: FakeEngine, a1111_registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    with client_with(engine, a1111_registry, checkpoints_dir=tmp_path / "models") as c:
        with caplog.at_level("WARNING", logger="easel.a1111"):
            r = c.post(f"{SD}/txt2img", json={**SMALL, "prompt": "a cat <lora:nope:0.8> <lora:gone>"})
        info = info_of(r)
    assert info["extra_generation_params"]["Lora not found"] == "nope, gone"
    assert 'Lora not found: "nope, gone"' in info["infotexts"][0]
    assert "Lora not found: nope, gone" in caplog.text
    req = engine.requests[-1]
    assert req.skip_missing_loras and "<lora:nope:0.8>" in req.prompt  # the engine leaves it out (tests/unit)


def test_restore_faces_without_a_model_succeeds_and_says_so(client: TestClient):
    info = info_of(client.post(f"{SD}/txt2img", json={**SMALL, "restore_faces": True}))
    assert info["restore_faces"] is False  # what ran
    assert info["extra_generation_params"]["Face restoration not applied"] == "no face-restoration model is installed"
    assert "Face restoration not applied: no face-restoration model is installed" in info["infotexts"][0]
    # the face_restoration option asks for it too; restore_faces: false wins over it
    client.post(f"{SD}/options", json={"face_restoration": True})
    assert "Face restoration not applied" in info_of(client.post(f"{SD}/txt2img", json=SMALL))["infotexts"][0]
    plain = info_of(client.post(f"{SD}/txt2img", json={**SMALL, "restore_faces": False}))
    assert "Face restoration" not in plain["infotexts"][0] and not plain["extra_generation_params"]


# 3. Extras ------------------------------------------------------------------------------------------------------------


def test_extra_single_image_upscales_by_factor(client: TestClient):
    source = "data:image/png;base64," + png((40, 24), text="a cat\nSteps: 3, Sampler: Euler, Seed: 1")
    r = client.post(f"{SD}/extra-single-image", json={"image": source, "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"image", "html_info"}
    img = image_of(body["image"])
    assert img.size == (80, 48) and img.getpixel((10, 10))[:3] == (200, 10, 10)
    assert body["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    assert img.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"
    assert img.info["parameters"].startswith("a cat\n")  # the input's infotext is kept, as A1111 does


def test_extra_sizes_floor_to_8_and_resize_to_with_crop(client: TestClient):
    r = client.post(
        f"{SD}/extra-single-image", json={"image": png((30, 20)), "upscaler_1": "Nearest", "upscaling_resize": 1.5}
    )
    assert image_of(r.json()["image"]).size == (40, 24)  # 45x30 floored to a multiple of 8, as A1111
    to = {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64, "upscaler_1": "Lanczos"}
    r = client.post(f"{SD}/extra-single-image", json={**to, "image": png((40, 20)), "upscaling_crop": True})
    img = image_of(r.json()["image"])
    # scaled by max(64/40, 64/20) = 3.2 to 128x64, then the centre 64x64 cut out
    assert img.size == (64, 64) and img.getextrema() == ((200, 200), (10, 10), (10, 10))
    assert r.json()["html_info"] == (
        "<p>Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: Lanczos</p>"
    )
    r = client.post(f"{SD}/extra-single-image", json={**to, "image": png((40, 20)), "upscaling_crop": False})
    assert image_of(r.json()["image"]).size == (128, 64)  # scale max(64/40, 64/20) = 3.2, no crop


def test_extra_second_upscaler_blends(client: TestClient):
    # A 2x1 checkerboard: Nearest keeps hard edges, Lanczos rings; half of each is neither.
    src = Image.new("L", (8, 8))
    src.putdata([255 * ((x + y) % 2) for y in range(8) for x in range(8)])
    buf = io.BytesIO()
    src.convert("RGB").save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    common = {"image": data, "upscaling_resize": 4}
    results = {}
    blend = {"upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5}
    for name, extra in (
        ("lanczos", {"upscaler_1": "Lanczos"}),
        ("nearest", {"upscaler_1": "Nearest"}),
        ("blend", blend),
    ):
        r = client.post(f"{SD}/extra-single-image", json={**common, **extra})
        assert r.status_code == 200, r.text
        results[name] = (image_of(r.json()["image"]), r.json()["html_info"])
    import numpy as np

    a, b, mix = (np.asarray(results[k][0], dtype=np.float64) for k in ("lanczos", "nearest", "blend"))
    assert np.abs(mix - (a + b) / 2).max() <= 1.0 and np.abs(a - b).max() > 50
    assert "Postprocess upscaler 2: Nearest" in results["blend"][1]


def test_extra_batch_images_and_none_upscaler(client: TestClient):
    items = [{"data": png((16, 16)), "name": "a.png"}, {"data": png((24, 8), color=(0, 0, 255)), "name": "b.png"}]
    r = client.post(
        f"{SD}/extra-batch-images", json={"imageList": items, "upscaler_1": "Lanczos", "upscaling_resize": 3}
    )
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"images", "html_info"}
    assert [image_of(d).size for d in r.json()["images"]] == [(48, 48), (72, 24)]
    # upscaler_1 "None": A1111 leaves the image as it is, whatever upscaler_2 says
    r = client.post(f"{GW}/extra-batch-images", json={"imageList": items[:1], "upscaler_2": "Lanczos",
                                                      "extras_upscaler_2_visibility": 1})  # fmt: skip
    assert [image_of(d).size for d in r.json()["images"]] == [(16, 16)] and r.json()["html_info"] == "<p></p>"
    assert plaintext_to_html("a<b\nc") == "<p>a&lt;b<br>\nc</p>"


def test_extras_refusals_are_a1111_shaped_4xx(engine: FakeEngine, a1111_registry: Registry):
    with client_with(engine, a1111_registry, max_work_pixels=100 * 100, max_images_per_request=2) as c:
        ok = {"image": png((16, 16)), "upscaler_1": "Lanczos"}
        for extra, field in (
            ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
            ({"codeformer_visibility": 1}, "codeformer_visibility"),
            ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
            ({"upscaler_2": "SwinIR_4x", "extras_upscaler_2_visibility": 0.3}, "upscaler_2"),
            ({"upscaling_resize": 9}, "upscaling_resize"),
            ({"upscaling_resize": 8}, "upscaling_resize"),  # 128x128 > max_work_pixels
            ({"resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 10}, "upscaling_resize_w"),
            ({"image": "not an image"}, "image"),
        ):
            r = c.post(f"{SD}/extra-single-image", json={**ok, **extra})
            assert 400 <= r.status_code < 500 and A1111_ERROR_KEYS <= set(r.json()), (extra, r.text)
            assert field in r.json()["errors"] or field in json.dumps(r.json()["detail"]), (extra, r.text)
        assert (
            "no face-restoration model is installed"
            in c.post(f"{SD}/extra-single-image", json={**ok, "gfpgan_visibility": 0.5}).json()["errors"]
        )
        assert c.post(f"{SD}/extra-single-image", json={**ok, "gfpgan_visibility": 0, "codeformer_visibility": 0}
                      ).status_code == 200  # fmt: skip
        many = [{"data": png((8, 8)), "name": f"{i}"} for i in range(3)]
        r = c.post(f"{SD}/extra-batch-images", json={"imageList": many, "upscaler_1": "Lanczos"})
        assert r.status_code == 422 and "imageList" in r.json()["errors"]


# 5. The infotext request field ----------------------------------------------------------------------------------------

INFOTEXT = (
    "a castle, (detailed:1.2)\nNegative prompt: fog, blur\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, "
    "CFG scale: 4.5, Seed: 4242, Size: 96x64, Model hash: abc, Clip skip: 2, Version: v1.10.1"
)


def test_infotext_fills_fields_the_request_did_not_set(client: TestClient, engine: FakeEngine):
    r = client.post(f"{SD}/txt2img", json={"infotext": INFOTEXT, "steps": 2})
    info = info_of(r)
    req = engine.requests[-1]
    assert (req.prompt, req.negative_prompt) == ("a castle, (detailed:1.2)", "fog, blur")
    assert (req.steps, req.sampler, req.schedule, req.guidance, req.seed) == (2, "DPM++ 2M", "Karras", 4.5, 4242)
    assert (req.width, req.height) == (96, 64)
    assert info["seed"] == 4242 and info["cfg_scale"] == 4.5
    params = r.json()["parameters"]
    assert params["prompt"] == "a castle, (detailed:1.2)" and params["steps"] == 2 and params["width"] == 96
    assert params["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    assert client.get(f"{SD}/options").json()["CLIP_stop_at_last_layers"] == 1  # restored afterwards


def test_infotext_hires_and_img2img_fields(client: TestClient, engine: FakeEngine):
    hires = (
        "p\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.4, Hires upscale: 2, "
        "Hires upscaler: Latent"
    )
    params = client.post(f"{SD}/txt2img", json={"infotext": hires}).json()["parameters"]
    assert params["enable_hr"] is True and params["hr_scale"] == 2.0 and params["denoising_strength"] == 0.4
    assert engine.requests[-1].hires is not None
    text = (
        "p\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Denoising strength: 0.3, Mask blur: 2, Masked content: fill"
    )
    r = client.post(
        f"{SD}/img2img", json={"infotext": text, "init_images": [png((64, 64))], "mask": png((64, 64), (255, 255, 255))}
    )
    assert r.status_code == 200, r.text
    req = engine.requests[-1]
    assert (req.strength, req.inpaint.mask_blur, req.inpaint.inpainting_fill) == (0.3, 2, 0)
    bad = client.post(f"{SD}/txt2img", json={"infotext": "p\nSteps: many, Sampler: Euler, Seed: 1"})
    assert bad.status_code == 422 and "infotext" in bad.json()["errors"]


# 7. interrogate and unknown routes ------------------------------------------------------------------------------------


def test_interrogate_answers_as_a1111(client: TestClient):
    r = client.post(f"{SD}/interrogate", json={"image": png((8, 8)), "model": "blip-large"})
    assert r.status_code == 404 and r.json()["detail"] == "Model not found" and A1111_ERROR_KEYS <= set(r.json())
    r = client.post(f"{SD}/interrogate", json={"model": "clip"})
    assert r.status_code == 404 and r.json()["detail"] == "Image not found"
    assert client.post(f"{SD}/interrogate", json={"image": png((8, 8))}).status_code == 501


def test_unknown_route_is_404_with_basic_auth(engine: FakeEngine, a1111_registry: Registry, tmp_path: Path):
    with client_with(engine, a1111_registry, api_auth="ann:pw1", data_dir=tmp_path) as c:
        for method, path in (("GET", f"{SD}/no-such-route"), ("POST", f"{SD}/nope"), ("GET", f"{GW}/missing")):
            r = c.request(method, path)
            assert r.status_code == 404, (path, r.status_code, r.text)
        assert c.get(f"{SD}/sd-models").status_code == 401  # a route that exists still needs credentials
        assert c.post(f"{SD}/sd-models").status_code == 401  # (with a method it does not take, too)


# 4. The whole option set ----------------------------------------------------------------------------------------------


def test_options_serve_a1111s_whole_set_and_store_the_rest(client: TestClient):
    from server.api.a1111.options import CATALOG

    options = client.get(f"{SD}/options").json()
    assert len(options) >= 250 and set(CATALOG) <= set(options)
    assert (options["send_seed"], options["send_size"], options["emphasis"], options["live_previews_image_format"]) == (
        True, True, "Original", "png"
    )  # fmt: skip
    assert options["quicksettings_list"] == ["sd_model_checkpoint"] and options["upscaler_for_img2img"] is None
    assert options["api_enable_requests"] is False  # this server's own value wins over A1111's default
    r = client.post(f"{SD}/options", json={"send_seed": False, "quicksettings_list": ["sd_vae"], "emphasis": "no norm"})
    assert r.status_code == 200, r.text
    options = client.get(f"{SD}/options").json()
    assert (options["send_seed"], options["quicksettings_list"], options["emphasis"]) == (False, ["sd_vae"], "No norm")
    bad = {
        "send_size": "yes",
        "token_merging_ratio": 0.95,
        "hidden_tabs": "txt2img",
        "live_previews_image_format": "gif",
    }
    r = client.post(f"{SD}/options", json=bad)
    assert r.status_code == 422 and {e["loc"][-1] for e in r.json()["detail"]} == set(bad)
    assert client.get(f"{SD}/options").json()["send_size"] is True
