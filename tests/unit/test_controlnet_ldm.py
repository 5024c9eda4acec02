"""The original (ldm / lllyasviel) single-file ControlNet layout, the files users download
(control_v11p_sd15_canny.safetensors), built offline from the demo SD1.5 ControlNet (tests.controlnet_ldm): listed
with its A1111 name and hash, loaded through the single-file path with its local config to the demo's very weights,
with and without the `control_model.` prefix, and a generation through the A1111 API gives the demo's pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from pipelines import controlnet, controlnet_models, demo
from pipelines.controlnet_file_check import ControlNetFileError
from tests.controlnet_ldm import to_ldm

CANNY = "control_v11p_sd15_canny"  # `control_model.`-prefixed, as the original files
BARE = "control_v11f1p_sd15_depth"  # the same weights without the prefix (extracted files), in a subfolder


@pytest.fixture(scope="module")
def demo_weights(demo_root: Path) -> dict[str, torch.Tensor]:
    return load_file(demo.ensure_demo_controlnet("sd15", demo_root) / controlnet_models.WEIGHTS_FILE)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, demo_weights) -> tuple[Path, Path]:
    """(checkpoints_dir, configs_dir) as a deployment has them: ControlNet/ with the ldm files, and the
    controlnet-sd15 config folder (`easel prefetch-configs`), here the demo's config."""
    root = tmp_path_factory.mktemp("ldm")
    folder = demo.ensure_demo_controlnet("sd15", demo_root)
    layers = json.loads((folder / "config.json").read_text())["layers_per_block"]
    (root / "models" / "ControlNet" / "sub").mkdir(parents=True)
    save_file(to_ldm(demo_weights, layers), root / "models" / "ControlNet" / f"{CANNY}.safetensors")
    save_file(to_ldm(demo_weights, layers, prefix=""), root / "models" / "ControlNet" / "sub" / f"{BARE}.safetensors")
    config = root / "configs" / controlnet.SINGLE_FILE_CONFIGS["sd15"]
    config.mkdir(parents=True)
    (config / "config.json").write_bytes((folder / "config.json").read_bytes())
    return root / "models", root / "configs"


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_the_files_have_the_original_layout(dirs) -> None:
    canny = load_file(dirs[0] / "ControlNet" / f"{CANNY}.safetensors")
    for key in ("input_blocks.0.0.weight", "zero_convs.0.0.weight", "input_hint_block.0.weight",
                "input_hint_block.14.weight", "middle_block_out.0.weight", "time_embed.0.weight",
                "input_blocks.2.0.op.weight", "middle_block.1.proj_in.weight"):  # fmt: skip
        assert f"control_model.{key}" in canny
    bare = load_file(dirs[0] / "ControlNet" / "sub" / f"{BARE}.safetensors")
    assert set(bare) == {k.removeprefix("control_model.") for k in canny}


def test_listed_with_their_a1111_names_and_hashes(dirs) -> None:
    folder = dirs[0] / "ControlNet"
    entries = controlnet_models.scan(folder)
    canny, bare = folder / f"{CANNY}.safetensors", folder / "sub" / f"{BARE}.safetensors"
    assert canny.stat().st_size > 0x110000  # the hash reads real bytes
    assert [(e.title, e.source) for e in entries] == [
        (f"{BARE} [{short_hash(bare)}]", str(bare)),
        (f"{CANNY} [{short_hash(canny)}]", str(canny)),
    ]


@pytest.mark.parametrize("name", [CANNY, f"sub/{BARE}"])
def test_loads_through_the_single_file_path_to_the_demos_weights(dirs, demo_root: Path, demo_weights, name) -> None:
    path = dirs[0] / "ControlNet" / f"{name}.safetensors"
    assert controlnet.single_file_family(path) == "sd15"
    model = controlnet.load_controlnet(str(path), "sd15", torch.float32, demo_root, dirs[1])
    assert controlnet.controlnet_family(model) == "sd15"
    state = model.state_dict()
    assert set(state) == set(demo_weights)
    assert all(torch.equal(state[k], v) for k, v in demo_weights.items())


