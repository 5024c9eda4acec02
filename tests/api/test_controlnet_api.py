"""The A1111 ControlNet extension's wire side (fake engine): /controlnet/version, model_list and settings as the
extension answers them, units parsed with its defaults and older spellings, detected maps appended to the images,
and bad unit fields refused with a 422 naming the field. One test runs the real engine on the demo model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from pipelines import controlnet_models
from pipelines.control_units import ControlMode
from pipelines.controlnet_preprocessors import PreprocessorParams, resolve_params
from pipelines.registry import Registry, load_registry
from server.app import create_app
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import A1111_ERROR_KEYS, GW, SD, info_of, make_settings
from tests.image_helpers import b64_png, decode_b64, pixels

DEMO = controlnet_models.demo_entry("sd15").title
IP_DEMO = controlnet_models.demo_ip_adapter_entry("sd15").title
UNIT = "alwayson_scripts.controlnet.args"


def square(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="white")
    return image


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "ControlNet"
    folder.mkdir(parents=True)
    (folder / "control_v11p_sd15_canny.safetensors").write_bytes(bytes(range(256)) * 4608)
    return folder.parent


@pytest.fixture
def client(engine: FakeEngine, a1111_registry: Registry, models_dir: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(checkpoints_dir=models_dir), engine=engine, registry=a1111_registry)
    with TestClient(app) as c:
        yield c


def txt2img(client: TestClient, *units: dict, prefix: str = SD, **fields):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **fields}
    body["alwayson_scripts"] = {"controlnet": {"args": list(units)}}
    return client.post(f"{prefix}/txt2img", json=body)


def assert_unit_422(response, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert A1111_ERROR_KEYS <= set(body)
    locs = [d["loc"] for d in body["detail"]]
    assert ["body", *(int(p) if p.isdigit() else p for p in field.split("."))] in locs, locs
    assert field in body["errors"]


# Routes --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/controlnet", "/v2/automatic1111/controlnet"])
def test_version_model_list_and_settings_shapes(client: TestClient, models_dir: Path, prefix: str) -> None:
    assert client.get(f"{prefix}/version").json() == {"version": 3}
    data = (models_dir / "ControlNet" / "control_v11p_sd15_canny.safetensors").read_bytes()
    short = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    flux = controlnet_models.demo_entry("flux").title  # the registry's demo-flux has one too
    expected = [DEMO, flux, IP_DEMO, f"control_v11p_sd15_canny [{short}]"]
    assert client.get(f"{prefix}/model_list").json() == {"model_list": expected}
    assert client.get(f"{prefix}/settings").json() == {"control_net_unit_count": 3}


def test_model_list_update_rescans_the_folder(client: TestClient, models_dir: Path) -> None:
    assert len(client.get("/controlnet/model_list").json()["model_list"]) == 4
    (models_dir / "ControlNet" / "control_v11f1p_sd15_depth.safetensors").write_bytes(b"weights")
    assert len(client.get("/controlnet/model_list?update=false").json()["model_list"]) == 4  # the cached listing
    assert len(client.get("/controlnet/model_list?update=true").json()["model_list"]) == 5


def test_settings_follow_the_unit_count_option(client: TestClient) -> None:
    assert client.post(f"{SD}/options", json={"control_net_unit_count": 5}).status_code == 200
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 5}


# Units ---------------------------------------------------------------------------------------------------------------


def test_unit_defaults_and_detected_map_appended(client: TestClient, engine: FakeEngine) -> None:
    response = txt2img(client, {"enabled": True, "model": DEMO, "image": b64_png(square(128))})
    body = response.json()
    assert response.status_code == 200, response.text
    (unit,) = engine.requests[-1].control_units
    assert (unit.model, unit.source, unit.module, unit.weight) == (DEMO, "demo:sd15", "none", 1.0)
    assert (unit.guidance_start, unit.guidance_end, unit.control_mode) == (0.0, 1.0, ControlMode.BALANCED)
    # One picture, then the detected map ("none": the input, cropped and resized to the output).
    assert len(body["images"]) == 2
    detected = decode_b64(body["images"][1])
    assert detected.size == (64, 64)
    assert detected.getpixel((32, 32)) == (255, 255, 255) and detected.getpixel((4, 4)) == (0, 0, 0)
    info = info_of(response)
    assert len(info["infotexts"]) == 1
    p = resolve_params("none", PreprocessorParams(-1, -1, -1))  # written bound-checked, as the extension does
    expected = (
        f'ControlNet 0: "Module: none, Model: {DEMO}, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: '
        f"{p.resolution}, Threshold A: {p.a}, Threshold B: {p.b}, Guidance Start: 0.0, Guidance End: 1.0, "
        'Pixel Perfect: False, Control Mode: Balanced"'
    )
    assert expected in info["infotexts"][0]


def test_disabled_units_are_skipped_as_the_extension_does(client: TestClient, engine: FakeEngine) -> None:
    # `enabled` defaults to false in the extension; the UI's positional leftovers (non-dicts) are ignored too.
    response = txt2img(client, {"model": DEMO, "image": b64_png(square())}, True, None)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert engine.requests[-1].control_units == []


def test_older_spellings_and_int_modes(client: TestClient, engine: FakeEngine) -> None:
    unit = {
        "enabled": True,
        "model": "control_demo-sd15",  # the name without hash, as the extension resolves it
        "input_image": b64_png(square()),
        "guidance": 0.5,
        "lowvram": True,
        "control_mode": 2,
        "resize_mode": "Envelope (Outer Fit)",
        "weight": 0.4,
    }
    second = {"enabled": True, "model": DEMO, "image": b64_png(square()), "control_mode": "My prompt is more important"}
    assert txt2img(client, unit, second, prefix=GW).status_code == 200
    first, other = engine.requests[-1].control_units
    assert (first.guidance_end, first.control_mode, first.weight) == (0.5, ControlMode.CONTROL, 0.4)
    assert other.control_mode == ControlMode.PROMPT


def test_detected_maps_can_be_left_out(client: TestClient) -> None:
    unit = {"enabled": True, "model": DEMO, "image": b64_png(square())}
    response = txt2img(client, unit, {**unit, "save_detected_map": False})
    assert len(response.json()["images"]) == 2  # one picture, one map
    overridden = txt2img(client, unit, override_settings={"control_net_no_detectmap": True})
    assert len(overridden.json()["images"]) == 1
    assert client.post(f"{SD}/options", json={"control_net_no_detectmap": True}).status_code == 200
    assert len(txt2img(client, unit).json()["images"]) == 1


def test_img2img_unit_without_image_uses_the_init_image(client: TestClient, engine: FakeEngine) -> None:
    init = Image.new("RGB", (64, 64), (200, 10, 10))
    body = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "init_images": [b64_png(init)],
        "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "model": DEMO}]}},
    }
    response = client.post(f"{SD}/img2img", json=body)
    assert response.status_code == 200, response.text
    assert engine.requests[-1].control_units[0].image.getpixel((5, 5)) == (200, 10, 10)


@pytest.mark.parametrize(
    ("unit", "field"),
    [
        ({"model": "control_v11p_sd15_openpose [deadbeef]"}, f"{UNIT}.0.model"),
        ({"model": "None"}, f"{UNIT}.0.model"),
        ({"image": "not base64 at all!"}, f"{UNIT}.0.image"),
        ({"image": None}, f"{UNIT}.0.image"),  # txt2img has no init image to fall back on
        ({"weight": 3}, f"{UNIT}.0.weight"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, f"{UNIT}.0.guidance_start"),
        ({"control_mode": "Prompt first"}, f"{UNIT}.0.control_mode"),
        ({"control_mode": 7}, f"{UNIT}.0.control_mode"),
        ({"resize_mode": "Stretch"}, f"{UNIT}.0.resize_mode"),
        ({"hr_option": "Sometimes"}, f"{UNIT}.0.hr_option"),
        ({"module": "no_such_preprocessor"}, f"{UNIT}.0.module"),
        ({"model": "ip-adapter_sd15 [12345678]", "module": "ip-adapter_clip_sd15"}, f"{UNIT}.0.model"),
        ({"input_image": "x", "image": "y"}, f"{UNIT}.0.input_image"),
    ],
)
def test_bad_unit_fields_are_422_naming_the_field(client: TestClient, unit: dict, field: str) -> None:
    base = {"enabled": True, "model": DEMO, "image": b64_png(square())}
    assert_unit_422(txt2img(client, {**base, **unit}), field)


def test_args_must_be_a_list(client: TestClient) -> None:
    body = {"prompt": "a", "steps": 1, "alwayson_scripts": {"controlnet": {"args": {"enabled": True}}}}
    assert_unit_422(client.post(f"{SD}/txt2img", json=body), UNIT)


# IP-Adapter units ----------------------------------------------------------------------------------------------------


def test_ip_adapter_unit_reaches_the_engine_without_a_detected_map(client: TestClient, engine: FakeEngine) -> None:
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": IP_DEMO, "image": b64_png(square(100))}
    response = txt2img(client, unit, {"enabled": True, "model": DEMO, "image": b64_png(square())})
    assert response.status_code == 200, response.text
    ip, control = engine.requests[-1].control_units
    assert (ip.source, ip.image_encoder, ip.image.size) == ("demo-ip:sd15", "demo-ip:sd15", (100, 100))
    assert control.image_encoder is None
    assert len(response.json()["images"]) == 2  # the picture and the ControlNet unit's map only


def test_ip_adapter_file_needs_its_local_image_encoder(client: TestClient, engine: FakeEngine, models_dir: Path):
    (models_dir / "ControlNet" / "ip-adapter_sd15.safetensors").write_bytes(b"weights")
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": b64_png(square())}
    refused = txt2img(client, unit)
    assert_unit_422(refused, f"{UNIT}.0.module")
    assert "clip_vision/clip_h" in refused.json()["errors"]
    encoder = models_dir / "clip_vision" / "clip_h"
    encoder.mkdir(parents=True)
    (encoder / "config.json").write_text("{}")
    assert txt2img(client, unit).status_code == 200
    assert engine.requests[-1].control_units[0].image_encoder == str(encoder)


@pytest.mark.parametrize(
    ("unit", "field"),
    [
        ({"module": "none", "model": IP_DEMO}, f"{UNIT}.0.module"),  # an IP-Adapter needs an ip-adapter module
        ({"module": "ip-adapter_face_id_plus", "model": IP_DEMO}, f"{UNIT}.0.model"),  # FaceID: insightface
        ({"module": "ip-adapter_clip_sd15", "model": DEMO}, f"{UNIT}.0.model"),  # a ControlNet is no IP-Adapter
    ],
)
def test_ip_adapter_unit_problems(client: TestClient, unit: dict, field: str) -> None:
    assert_unit_422(txt2img(client, {"enabled": True, "image": b64_png(square()), **unit}), field)


# Real engine ---------------------------------------------------------------------------------------------------------


def test_real_engine_control_changes_the_picture(data_dir: Path, tmp_path: Path) -> None:
    yaml = tmp_path / "models.yaml"
    yaml.write_text("default_model: demo-sd15\nmodels:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n")
    from pipelines.engine import Engine, EngineConfig  # torch: only this test needs it

    registry = load_registry(yaml)
    real = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False))
    real.start()
    try:
        with TestClient(create_app(make_settings(data_dir=data_dir), engine=real, registry=registry)) as client:
            plain = txt2img(client, seed=5)
            unit = {"enabled": True, "model": DEMO, "image": b64_png(square())}
            controlled = txt2img(client, unit, seed=5)
            zero = txt2img(client, {**unit, "weight": 0}, seed=5)
    finally:
        real.stop()
    assert plain.status_code == controlled.status_code == zero.status_code == 200, controlled.text
    pictures = [
        np.asarray(decode_b64(r.json()["images"][0]).convert("RGB"), dtype=np.int16) for r in (plain, controlled)
    ]
    assert np.abs(pictures[0] - pictures[1]).mean() > 1
    assert np.array_equal(pixels(decode_b64(zero.json()["images"][0])), pictures[0])
    assert len(controlled.json()["images"]) == 2


@pytest.mark.parametrize(
    "args",
    [
        "not a dict",
        [{"enabled": True, "model": DEMO, "image": {"image": 5}}],
        [{"enabled": True, "model": DEMO, "image": [1, 2, 3]}],
        [{"enabled": True, "model": {"a": 1}, "image": "x"}],
        [{"enabled": True, "model": DEMO, "image": [{"image": "\ud800"}], "weight": "heavy"}],
        [{"enabled": True, "model": DEMO, "mask": 7, "image": "aGk="}],
        [{"enabled": True, "model": DEMO, "resize_mode": 10**30, "control_mode": [1], "hr_option": {"x": 1}}],
        [{"enabled": True, "model": DEMO, "processor_res": 10**12, "pixel_perfect": True}],
    ],
)
def test_hostile_units_get_a_4xx_never_a_5xx(client: TestClient, args) -> None:
    body = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": args}}}
    raw = json.dumps(body)  # ASCII escapes: a lone surrogate travels as JSON sends it, "\\ud800"
    response = client.post(f"{SD}/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
