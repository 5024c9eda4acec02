"""A1111's built-in img2img scripts through the real `webuiapi` client against `easel serve` (demo SD1.5, 64 px
tiles, 2 steps): SD upscale's tiles are real img2img, outpainting keeps the picture and grows only where asked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.image_helpers import pixels

pytestmark = pytest.mark.e2e


def _picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


COMMON = dict(prompt="a lighthouse", width=64, height=64, steps=2, seed=11, denoising_strength=0.75)


def test_sd_upscale_through_webuiapi(api) -> None:
    picture = _picture()
    # 3 x 3 tiles of 64 px overlapping by 32, all nine in one job
    r = api.img2img(
        images=[picture], script_name="SD upscale", script_args=["", 32, "Lanczos", 2.0], batch_size=9, **COMMON
    )
    assert r.image.size == (128, 128)
    plain = pixels(picture.resize((128, 128), Image.Resampling.LANCZOS))
    # away from the seams the pixels are the tile's img2img, not the plain upscale
    assert np.abs(pixels(r.image)[:28, :28] - plain[:28, :28]).mean() > 10
    assert "SD upscale overlap: 32, SD upscale upscaler: Lanczos" in r.info["infotexts"][0]


def test_outpainting_through_webuiapi_keeps_the_picture(api) -> None:
    picture = _picture()
    # mk2, 64 px to the right, mask blur 0: the 96 px wide job covers 32 px of the picture, which the mask keeps
    r = api.img2img(images=[picture], script_name="Outpainting mk2", script_args=["", 64, 0, ["right"]],
                    **{**COMMON, "width": 96})  # fmt: skip
    out = pixels(r.image)
    assert r.image.size == (128, 64)
    assert np.abs(out[:, :60] - pixels(picture)[:, :60]).max() <= 2
    assert np.abs(out[:, 72:]).std() > 0  # the new strip is made, not left black
    # poor man's, 32 px down: rounded to 64 -> 64x128, the picture's top half untouched by the border tiles
    r = api.img2img(images=[picture], script_name="Poor man's outpainting", script_args=[32, 4, "fill", ["down"]],
                    **COMMON)  # fmt: skip
    assert r.image.size == (64, 128)
    assert np.abs(pixels(r.image)[:24] - pixels(picture)[:24]).max() <= 2