def test_a_file_that_does_not_fit_says_why(dirs, demo_root: Path, demo_weights, tmp_path: Path) -> None:
    """diffusers alone fails these deep in the load ("argument 'input' must be Tensor, not NoneType")."""
    folder = demo.ensure_demo_controlnet("sd15", demo_root)
    layers = json.loads((folder / "config.json").read_text())["layers_per_block"]
    ldm = to_ldm(demo_weights, layers)
    cases = {
        "truncated": ({k: v for k, v in ldm.items() if ".zero_convs.1." not in k}, dirs[1],
                      r"truncated\.safetensors lacks 2 of the \d+ tensors of an SD1.5 ControlNet \(e\.g\. "
                      r"controlnet_down_blocks\.1\.bias"),
        "not_controlnet": ({"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, dirs[1],
                           r"not_controlnet\.safetensors is not an SD1.5 ControlNet in the ldm or diffusers layout "
                           r"\(keys like first_stage_model\.decoder\.conv_in\.weight\)"),
    }  # fmt: skip
    wider = tmp_path / "configs" / controlnet.SINGLE_FILE_CONFIGS["sd15"]
    wider.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [2 * width for width in config["block_out_channels"]]
    (wider / "config.json").write_text(json.dumps(config))
    cases["other_width"] = (
        ldm,
        tmp_path / "configs",
        r"other_width\.safetensors does not fit the config in .+: \d+ "
        r"tensors of an SD1.5 ControlNet have another shape \(e\.g\. conv_in\.weight",
    )
    for name, (tensors, configs_dir, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(ControlNetFileError, match=message):
            controlnet.load_controlnet(str(path), "sd15", torch.float32, demo_root, configs_dir)


def b64_square() -> str:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="white")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a1111_lists_and_generates_with_it_as_with_the_demo(dirs, data_dir: Path, tmp_path: Path) -> None:
    from pipelines.engine import Engine, EngineConfig
    from pipelines.registry import load_registry
    from server.app import create_app
    from server.settings import Settings

    yaml = tmp_path / "models.yaml"
    yaml.write_text("default_model: demo-sd15\nmodels:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n")
    registry = load_registry(yaml)
    engine = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False, configs_dir=dirs[1]))
    engine.start()
    settings = Settings(data_dir=data_dir, checkpoints_dir=dirs[0], configs_dir=dirs[1])
    canny_title = f"{CANNY} [{short_hash(dirs[0] / 'ControlNet' / f'{CANNY}.safetensors')}]"
    demo_title = controlnet_models.demo_entry("sd15").title
    truncated = dirs[0] / "ControlNet" / "control_truncated.safetensors"
    try:
        with TestClient(create_app(settings, engine=engine, registry=registry)) as client:
            assert canny_title in client.get("/controlnet/model_list").json()["model_list"]
            pictures = []
            for model in (canny_title, demo_title):
                unit = {"enabled": True, "model": model, "image": b64_square()}
                body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5,
                        "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
                response = client.post("/sdapi/v1/txt2img", json=body)
                assert response.status_code == 200, response.text
                image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
                pictures.append(np.asarray(image.convert("RGB")))
            # A truncated file fails as a model load that says what is wrong with the file, not a diffusers TypeError.
            full = load_file(dirs[0] / "ControlNet" / f"{CANNY}.safetensors")
            save_file({k: v for k, v in full.items() if ".zero_convs.1." not in k}, truncated)
            unit = {"enabled": True, "model": "control_truncated", "image": b64_square()}
            body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                    "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 500 and "control_truncated.safetensors lacks 2 of the" in response.text
        loaded = engine.cache.get(registry.get("demo-sd15"))
        assert str(dirs[0] / "ControlNet" / f"{CANNY}.safetensors") in loaded.controlnets  # the file ran, not the demo
    finally:
        engine.stop()
        truncated.unlink(missing_ok=True)  # the listing test expects the module's two files only
    assert np.array_equal(pictures[0], pictures[1])
