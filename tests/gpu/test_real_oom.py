"""R6 on a real GPU: a request too large for the device's memory fails alone with 503 insufficient_gpu_memory, the
memory is freed, and the next request succeeds on a ready engine. Skipped without CUDA (on CPU the same promise is
proven with injected out-of-memory errors: tests/reliability/test_r6_oom.py).

The process may use only a small share of the card (EngineConfig.cuda_memory_fraction, EASEL_CUDA_MEMORY_FRACTION),
so the out-of-memory arrives within seconds on any card: growing the image until a 141 GB card runs out took over
four minutes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
import torch

from pipelines.engine import Engine, EngineConfig
from pipelines.errors import InsufficientMemory
from pipelines.registry import load_registry
from pipelines.request import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CAP_BYTES = 1.5 * 2**30  # the tiny demo model fits many times over; a 4096x4096 VAE decode does not
# Requests that grow until the capped memory runs out (each runs 1 step of the tiny model: seconds in all).
ATTEMPTS = [(2048, 1), (4096, 1), (4096, 4)]


def test_real_out_of_memory_fails_only_its_request(data_dir: Path, tmp_path: Path) -> None:
    # Compile off: a compile per image size would cost more than the whole test. VAE tiling off: the full-size
    # decode is what runs out of memory (tiled, the tiny model fits in any size).
    yaml = tmp_path / "models.yaml"
    yaml.write_text(
        "models:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"
        "    performance: {compile: 'off', vae_tiling_above_pixels: null}\n"
    )
    fraction = min(0.05, CAP_BYTES / torch.cuda.get_device_properties(0).total_memory)
    capped = "cuda_memory_fraction" in {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(data_dir=data_dir, device="cuda", preload_default=False)
    if capped:
        config = dataclasses.replace(config, cuda_memory_fraction=fraction)
    else:  # an engine without the setting: the same cap, set here (the engine runs in this process)
        torch.cuda.set_per_process_memory_fraction(fraction)
    engine = Engine(load_registry(yaml), config)
    engine.start()
    started = time.monotonic()
    try:
        for side, batch in ATTEMPTS:
            huge = GenerationRequest(
                model="demo-sd15", prompt="x", width=side, height=side, steps=1, seed=1, batch_size=batch
            )
            try:
                asyncio.run(engine.submit(huge).wait(timeout=120))
            except InsufficientMemory:
                break
        else:
            pytest.fail(f"{ATTEMPTS[-1]} ran in {CAP_BYTES / 2**30:.1f} GiB without running out of memory")
        assert time.monotonic() - started < 60, "the out-of-memory should arrive within seconds"
        assert engine.ready and engine.alive
        small = GenerationRequest(model="demo-sd15", prompt="x", width=64, height=64, steps=2, seed=1)
        result = asyncio.run(engine.submit(small).wait(timeout=120))
        assert result.images[0].size == (64, 64)
        assert torch.cuda.memory_allocated() < CAP_BYTES / 2  # what the failed request took was given back
    finally:
        engine.stop()
        torch.cuda.set_per_process_memory_fraction(1.0)  # the rest of the session gets the whole card again
