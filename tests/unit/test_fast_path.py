"""The GPU fast path's pieces that CPU can prove: the on-device uint8 conversion gives diffusers' pixels exactly,
and the progress/cancel callback never reads a device value (each read would stall the GPU queue once per step)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from pipelines.families import step_callback, to_pil

CPU = torch.device("cpu")


def diffusers_pil(images: torch.Tensor) -> list[np.ndarray]:
    """diffusers' own `output_type="pil"` conversion of postprocessed [0, 1] images."""
    return [np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_to_pil_gives_diffusers_pixels_exactly(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 17, 23, generator=g)
    # Values on and next to the rounding boundaries (k + 0.5) / 255, and the ends of the range.
    edges = (torch.arange(256, dtype=torch.float64) + 0.5) / 255
    flat = images.view(-1)
    flat[: 256 * 3] = torch.cat([edges, edges.nextafter(torch.tensor(0.0, dtype=torch.float64)), edges / 2]).float()
    flat[-2:] = torch.tensor([0.0, 1.0])
    images = images.to(dtype)
    ours = to_pil(images)
    theirs = diffusers_pil(images)
    assert [im.size for im in ours] == [(23, 17)] * 3 and all(im.mode == "RGB" for im in ours)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), b)


def test_to_pil_passes_pil_images_through() -> None:
    images = to_pil(torch.zeros(1, 3, 8, 8))
    assert to_pil(images) == images


class DeviceValue(torch.Tensor):
    """A tensor whose value may not be read on the host: every read that would synchronise a GPU raises."""

    SYNCING = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.SYNCING or (name == "to" and any(str(a) == "cpu" for a in args[1:])):
            raise AssertionError(f"host read of a device value: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_step_callback_reads_no_device_value() -> None:
    seen: list[tuple[int, int]] = []
    stop = {"now": False}

    def on_step(step: int, total: int) -> bool:
        seen.append((step, total))
        return stop["now"]

    class Pipe:
        _num_timesteps = 4
        _interrupt = False

    t = torch.tensor(999.0).as_subclass(DeviceValue)
    latents = torch.zeros(1, 4, 8, 8).as_subclass(DeviceValue)
    with pytest.raises(AssertionError, match="host read"):
        float(t)  # the trap works
    callback = step_callback(on_step, default_total=4)
    pipe = Pipe()
    out = callback(pipe, 0, t, {"latents": latents})
    assert out["latents"] is latents and not pipe._interrupt
    stop["now"] = True
    callback(pipe, 1, t, {"latents": latents})
    assert pipe._interrupt and seen == [(1, 4), (2, 4)]


def test_call_views_pin_the_execution_device_without_changing_the_pipeline(demo_root, monkeypatch) -> None:
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from pipelines import demo
    from pipelines.families import adapter_for, call_view
    from pipelines.registry import ModelSpec
    from pipelines.request import GenerationRequest

    spec = ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15")
    loaded = adapter_for("sd15").load(spec, str(demo.ensure_demo_model("sd15", Path(demo_root))), CPU, torch.float32)
    view = call_view(loaded.base, None, 2, loaded.execution_device)
    assert isinstance(view, StableDiffusionPipeline) and type(view).__name__ == "StableDiffusionPipeline"
    assert view._execution_device == CPU and type(loaded.base) is StableDiffusionPipeline  # the cached one untouched
    walked = []
    monkeypatch.setattr(StableDiffusionPipeline, "components", property(lambda self: walked.append(1) or {}))
    assert view._execution_device == CPU and not walked  # no walk over the modules
    monkeypatch.undo()
    offloaded = ModelSpec(id="m", family="sd15", source="demo:sd15", performance={"offload": "model"})
    assert dataclasses.replace(loaded, spec=offloaded).execution_device is None  # hooks move modules: not pinned
    req = GenerationRequest(model="demo-sd15", prompt="a fox", width=64, height=64, steps=2, seed=1)

    def image(model):
        scheduler = type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)
        with torch.inference_mode():
            return np.asarray(adapter_for("sd15").run(model, req, [1], scheduler, lambda s, t: False)[0])

    assert np.array_equal(image(loaded), image(dataclasses.replace(loaded, spec=offloaded)))  # pinned == walked
