"""A1111 hires fix: target sizes as A1111 computes them, latent and pixel upscalers, output sizes per family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines import demo
from pipelines.families import adapter_for
from pipelines.hires import HiresOptions, crop_box, plan_hires
from pipelines.registry import ModelSpec
from pipelines.request import GenerationRequest


@pytest.mark.parametrize(
    "size, opts, upscale_to, final",
    [
        ((512, 512), HiresOptions(scale=2.0), (1024, 1024), (1024, 1024)),
        ((512, 768), HiresOptions(scale=1.5), (768, 1152), (768, 1152)),
        ((512, 512), HiresOptions(scale=1.3), (664, 664), (664, 664)),  # int(665.6) floored to /8
        ((512, 768), HiresOptions(resize_x=1024), (1024, 1536), (1024, 1536)),  # one side keeps the aspect
        ((512, 768), HiresOptions(resize_y=1024), (680, 1024), (680, 1024)),
        ((512, 512), HiresOptions(resize_x=768, resize_y=1024), (1024, 1024), (768, 1024)),  # fit, crop the overflow
    ],
)
def test_plan_matches_a1111(size, opts, upscale_to, final):
    plan = plan_hires(*size, opts, 8)
    assert plan.upscale_to == upscale_to and plan.final == final


def test_crop_box_trims_both_sides():
    assert crop_box((1024, 1024), (768, 1024)) == (128, 0, 896, 1024)
    assert crop_box((101, 100), (100, 100)) == (0, 0, 100, 100)


def run_hires(family: str, demo_root: Path, opts: HiresOptions, stop_at: int | None = None):
    spec = ModelSpec(id=f"demo-{family}", family=family, source=f"demo:{family}")
    adapter = adapter_for(family)
    loaded = adapter.load(spec, str(demo.ensure_demo_model(family, demo_root)), torch.device("cpu"), torch.float32)
    req = GenerationRequest(model=spec.id, prompt="a castle", width=64, height=64, steps=3, hires=opts)
    steps: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> bool:
        steps.append((step, total))
        return stop_at is not None and step >= stop_at

    def make_scheduler():
        return type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)

    with torch.inference_mode():
        images = adapter.run_hires(loaded, req, [1, 2], make_scheduler, on_step)
    return images, steps


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos", "Nearest"])
def test_sd_hires_output_size(demo_root: Path, upscaler: str):
    images, steps = run_hires("sd15", demo_root, HiresOptions(scale=2.0, upscaler=upscaler, denoising_strength=0.6))
    assert len(images) == 2 and all(im.size == (128, 128) for im in images)
    assert steps[-1][0] > 3 and steps[-1][1] == steps[-1][0]  # both passes counted in one progress


def test_hires_resize_box_crops_to_the_requested_size(demo_root: Path):
    images, _ = run_hires("sdxl", demo_root, HiresOptions(resize_x=96, resize_y=128, upscaler="Latent"))
    assert all(im.size == (96, 128) for im in images)


def test_flux_latent_mode_falls_back_to_pixels(demo_root: Path):
    images, _ = run_hires("flux", demo_root, HiresOptions(scale=1.5, upscaler="Latent"))
    assert all(im.size == (96, 96) for im in images)


def test_interrupt_in_the_first_pass_skips_the_second(demo_root: Path):
    images, steps = run_hires("sd15", demo_root, HiresOptions(scale=2.0), stop_at=1)
    assert all(im.size == (64, 64) for im in images)
