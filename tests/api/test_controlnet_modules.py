"""`GET /controlnet/module_list` and `POST /controlnet/detect` over HTTP (the sd-webui-controlnet extension's shapes,
A1111's error shape, the app's auth and size limits). Preprocessor pixels are tested in
tests/unit/test_controlnet_preprocessors.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.registry import Registry, load_registry
from server.app import create_app
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import A1111_ERROR_KEYS, MODELS_YAML, assert_422_names, make_settings
from tests.image_helpers import b64_png, decode_b64
from tests.unit.test_controlnet_preprocessors import SQUARE, square_image, write_tiny_depth_models

CN = "/controlnet"


@pytest.fixture(scope="module")
def a1111_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    path = tmp_path_factory.mktemp("registry") / "models.yaml"
    path.write_text(MODELS_YAML)
    return load_registry(path)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111 models directory with tiny depth annotators (depth_midas, depth_anything) installed."""
    root = tmp_path_factory.mktemp("a1111-models")
    write_tiny_depth_models(root)
    return root


def make_client(registry: Registry, **settings) -> Iterator[TestClient]:
    engine = FakeEngine(registry)
    try:
        with TestClient(create_app(make_settings(**settings), engine=engine, registry=registry)) as client:
            yield client
    finally:
        engine.release()


@pytest.fixture
def client(a1111_registry: Registry) -> Iterator[TestClient]:
    yield from make_client(a1111_registry)


def test_module_list_shape_with_and_without_alias_names(client: TestClient) -> None:
    plain = client.get(f"{CN}/module_list").json()
    assert set(plain) == {"module_list", "module_detail"}
    assert plain["module_list"][0] == "none"
    assert {"canny", "invert", "threshold", "tile_resample", "color", "blur_gaussian"} <= set(plain["module_list"])
    assert plain["module_detail"]["tile_resample"]["sliders"][1] == {
        "name": "Down Sampling Rate",
        "value": 1.0,
        "min": 1.0,
        "max": 8.0,
        "step": 0.01,
    }
    # model-backed modules without their model are not listed; nor are the ones this server cannot run
    assert not {"depth", "depth_anything", "openpose", "reference_only", "hed"} & set(plain["module_list"])
    aliased = client.get(f"{CN}/module_list", params={"alias_names": "true"}).json()
    assert "t2ia_color_grid" in aliased["module_list"] and "color" not in aliased["module_list"]
    assert list(aliased["module_detail"]) == aliased["module_list"]
    assert client.get(f"{CN}/module_list", params={"alias_names": "false"}).json() == plain


