"""S2: weights load from safetensors only. Pickle files (.ckpt/.pt/.pth/.bin/.pkl), which run code when unpickled,
are refused unless `allow_pickle` is set, and the code base never unpickles anything itself.

The pickle files planted here are real exploits: unpickling one creates a marker file. Every test ends by checking the
marker does not exist.
"""

from __future__ import annotations

import ast
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.checkpoints import PICKLE_REFUSAL, PICKLE_SUFFIXES, scan_checkpoints
from pipelines.lora import LoraRegistry
from pipelines.registry import ModelSpec, Registry, load_registry
from server.app import create_app
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine
from tests.unit.test_checkpoints import SD15, write

SOURCE_DIRS = ("server", "pipelines", "scripts")


class _Exploit:
    """Unpickling this opens (creates) `marker` for writing: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def exploit_bytes(marker: Path) -> bytes:
    return pickle.dumps(_Exploit(marker))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle file was unpickled"


# The source tree -----------------------------------------------------------------------------------------------------


def _is_true(keywords: dict[str, ast.expr], key: str) -> bool:
    value = keywords.get(key)
    return isinstance(value, ast.Constant) and value.value is True


def unsafe_calls(source: str) -> list[str]:
    """Calls that can unpickle or run model-supplied code: torch.load without weights_only=True, pickle/dill/joblib
    loads, numpy loads with allow_pickle=True, yaml.load/unsafe_load, trust_remote_code=True, custom_pipeline."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name.endswith(("torch.load", "torch.serialization.load")) and not _is_true(keywords, "weights_only"):
            found.append(f"line {node.lineno}: {name} without weights_only=True")
        if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and name.endswith(
            ("load", "loads", "Unpickler")
        ):
            found.append(f"line {node.lineno}: {name}")
        if name.endswith(("np.load", "numpy.load")) and _is_true(keywords, "allow_pickle"):
            found.append(f"line {node.lineno}: {name} with allow_pickle=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"line {node.lineno}: {name}")
        if _is_true(keywords, "trust_remote_code") or "custom_pipeline" in keywords:
            found.append(f"line {node.lineno}: {name} runs code shipped with a model")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = (
        "import torch, pickle, yaml, numpy as np\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "pickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\n"
        "yaml.load(s)\n"
        "Pipe.from_pretrained(p, trust_remote_code=True)\n"
        "Pipe.from_pretrained(p, custom_pipeline='x')\n"
    )
    assert len(unsafe_calls(bad)) == 7
    assert unsafe_calls("torch.load(p, weights_only=True)\nyaml.safe_load(s)\nnp.load(p)\n") == []


def test_no_unsafe_deserialisation_anywhere_in_the_code() -> None:
    offenders = {}
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            found = unsafe_calls(path.read_text())
            if found:
                offenders[str(path.relative_to(REPO_ROOT))] = found
    assert offenders == {}


# Model folders and the checkpoints folder ----------------------------------------------------------------------------


def pickled_diffusers_folder(root: Path, marker: Path) -> Path:
    """A diffusers layout whose UNet weights exist only as a pickle (`diffusion_pytorch_model.bin`)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["x", "y"]}))
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(exploit_bytes(marker))
    return root


def test_a_diffusers_folder_with_only_pickle_weights_is_refused_naming_the_setting(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from pipelines.engine import Engine, EngineConfig
    from pipelines.errors import ModelLoadError

    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a refused folder")

    monkeypatch.setattr(torch, "load", no_torch_load)
    folder = pickled_diffusers_folder(tmp_path / "pickled", marker)
    registry = Registry([ModelSpec(id="pickled", family="sd15", source=str(folder))], default_model="pickled")
    engine = Engine(registry, EngineConfig(data_dir=tmp_path / "data", device="cpu", preload_default=False))
    engine.start()
    try:
        app = create_app(Settings(data_dir=tmp_path / "data"), engine=engine, registry=registry)
        with TestClient(app) as client:
            r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "pickled"})
            assert r.status_code == 500
            message = r.json()["detail"]
            assert "pickle" in message and "allow_pickle" in message and "diffusion_pytorch_model.bin" in message
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
            assert r.status_code == 500 and "allow_pickle" in r.text
        with pytest.raises(ModelLoadError, match="allow_pickle"):
            engine._load_model(registry.get("pickled"))
    finally:
        engine.stop()


def test_pickle_checkpoints_are_not_listed_or_served(tmp_path: Path, marker: Path) -> None:
    checkpoints = tmp_path / "models"
    sd = checkpoints / "Stable-diffusion"
    write(sd / "fine.safetensors", SD15)
    for suffix in PICKLE_SUFFIXES:
        (sd / f"evil{suffix}").parent.mkdir(parents=True, exist_ok=True)
        (sd / f"evil{suffix}").write_bytes(exploit_bytes(marker))
    lora = checkpoints / "Lora"
    lora.mkdir()
    (lora / "evil.pt").write_bytes(exploit_bytes(marker))
    (lora / "evil.ckpt").write_bytes(exploit_bytes(marker))

    result = scan_checkpoints(sd)
    assert [s.checkpoint_name for s in result.specs] == ["fine.safetensors"]
    assert {s.path.name: s.reason for s in result.skipped} == {f"evil{x}": PICKLE_REFUSAL for x in PICKLE_SUFFIXES}
    assert LoraRegistry(lora).list() == []

    registry = load_registry(REPO_ROOT / "models.yaml")
    settings = Settings(checkpoints_dir=checkpoints, data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine=FakeEngine(registry), registry=registry)) as client:
        names = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
        assert "fine" in names and not any(n.startswith("evil") for n in names)
        assert client.get("/sdapi/v1/loras").json() == []
        for suffix in PICKLE_SUFFIXES:
            r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"evil{suffix}"})
            assert r.status_code == 404, r.text


def test_allow_pickle_is_off_by_default() -> None:
    assert Settings().allow_pickle is False
    assert ModelSpec(id="m", family="sd15", source="/x").allow_pickle is False
