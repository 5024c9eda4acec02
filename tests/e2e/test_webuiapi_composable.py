"""A1111 `AND` composable prompts through the real `webuiapi` client against `easel serve` (demo SD1.5): the parts
change the image, a part of weight 0 is inert (the same pixels as the prompt without it), and the prompt is reported
as sent."""

from __future__ import annotations

import numpy as np

from tests.image_helpers import pixels


def test_and_prompt_through_webuiapi(api) -> None:
    common = dict(width=64, height=64, steps=2, seed=21, cfg_scale=7)
    plain = api.txt2img(prompt="a lighthouse", **common)
    inert = api.txt2img(prompt="a lighthouse AND a boat:0", **common)
    composed = api.txt2img(prompt="a lighthouse AND a boat:0.5", **common)
    assert np.array_equal(pixels(inert.image), pixels(plain.image))
    assert np.abs(pixels(composed.image) - pixels(plain.image)).max() > 0
    assert composed.info["prompt"] == "a lighthouse AND a boat:0.5"
    assert composed.info["infotexts"][0].startswith("a lighthouse AND a boat:0.5\n")
    assert "AND not applied" not in composed.info["infotexts"][0]