def test_detect_canny_answers_the_extensions_shape(client: TestClient) -> None:
    r = client.post(
        f"{CN}/detect",
        json={
            "controlnet_module": "canny",
            "controlnet_input_images": [b64_png(square_image()), b64_png(square_image())],
            "controlnet_processor_res": 128,
            "controlnet_threshold_a": 100,
            "controlnet_threshold_b": 200,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 2
    edges = decode_b64(body["images"][0])
    assert edges.format == "PNG" and edges.size == (128, 128)  # short side at processor_res
    mask = np.asarray(edges.convert("L")) == 255
    left, top, right, bottom = (2 * c for c in SQUARE)
    assert mask[top:bottom, left - 2 : left + 2].any(axis=1).mean() > 0.9  # the left side, at twice the scale
    assert not mask[top + 8 : bottom - 8, left + 8 : right - 8].any()


def test_detect_defaults_and_the_webuiapi_spelling(client: TestClient) -> None:
    # -1 everywhere (the extension's defaults): processor_res 512; `controlnet_images` is what webuiapi sends
    r = client.post(
        f"{CN}/detect", json={"controlnet_module": "threshold", "controlnet_images": [b64_png(square_image())]}
    )
    assert r.status_code == 200, r.text
    out = decode_b64(r.json()["images"][0])
    assert out.size == (512, 512)
    assert set(np.unique(np.asarray(out))) == {0, 255}


def test_detect_by_alias_on_the_gateway_copy(client: TestClient) -> None:
    r = client.post(
        "/v2/automatic1111/controlnet/detect",
        json={
            "controlnet_module": "invert (from white bg & black line)",
            "controlnet_input_images": [b64_png(square_image())],
        },
    )
    assert r.status_code == 200, r.text
    out = np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")).astype(int)
    assert (out == 255 - np.asarray(square_image()).astype(int)).all()


def test_detect_unknown_module_is_a_422_naming_it(client: TestClient) -> None:
    r = client.post(
        f"{CN}/detect", json={"controlnet_module": "sharpen_9000", "controlnet_input_images": [b64_png(square_image())]}
    )
    assert_422_names(r, "controlnet_module")
    assert "sharpen_9000" in r.json()["errors"] and "Module not available" in r.json()["errors"]


def test_detect_model_backed_module_without_its_model_is_refused_by_name(client: TestClient) -> None:
    image = b64_png(square_image())
    r = client.post(f"{CN}/detect", json={"controlnet_module": "depth_midas", "controlnet_input_images": [image]})
    assert_422_names(r, "controlnet_module")
    assert "depth_midas" in r.json()["errors"] and "ControlNet/annotators/depth_midas" in r.json()["errors"]
    r = client.post(f"{CN}/detect", json={"controlnet_module": "ip-adapter_clip_h", "controlnet_input_images": [image]})
    assert_422_names(r, "controlnet_module")
    assert "Module not supported" in r.json()["errors"]


def test_detect_bad_input_is_a_422_in_a1111_shape(client: TestClient) -> None:
    r = client.post(f"{CN}/detect", json={"controlnet_module": "canny", "controlnet_input_images": []})
    assert_422_names(r, "controlnet_input_images")
    assert r.json()["errors"].endswith("No image selected")
    r = client.post(f"{CN}/detect", json={"controlnet_module": "canny", "controlnet_input_images": ["%%% not base64"]})
    assert r.status_code == 422 and A1111_ERROR_KEYS <= set(r.json())
    assert "controlnet_input_images[0]" in r.json()["errors"]
    r = client.post(
        f"{CN}/detect",
        json={
            "controlnet_module": "canny",
            "controlnet_input_images": [b64_png(square_image())],
            "controlnet_processor_res": "big",
        },
    )  # noqa: E501
    assert_422_names(r, "controlnet_processor_res")


def test_detect_respects_the_size_limits(a1111_registry: Registry) -> None:
    wide = b64_png(Image.new("RGB", (512, 8), "white"))
    for client in make_client(a1111_registry, max_work_pixels=512 * 512, max_images_per_request=2):
        # short side 8 -> 512 makes a 32768 x 512 map: refused before it is made
        r = client.post(f"{CN}/detect", json={"controlnet_module": "canny", "controlnet_input_images": [wide]})
        assert_422_names(r, "controlnet_processor_res")
        r = client.post(f"{CN}/detect", json={"controlnet_module": "invert", "controlnet_input_images": [wide] * 3})
        assert_422_names(r, "controlnet_input_images")
    for client in make_client(a1111_registry, max_image_pixels=64 * 64):
        too_many = b64_png(Image.new("RGB", (512, 9), "white"))
        r = client.post(f"{CN}/detect", json={"controlnet_module": "invert", "controlnet_input_images": [too_many]})
        assert r.status_code == 413 and "controlnet_input_images[0]" in r.json()["errors"]
    for client in make_client(a1111_registry, max_body_bytes=4096):
        big = b64_png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
        r = client.post(f"{CN}/detect", json={"controlnet_module": "invert", "controlnet_input_images": [big]})
        assert r.status_code == 413


def test_routes_need_credentials_on_a_locked_server(a1111_registry: Registry, tmp_path: Path) -> None:
    for client in make_client(a1111_registry, data_dir=tmp_path, api_auth="ann:pw1"):
        body = {"controlnet_module": "invert", "controlnet_input_images": [b64_png(square_image())]}
        assert client.get(f"{CN}/module_list").status_code == 401
        assert client.post(f"{CN}/detect", json=body).status_code == 401
        auth = {"Authorization": "Basic " + base64.b64encode(b"ann:pw1").decode()}
        assert client.get(f"{CN}/module_list", headers=auth).status_code == 200
        assert client.post(f"{CN}/detect", json=body, headers=auth).status_code == 200


def test_local_depth_models_are_listed_and_detected(a1111_registry: Registry, models_dir: Path) -> None:
    for client in make_client(a1111_registry, checkpoints_dir=models_dir):
        listed = client.get(f"{CN}/module_list", params={"alias_names": True}).json()
        assert {"depth_midas", "depth_anything"} <= set(listed["module_list"])
        assert "depth_zoe" not in listed["module_list"]
        assert listed["module_detail"]["depth_midas"]["sliders"][0]["name"] == "Resolution"
        image = b64_png(Image.radial_gradient("L").convert("RGB").resize((96, 64)))
        r = client.post(
            f"{CN}/detect",
            json={"controlnet_module": "depth", "controlnet_input_images": [image], "controlnet_processor_res": 64},
        )
        assert r.status_code == 200, r.text
        depth = np.asarray(decode_b64(r.json()["images"][0]).convert("RGB"))
        assert depth.shape == (64, 96, 3)
        assert (depth[:, :, 0] == depth[:, :, 2]).all() and depth.max() > depth.min()
