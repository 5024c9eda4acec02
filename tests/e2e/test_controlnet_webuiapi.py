"""The A1111 ControlNet extension's API through the real `webuiapi` client against `easel serve` (demo SD1.5 and its
demo ControlNet): the routes it calls, a unit from its `ControlNetUnit` steering the picture, the detected map
appended, and weight 0 giving the picture without ControlNet."""

from __future__ import annotations

import numpy as np
import webuiapi
from PIL import Image, ImageDraw

from tests.image_helpers import pixels

DEMO = "control_demo-sd15"


def test_controlnet_unit_through_webuiapi(api) -> None:
    assert api.controlnet_version() == 3
    models = api.controlnet_model_list()
    title = next(m for m in models if m.startswith(f"{DEMO} ["))
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).ellipse((8, 8, 56, 56), fill="white")
    # A fresh `alwayson_scripts` on every call: webuiapi writes the units into its mutable default dict, which would
    # carry them into every later call of the process (other tests' too).
    common = dict(prompt="a lighthouse", width=64, height=64, steps=2, seed=12, cfg_scale=5)
    plain = api.txt2img(alwayson_scripts={}, **common)
    unit = webuiapi.ControlNetUnit(image=control, module="none", model=title)
    steered = api.txt2img(controlnet_units=[unit], alwayson_scripts={}, **common)
    assert len(steered.images) == 2  # the picture, then the unit's detected map
    assert pixels(steered.images[1]).shape == (64, 64, 3)
    assert np.abs(pixels(steered.image) - pixels(plain.image)).mean() > 1
    assert f'ControlNet 0: "Module: none, Model: {title}' in steered.info["infotexts"][0]
    zero = webuiapi.ControlNetUnit(image=control, model=title, weight=0.0)
    off = api.txt2img(controlnet_units=[zero], alwayson_scripts={}, **common)
    assert np.array_equal(pixels(off.image), pixels(plain.image))
