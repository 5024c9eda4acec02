"""The A1111 wire side of variation seeds, tiling, the refiner and embeddings (fake engine: what reaches the engine,
what the infotext says, what /embeddings lists). The mechanisms are tested on the demo models in
tests/unit/test_a1111_features.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fastapi.testclient import TestClient

from pipelines.errors import InvalidRequest
from pipelines.registry import Registry
from server.app import create_app
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import SD, assert_422_names, info_of, make_settings


def _safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file of float32 zeros with these shapes, written without torch."""
    header, offset, data = {}, 0, b""
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
        data += bytes(n)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_variation_seed_fields_reach_the_engine_and_the_infotext(client: TestClient, engine: FakeEngine) -> None:
    body = {
        "prompt": "a fox",
        "seed": 7,
        "subseed": 40,
        "subseed_strength": 0.25,
        "seed_resize_from_w": 320,
        "seed_resize_from_h": 256,
        "batch_size": 2,
        "steps": 2,
        "tiling": True,
    }
    info = info_of(client.post(f"{SD}/txt2img", json=body))
    req = engine.requests[-1]
    assert (req.subseed, req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h) == (40, 0.25, 320, 256)
    assert req.tiling is True
    assert info["subseed"] == 40 and info["all_subseeds"] == [40, 41] and info["subseed_strength"] == 0.25
    assert "Variation seed: 40, Variation seed strength: 0.25, Seed resize from: 320x256" in info["infotexts"][0]
    assert "Variation seed: 41," in info["infotexts"][1]
    assert "Tiling: True" in info["infotexts"][0]


def test_random_subseed_is_resolved_once_for_engine_and_info(client: TestClient, engine: FakeEngine) -> None:
    info = info_of(client.post(f"{SD}/txt2img", json={"prompt": "a", "steps": 1, "subseed_strength": 0.5}))
    assert engine.requests[-1].subseed == info["subseed"] >= 0


def test_refiner_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": "a", "steps": 2, "refiner_checkpoint": "demo-sd15", "refiner_switch_at": 0.6}
    info = info_of(client.post(f"{SD}/txt2img", json=body))
    req = engine.requests[-1]
    assert (req.refiner, req.refiner_switch_at) == ("demo-sd15", 0.6)
    assert "Refiner: demo-sd15, Refiner switch at: 0.6" in info["infotexts"][0]
    client.post(f"{SD}/txt2img", json={"prompt": "a", "steps": 1, "refiner_checkpoint": "None"})
    assert engine.requests[-1].refiner is None


def test_engine_refusal_of_a_refiner_names_the_field(client: TestClient, engine: FakeEngine) -> None:
    engine.submit_error = InvalidRequest("refiner_checkpoint", "a refiner runs after an SDXL model")
    response = client.post(f"{SD}/txt2img", json={"prompt": "a", "refiner_checkpoint": "demo-sd15"})
    assert_422_names(response, "refiner_checkpoint")


def test_embeddings_route_lists_the_folder(engine: FakeEngine, a1111_registry: Registry, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt" / "embeddings"
    folder.mkdir(parents=True)
    _safetensors(folder / "foxstyle.safetensors", {"emb_params": [3, 768]})
    _safetensors(folder / "xlstyle.safetensors", {"clip_l": [2, 768], "clip_g": [2, 1280]})
    (folder / "broken.safetensors").write_bytes(b"nope")
    (folder / "pickled.pt").write_bytes(b"\x80\x04")
    settings = make_settings(checkpoints_dir=tmp_path / "ckpt")
    with TestClient(create_app(settings, engine=engine, registry=a1111_registry)) as c:
        listed = c.get(f"{SD}/embeddings").json()
    assert listed["loaded"] == {
        "foxstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 3}
    }
    assert listed["skipped"]["xlstyle"]["shape"] == 2048 and listed["skipped"]["xlstyle"]["vectors"] == 2


def test_clip_skip_option_and_override_reach_engine_and_infotext(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": "a fox", "steps": 1}
    info = info_of(client.post(f"{SD}/txt2img", json=body))
    assert engine.requests[-1].clip_skip == 1 and info["clip_skip"] == 1 and "Clip skip" not in info["infotexts"][0]
    override = {**body, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    info = info_of(client.post(f"{SD}/txt2img", json=override))
    assert engine.requests[-1].clip_skip == 2 and info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    assert client.post(f"{SD}/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    client.post(f"{SD}/txt2img", json=body)
    assert engine.requests[-1].clip_skip == 3
    refused = client.post(f"{SD}/options", json={"CLIP_stop_at_last_layers": 40})
    assert refused.status_code == 422 and "CLIP_stop_at_last_layers" in refused.text
