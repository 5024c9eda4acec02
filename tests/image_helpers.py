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
