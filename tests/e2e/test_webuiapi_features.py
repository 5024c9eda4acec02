"""A1111 generation features through the real `webuiapi` client against `easel serve` (demo SD1.5): variation seeds
mix the noise (strength 1 is the subseed's image), tiling is applied and reported."""

from __future__ import annotations

import numpy as np

from tests.image_helpers import pixels


def test_variation_seed_and_tiling_through_webuiapi(api) -> None:
    common = dict(prompt="a lighthouse", width=64, height=64, steps=2)
    plain = api.txt2img(seed=21, **common)
    varied = api.txt2img(seed=5, subseed=21, subseed_strength=1.0, **common)
    assert np.abs(pixels(varied.image) - pixels(plain.image)).max() <= 1  # all of the subseed's noise
    assert varied.info["subseed"] == 21 and varied.info["subseed_strength"] == 1.0
    assert "Variation seed: 21, Variation seed strength: 1" in varied.info["infotexts"][0]
    tiled = api.txt2img(seed=21, tiling=True, **common)
    assert "Tiling: True" in tiled.info["infotexts"][0]
    assert not np.array_equal(pixels(tiled.image), pixels(plain.image))
