"""Pixel-space upscalers by name (Pillow resampling filters), for dialects that upscale a finished image on the
CPU (GenPicz `upscale`). No torch: these run on a job-service thread, not on the GPU."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

from PIL import Image

UpscalerName = Literal["lanczos", "bicubic", "bilinear", "nearest"]
UPSCALER_NAMES: tuple[str, ...] = get_args(UpscalerName)

_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def upscale(image: Image.Image, factor: int, method: str = "lanczos") -> Image.Image:
    """`image` scaled by an integer `factor` with the named filter (case-insensitive)."""
    resample = _FILTERS.get(method.lower())
    if resample is None:
        raise ValueError(f"unknown upscaler {method!r}; one of: {', '.join(UPSCALER_NAMES)}")
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), resample)


def upscaler(method: str, factor: int) -> Callable[[Image.Image], Image.Image]:
    """An image -> image function (e.g. `JobSpec.postprocess`); the name is checked now, not when the job ends."""
    if method.lower() not in _FILTERS:
        raise ValueError(f"unknown upscaler {method!r}; one of: {', '.join(UPSCALER_NAMES)}")
    return partial(upscale, factor=factor, method=method)


def resize_to(image: Image.Image, size: tuple[int, int], method: str = "lanczos") -> Image.Image:
    """`image` resized to exactly `size` (an upscale whose factor need not be whole, e.g. to 4K)."""
    resample = _FILTERS.get(method.lower())
    if resample is None:
        raise ValueError(f"unknown upscaler {method!r}; one of: {', '.join(UPSCALER_NAMES)}")
    return image if image.size == size else image.resize(size, resample)


def resizer(size: tuple[int, int], method: str) -> Callable[[Image.Image], Image.Image]:
    """An image -> image function resizing to `size` (e.g. `JobSpec.postprocess`); the name is checked now."""
    if method.lower() not in _FILTERS:
        raise ValueError(f"unknown upscaler {method!r}; one of: {', '.join(UPSCALER_NAMES)}")
    return partial(resize_to, size=size, method=method)
