"""Comparing pictures in tests."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    """An image's RGB pixels as int16, so that the difference of two can go negative."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    """`image` as the base64 PNG the JSON APIs take."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64(data: str) -> Image.Image:
    """The image a JSON API returned as base64."""
    return Image.open(io.BytesIO(base64.b64decode(data)))


def a1111_txt2img(client, model_id: str, seed: int) -> np.ndarray:
    """One 64x64 image of `model_id` through `/sdapi/v1/txt2img` (a fixed prompt, 2 steps), as float32 RGB."""
    body = {"prompt": "a red cube on a table", "seed": seed, "steps": 2, "width": 64, "height": 64,
            "cfg_scale": 3.0, "override_settings": {"sd_model_checkpoint": model_id}}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_b64(r.json()["images"][0]).convert("RGB")
    assert image.size == (64, 64)
    return np.asarray(image, dtype=np.float32)
