"""A1111 `AND` composable prompts through the real `webuiapi` client against `easel serve` (demo SD1.5): the parts
change the image, a part of weight 0 is inert (the same pixels as the prompt without it), and the prompt is reported
as sent."""

from __future__ import annotations

import numpy as np
import pytest
import webuiapi


@pytest.fixture(scope="module")
def api(live_server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=live_server.port, sampler="Euler", steps=2)


def _px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_and_prompt_through_webuiapi(api) -> None:
    common = dict(width=64, height=64, steps=2, seed=21, cfg_scale=7)
    plain = api.txt2img(prompt="a lighthouse", **common)
    inert = api.txt2img(prompt="a lighthouse AND a boat:0", **common)
    composed = api.txt2img(prompt="a lighthouse AND a boat:0.5", **common)
    assert np.array_equal(_px(inert.image), _px(plain.image))
    assert np.abs(_px(composed.image) - _px(plain.image)).max() > 0
    assert composed.info["prompt"] == "a lighthouse AND a boat:0.5"
    assert composed.info["infotexts"][0].startswith("a lighthouse AND a boat:0.5\n")
    assert "AND not applied" not in composed.info["infotexts"][0]
