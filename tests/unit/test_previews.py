"""Live previews (pipelines/previews.py): latents to RGB with a fixed map per latent space, made during real pipeline
calls of every family at the steps asked for, published per job by the engine, and never reading a device value on
the steps without one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.engine import Engine, EngineConfig
from pipelines.families import adapter_for, step_callback
from pipelines.families.base import StepReporter
from pipelines.previews import LATENT_RGB, PreviewMaker, latents_to_rgb
from pipelines.registry import Registry
from pipelines.request import GenerationRequest, Task, evenly, wants_preview
from tests.unit.test_fast_path import DeviceValue

FAMILIES = ["sd15", "sdxl", "flux", "qwen-image"]


def test_preview_schedule() -> None:
    assert [s for s in range(1, 21) if wants_preview(s, 20, 5)] == [5, 10, 15]  # never after the last step
    assert not any(wants_preview(s, 20, 0) for s in range(1, 21))
    assert evenly(28, 2) == 10 and evenly(28, 0) == 0 and evenly(2, 3) == 1


def test_latent_maps_cover_every_family_with_its_channel_count() -> None:
    channels = {"sd15": 4, "sdxl": 4, "flux": 16, "qwen-image": 16, "qwen-image-edit": 16}
    for family, c in channels.items():
        factors, bias = LATENT_RGB[family]
        assert len(factors) == c and all(len(row) == 3 for row in factors) and len(bias) == 3
        rgb = latents_to_rgb(torch.zeros(2, c, 5, 7), family)
        assert rgb.shape == (2, 5, 7, 3) and rgb.dtype == torch.uint8


@pytest.mark.parametrize("family", FAMILIES)
def test_previews_during_a_real_call(load, family: str) -> None:
    loaded = load(family)
    got: list[tuple[int, list[Image.Image]]] = []
    steps: list[int] = []
    maker = PreviewMaker(loaded.base, family, 64, 48, lambda step, images: got.append((step, images)))
    reporter = StepReporter(lambda step, total: steps.append(step) or False, maker, lambda s, t: wants_preview(s, t, 1))
    req = GenerationRequest(model=loaded.spec.id, prompt="a fox", width=64, height=48, steps=3, guidance=4.0)
    with torch.inference_mode():
        images = adapter_for(family).run(loaded, req, [1, 2], None, reporter)
    maker.flush()
    assert [im.size for im in images] == [(64, 48)] * 2
    assert [step for step, _ in got] == steps[:-1]  # every step but the last (SD's PNDM runs one more than asked)
    for _, previews in got:
        assert [p.size for p in previews] == [(8, 6)] * 2 and previews[0].mode == "RGB"


def test_the_callback_reads_no_device_value_between_previews() -> None:
    captured: list[int] = []

    class Maker:
        def capture(self, step: int, latents: torch.Tensor) -> None:
            captured.append(step)

        def poll(self) -> None:
            pass

    reporter = StepReporter(lambda step, total: False, Maker(), lambda step, total: step == 2)  # type: ignore[arg-type]
    callback = step_callback(reporter, default_total=4)

    class Pipe:
        _num_timesteps = 4
        _interrupt = False

    latents = torch.zeros(1, 4, 8, 8).as_subclass(DeviceValue)
    for i in range(3):
        callback(Pipe(), i, torch.tensor(1.0).as_subclass(DeviceValue), {"latents": latents})
    assert captured == [2]


def test_a_failing_preview_never_costs_the_image(load) -> None:
    loaded = load("flux")
    maker = PreviewMaker(loaded.base, "flux", 640, 640, lambda step, images: None)  # the wrong size: unpack fails
    reporter = StepReporter(lambda step, total: False, maker, lambda step, total: True)
    req = GenerationRequest(model="demo-flux", prompt="a fox", width=64, height=64, steps=2)
    with torch.inference_mode():
        (image,) = adapter_for("flux").run(loaded, req, [1], None, reporter)
    assert image.size == (64, 64)


def test_engine_jobs_carry_their_latest_preview(registry: Registry, data_dir: Path) -> None:
    engine = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False))
    engine.start()
    try:
        req = GenerationRequest(model="demo-sd15", prompt="x", width=64, height=64, steps=4, seed=1, preview_every=2)
        job = engine.submit(req)
        result = asyncio.run(job.wait(timeout=120))
        assert result.images[0].size == (64, 64)
        progress = job.progress
        assert progress.preview_step == 2 and progress.preview.size == (8, 8)
        assert [step for step, _ in progress.recent_previews] == [2]
        plain = engine.submit(GenerationRequest(model="demo-sd15", prompt="x", width=64, height=64, steps=2, seed=1))
        asyncio.run(plain.wait(timeout=120))
        assert plain.progress.preview is None
        edit = GenerationRequest(model="demo-sd15", prompt="x", task=Task.IMG2IMG, width=64, height=64, steps=4,
                                 init_images=[Image.new("RGB", (64, 64), "red")], preview_every=1)  # fmt: skip
        job = engine.submit(edit)
        asyncio.run(job.wait(timeout=120))
        assert job.progress.preview is not None
        # Every step previews: the job keeps the last few, oldest first.
        assert [step for step, _ in job.progress.recent_previews] == [1, 2]
    finally:
        engine.stop()
