"""Real-size single-file loading: a full-size random-weight SD1.5 (and SDXL) written in the original A1111/ldm
layout, loaded offline with `from_single_file` and a local config folder, then run on the GPU. Skipped without
CUDA (the tiny-model variants of these checks run everywhere: tests/unit/test_single_file.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipelines.engine import Engine, EngineConfig
from pipelines.registry import load_registry
from pipelines.request import GenerationRequest
from server.settings import REPO_ROOT
from tests.unit.test_single_file import write_sd_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family, size", [("sd15", 512), ("sdxl", 1024)])
def test_full_size_single_file_loads_offline_and_generates(tmp_path: Path, family: str, size: int):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from bench_gpu import FULL, build_pipeline  # the published configurations, random weights

    config = tmp_path / "config"
    pipe = build_pipeline(family, FULL[family], "cuda", torch.float16)
    pipe.to("cpu").save_pretrained(config, safe_serialization=True)
    del pipe
    checkpoint = write_sd_checkpoint(config, tmp_path / f"full-{family}.safetensors")
    assert checkpoint.stat().st_size > (1.5e9 if family == "sd15" else 5e9)  # fp16 weights of the real model

    yaml = tmp_path / "models.yaml"
    yaml.write_text(f"models:\n  full:\n    family: {family}\n    source: {checkpoint}\n    config: {config}\n")
    engine = Engine(load_registry(yaml), EngineConfig(data_dir=tmp_path / "data", device="cuda"))
    engine.start()
    try:
        req = GenerationRequest(model="full", prompt="a lighthouse", width=size, height=size, steps=4, seed=1)
        result = engine.submit(req).wait_sync(600)
        assert result.images[0].size == (size, size)
        assert engine.cache.get(engine.registry.get("full")).dtype == torch.float16
    finally:
        engine.stop()
