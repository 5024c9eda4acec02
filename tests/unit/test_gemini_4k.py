"""Gemini `image_size: 4K` on the real demo FLUX pipeline: made at the model's size, upscaled to 4096x4096."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.engine import Engine, EngineConfig
from pipelines.registry import Registry
from server.api.gateway import adapter
from server.api.gateway.schemas import GeminiRequest
from server.settings import Settings


def test_4k_on_the_demo_model(registry: Registry, data_dir: Path) -> None:
    plan = adapter.gemini(GeminiRequest(prompt="a valley", image_size="4K"), adapter.Context(registry, Settings()))
    request = dataclasses.replace(plan.spec.request, steps=1, seed=3)  # the upscale is the costly part
    assert (request.model, request.width, request.height) == ("demo-flux", 512, 512)
    engine = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False))
    engine.start()
    try:
        (made,) = engine.submit(request).wait_sync(120).images
    finally:
        engine.stop()
    assert plan.spec.postprocess is not None
    delivered = plan.spec.postprocess(made)
    assert made.size == (512, 512) and delivered.size == (4096, 4096)
    back = np.asarray(delivered.resize(made.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(back - np.asarray(made, dtype=np.int16)).mean() < 12  # the same picture, 8x larger
    assert "upscaled to 4096x4096" in plan.spec.request_json["made"]
