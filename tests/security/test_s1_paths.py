"""S1: no request-supplied filesystem path is ever opened. Models, LoRAs and result files are ids; `../`, absolute
paths and symlinks leading out of the server's folders are refused.

Each test plants a bait: a perfectly valid checkpoint, LoRA or file outside the served folders, which a path that
was followed would reach, and checks it is neither served, listed nor opened.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from pipelines.checkpoints import OUTSIDE_ROOT, scan_checkpoints
from pipelines.lora import LoraManager, LoraNotFound, LoraRegistry
from pipelines.prompts import extract_loras
from pipelines.registry import Registry, load_registry
from pipelines.request import LoraRef
from server.app import create_app
from server.jobs.files import ResultFiles
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine
from tests.unit.test_checkpoints import SD15, write


def lora_file(path: Path) -> Path:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_up.weight": np.zeros((2, 2), dtype=np.float16)}, str(path))
    return path


def path_names(bait: Path) -> list[str]:
    """Every way a client could try to name `bait` (or another file) as a path."""
    return [
        str(bait),
        str(bait.with_suffix("")),
        f"../{bait.parent.name}/{bait.name}",
        f"../../{bait.parent.name}/{bait.stem}",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        f"file://{bait}",
        f"{bait.stem}/../{bait.stem}",
    ]


@pytest.fixture
def models() -> Registry:
    return load_registry(REPO_ROOT / "models.yaml")


@pytest.fixture
def bait(tmp_path: Path) -> Path:
    """A valid SD1.5 checkpoint that no configured folder contains."""
    return write(tmp_path / "outside" / "bait.safetensors", SD15)


def test_a1111_model_names_are_registry_ids_never_paths(models: Registry, bait: Path, tmp_path: Path) -> None:
    engine = FakeEngine(models)
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=engine, registry=models)
    ids_before = set(models.models)
    with TestClient(app) as client:
        for name in path_names(bait):
            r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
            assert r.status_code == 404 and r.json()["detail"].startswith("sd_model_checkpoint"), (name, r.text)

            body = {"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": name}}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 404 and "override_settings.sd_model_checkpoint" in r.text, (name, r.text)

            r = client.post("/v2/automatic1111/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "model": name})
            assert r.status_code == 404 and "model" in r.json()["detail"], (name, r.text)
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models.get(models.default_model).title
    assert engine.loaded == [] and engine.requests == []  # nothing was loaded or run
    assert set(models.models) == ids_before


def test_lora_names_never_reach_the_filesystem(tmp_path: Path) -> None:
    """`<lora:../../x:1>` and friends: the name is looked up among the scanned files, never joined to a path."""
    root = tmp_path / "Lora"
    lora_file(root / "style.safetensors")
    bait = lora_file(tmp_path / "outside" / "bait.safetensors")
    registry = LoraRegistry(root)

    class Pipe:  # stands in for a diffusers pipeline: records every LoRA load
        def __init__(self) -> None:
            self.loads: list[str] = []

        def load_lora_weights(self, path: str, adapter_name: str) -> None:
            self.loads.append(path)

    pipe = Pipe()
    manager = LoraManager(pipe, registry)  # type: ignore[arg-type]
    for name in path_names(bait):
        _, tagged = extract_loras(f"a cat <lora:{name}:0.8>")  # as a prompt tag (a `:` splits the name there)
        for ref in [*tagged, LoraRef(name)]:  # and as a structured LoRA (e.g. a dialect's `loras` field)
            assert registry.get(ref.name) is None, ref.name
            with pytest.raises(LoraNotFound):
                manager.activate([ref])
    assert pipe.loads == []
    assert [info.name for info in registry.infos()] == ["style"]


def test_symlinks_out_of_the_lora_folder_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "Lora"
    lora_file(root / "style.safetensors")
    outside = tmp_path / "elsewhere"
    lora_file(outside / "escaped_file.safetensors")
    lora_file(outside / "deep" / "escaped_in_folder.safetensors")
    (root / "escaped_file.safetensors").symlink_to(outside / "escaped_file.safetensors")
    (root / "linked_folder").symlink_to(outside / "deep", target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "alias.safetensors").symlink_to(root / "style.safetensors")  # inside: still served

    registry = LoraRegistry(root)
    assert sorted(info.name for info in registry.infos()) == ["alias", "style"]
    assert registry.get("escaped_file") is None and registry.get("escaped_in_folder") is None


def test_checkpoint_scan_does_not_follow_symlinks_out_of_its_folder(
    models: Registry, bait: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "models"
    sd = checkpoints / "Stable-diffusion"
    write(sd / "inside.safetensors", SD15)
    (sd / "escape.safetensors").symlink_to(bait)
    (sd / "linked").symlink_to(bait.parent, target_is_directory=True)

    result = scan_checkpoints(sd)
    assert [s.checkpoint_name for s in result.specs] == ["inside.safetensors"]
    assert [(s.path.name, s.reason) for s in result.skipped] == [("escape.safetensors", OUTSIDE_ROOT)]

    settings = Settings(checkpoints_dir=checkpoints, data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine=FakeEngine(models), registry=models)) as client:
        served = client.get("/sdapi/v1/sd-models").json()
        assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert served == client.get("/sdapi/v1/sd-models").json()
    names = {m["model_name"] for m in served}
    assert "inside" in names and "escape" not in names and "linked_bait" not in names
    assert not any(str(bait) in m["filename"] for m in served)


def test_result_urls_are_tokens_not_paths(models: Registry, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(Settings(data_dir=data), engine=FakeEngine(models), registry=models)) as client:
        r = client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64"})
        assert r.status_code == 200, r.text
        url = r.json()["urls"][0]
        token_file = url.rsplit("/", 1)[1]
        token = token_file.rsplit(".", 1)[0]
        assert client.get(f"/v2/results/{token_file}").status_code == 200

        stored = next((data / "results").glob(f"*/{token}.png"))
        attempts = [
            f"/v2/results/{stored.parent.name}%2F{token_file}",  # the relative path on disk
            f"/v2/results/%2e%2e%2f%2e%2e%2f{token_file}",
            "/v2/results/..%2F..%2Feasel.db",
            "/v2/results/%2e%2e%2feasel.db",
            "/v2/results/..%5C..%5Ceasel.db",
            f"/v2/results/{token}.jpg",  # another extension
            f"/v2/results/{token}",
            f"/v2/results/{token}.png%00.db",
            "/v2/results/%2Fetc%2Fpasswd",
            "/v2/results/easel.db",
        ]
        for path in attempts:
            r = client.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert not r.content.startswith(b"\x89PNG") and b"SQLite" not in r.content, path


def test_result_file_store_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "results"
    files = ResultFiles(root)
    written = files.write(b"\x89PNG fake", "image/png")
    assert files.read(written.path) == b"\x89PNG fake"

    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (root / "ab").mkdir(parents=True, exist_ok=True)
    (root / "ab" / "link.png").symlink_to(secret)
    for relative in ("../secret.txt", str(secret), "ab/../../secret.txt", "ab/link.png"):
        with pytest.raises(ValueError, match="escapes"):
            files.resolve(relative)
        assert files.read(relative) is None
    assert files.remove(["../secret.txt", "ab/link.png"]) == 0
    assert secret.read_text() == "do not serve"


def test_models_yaml_and_folders_are_configuration_not_request_input(
    models: Registry, bait: Path, tmp_path: Path
) -> None:
    """Options that name folders in A1111 (ckpt_dir, outdir_*) are stored as opaque values and change nothing: the
    served models and the files read stay those of the server's own configuration."""
    models_yaml = REPO_ROOT / "models.yaml"
    digest = hashlib.sha256(models_yaml.read_bytes()).hexdigest()
    settings = Settings(checkpoints_dir=tmp_path / "empty", data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine=FakeEngine(models), registry=models)) as client:
        before = client.get("/sdapi/v1/sd-models").json()
        folder = str(bait.parent)
        options = {
            "ckpt_dir": folder,
            "lora_dir": folder,
            "outdir_samples": folder,
            "outdir_txt2img_samples": folder,
            "models": str(bait),
        }
        assert client.post("/sdapi/v1/options", json=options).status_code == 200
        assert client.post("/sdapi/v1/refresh-checkpoints", json={"ckpt_dir": folder}).status_code == 200
        assert client.post("/sdapi/v1/refresh-loras", json={"lora_dir": folder}).status_code == 200
        assert client.get("/sdapi/v1/sd-models").json() == before
        assert client.get("/sdapi/v1/loras").json() == []
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 200
    assert hashlib.sha256(models_yaml.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in bait.parent.iterdir()) == ["bait.safetensors"]  # nothing was written next to it
