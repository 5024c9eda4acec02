"""Background removal (`background: transparent`): models.yaml's `background_removal:` folder, loaded with
transformers, applied by the engine after the real demo SD pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.demo import build_demo_background_remover
from pipelines.engine import Engine, EngineConfig
from pipelines.errors import InvalidRequest, ModelLoadError
from pipelines.registry import RegistryError, load_registry
from pipelines.request import GenerationRequest


@pytest.fixture(scope="module")
def remover_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_background_remover(tmp_path_factory.mktemp("bg") / "segformer")


def registry_file(folder: Path, extra: str = "") -> Path:
    path = folder / "models.yaml"
    path.write_text("models:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n" + extra)
    return path


def test_models_yaml_background_removal_paths_and_fields(tmp_path: Path) -> None:
    reg = load_registry(registry_file(tmp_path, "background_removal:\n  source: seg\n  background_label: 1\n"))
    assert reg.background_removal is not None
    assert reg.background_removal.source == str(tmp_path / "seg") and reg.background_removal.background_label == 1
    assert load_registry(registry_file(tmp_path)).background_removal is None
    with pytest.raises(RegistryError, match="background_removal.threshold"):
        load_registry(registry_file(tmp_path, "background_removal:\n  source: seg\n  threshold: 3\n"))


def test_engine_gives_the_images_alpha(remover_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    reg = load_registry(registry_file(tmp_path, f"background_removal:\n  source: {remover_dir}\n"))
    engine = Engine(reg, EngineConfig(data_dir=data_dir, preload_default=False))
    engine.start()
    try:
        base = dict(model="demo-sd15", prompt="a cat", width=64, height=48, steps=1, seed=3, batch_size=2)
        opaque = engine.submit(GenerationRequest(**base)).wait_sync(120)
        clear = engine.submit(GenerationRequest(**base, transparent_background=True)).wait_sync(120)
    finally:
        engine.stop()
    for plain, image in zip(opaque.images, clear.images, strict=True):
        assert image.mode == "RGBA" and image.size == (64, 48)
        alpha = np.asarray(image.getchannel("A"))
        assert alpha.min() < 255 and len(np.unique(alpha)) > 8  # a per-pixel mask, not one flat value
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(plain))  # colours untouched


def test_without_a_model_the_engine_refuses_and_a_bad_folder_fails_to_load(data_dir: Path, tmp_path: Path) -> None:
    request = GenerationRequest(
        model="demo-sd15", prompt="x", width=64, height=64, steps=1, transparent_background=True
    )
    bare = Engine(load_registry(registry_file(tmp_path)), EngineConfig(data_dir=data_dir, preload_default=False))
    bare.start()
    try:
        with pytest.raises(InvalidRequest) as refused:
            bare.submit(request)
    finally:
        bare.stop()
    assert refused.value.field == "background" and "background_removal" in refused.value.message
    missing = load_registry(registry_file(tmp_path, f"background_removal:\n  source: {tmp_path / 'none'}\n"))
    engine = Engine(missing, EngineConfig(data_dir=data_dir, preload_default=False))
    assert engine.background_remover is not None
    with pytest.raises(ModelLoadError, match="background_removal"):
        engine.background_remover.alpha([])
