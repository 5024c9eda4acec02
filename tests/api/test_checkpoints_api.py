"""The A1111 checkpoints folder through the API: scanned at start-up, rescanned by refresh-checkpoints, LoRAs listed."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from pipelines import demo
from pipelines.registry import load_registry
from server.app import create_app
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine
from tests.unit.test_single_file import write_sd_checkpoint


def test_checkpoint_and_lora_folders_are_served(demo_root: Path, tmp_path: Path):
    models = tmp_path / "models"
    (models / "Stable-diffusion" / "sub").mkdir(parents=True)
    (models / "Lora").mkdir()
    write_sd_checkpoint(demo.ensure_demo_model("sd15", demo_root), models / "Stable-diffusion" / "tiny.safetensors")
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, models / "Lora" / "style.safetensors")

    registry = load_registry(REPO_ROOT / "models.yaml")
    settings = Settings(checkpoints_dir=models, data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine=FakeEngine(registry), registry=registry)) as client:
        titles = {m["title"]: m for m in client.get("/sdapi/v1/sd-models").json()}
        tiny = next(m for t, m in titles.items() if t.startswith("tiny.safetensors ["))
        assert tiny["model_name"] == "tiny" and len(tiny["hash"]) == 10
        assert "demo-sd15" in {m["model_name"] for m in titles.values()}  # models.yaml entries stay

        # A new file appears after a rescan; the A1111 title selects it.
        write_sd_checkpoint(
            demo.ensure_demo_model("sd15", demo_root), models / "Stable-diffusion" / "sub" / "other.safetensors"
        )
        assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
        names = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
        assert {"tiny", "sub_other"} <= names
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": tiny["title"]})
        assert r.status_code == 200, r.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == tiny["title"]

        assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["style"]
        save_file({"lora_unet_y.lora_up.weight": torch.zeros(2, 2)}, models / "Lora" / "second.safetensors")
        assert client.post("/sdapi/v1/refresh-loras").json() is None
        assert sorted(lora["name"] for lora in client.get("/sdapi/v1/loras").json()) == ["second", "style"]
