"""Comparing pictures in tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    """An image's RGB pixels as int16, so that the difference of two can go negative."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)
