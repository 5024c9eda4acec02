"""The sd-webui-controlnet extension's weight-free preprocessors, pixel for pixel (its annotator/util.py,
scripts/preprocessor/model_free_preprocessors.py and the legacy processor.py), on HWC uint8 numpy arrays.

Each operation takes the image as the extension receives it (H x W, H x W x 3 or H x W x 4 uint8), the processor
resolution and the two slider values already bound-checked, and returns an H x W x 3 uint8 map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Array = np.ndarray


class _OpenCV:
    """cv2, imported on first use: the server reads this package's preprocessor list at start-up, and OpenCV is
    needed only when a preprocessor runs (a server that never runs one starts without it)."""

    def __getattr__(self, name: str) -> Any:
        import cv2

        return getattr(cv2, name)


cv2 = _OpenCV()


def hwc3(x: Array) -> Array:
    """annotator.util.HWC3: grey -> three channels; RGBA composited over white."""
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    if channels == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")


def pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) after resize_image_with_pad scales the short side to `resolution` (before padding)."""
    k = float(resolution) / float(min(height, width))
    return int(np.round(float(height) * k)), int(np.round(float(width) * k))


def resize_image_with_pad(image: Array, resolution: int) -> tuple[Array, Callable[[Array], Array]]:
    """The extension's resize: short side to `resolution` (cubic up, area down), edge-padded to multiples of 64;
    the returned function crops a result back to the unpadded size."""
    img = hwc3(image)
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = resized_size(h_raw, w_raw, resolution)
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    padded = np.pad(img, [[0, pad64(h_target)], [0, pad64(w_target)], [0, 0]], mode="edge")

    def remove_pad(x: Array) -> Array:
        return np.ascontiguousarray(x[:h_target, :w_target]).copy()

    return np.ascontiguousarray(padded), remove_pad


def canny(img: Array, res: int, low: float, high: float) -> Array:
    padded, remove_pad = resize_image_with_pad(img, res)
    edges = cv2.Canny(padded, int(low), int(high))
    return remove_pad(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB))


def invert(img: Array, res: int, a: float, b: float) -> Array:
    return 255 - hwc3(img)


def blur_gaussian(img: Array, res: int, sigma: float, b: float) -> Array:
    padded, remove_pad = resize_image_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(padded), (0, 0), float(sigma))


def scribble_xdog(img: Array, res: int, threshold: float, b: float) -> Array:
    padded, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[2 * (255 - dog) > threshold] = 255
    return remove_pad(result)


def threshold(img: Array, res: int, level: float, b: float) -> Array:
    padded, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[np.min(padded, axis=2) > level] = 255
    return remove_pad(result)


def tile_resample(img: Array, res: int, rate: float, b: float) -> Array:
    """Down-sampling by `rate` (below 1.1: unchanged); the processor resolution plays no part."""
    img = hwc3(img)
    if rate < 1.1:
        return img
    h, w, _ = img.shape
    return cv2.resize(img, downsampled_size(w, h, rate), interpolation=cv2.INTER_AREA)


def downsampled_size(width: int, height: int, rate: float) -> tuple[int, int]:
    """tile_resample's (W, H); at least one pixel each way (the extension would fail on a tiny image)."""
    return max(int(float(width) / float(rate)), 1), max(int(float(height) / float(rate)), 1)


def identity(img: Array, res: int, a: float, b: float) -> Array:
    """tile_colorfix variants: the map is the image itself (the colour fix acts during sampling)."""
    return hwc3(img)


def color(img: Array, res: int, a: float, b: float) -> Array:
    """t2ia_color_grid: short side to `res`, then 64x64-pixel colour cells."""
    img = hwc3(img)
    h, w = img.shape[:2]
    if h < w:
        new_h, new_w = res, int(round(w / h * res))
    else:
        new_w, new_h = res, int(round(h / w * res))
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(img, (max(new_w // 64, 1), max(new_h // 64, 1)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (new_w, new_h), interpolation=cv2.INTER_NEAREST)


def lineart_standard(img: Array, res: int, a: float, b: float) -> Array:
    padded, remove_pad = resize_image_with_pad(img, res)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16, float(np.median(strong)) if strong.size else 0.0)
    intensity *= 127
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def _recolor(img: Array, conversion: int, channel: int, gamma: float) -> Array:
    # The extension converts from BGR although its images are RGB; kept, so the maps match its own.
    result = cv2.cvtColor(hwc3(img), conversion)[:, :, channel].astype(np.float32) / 255.0
    result = (result**gamma * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(result, cv2.COLOR_GRAY2RGB)


def recolor_luminance(img: Array, res: int, gamma: float, b: float) -> Array:
    return _recolor(img, cv2.COLOR_BGR2LAB, 0, gamma)


def recolor_intensity(img: Array, res: int, gamma: float, b: float) -> Array:
    return _recolor(img, cv2.COLOR_BGR2HSV, 2, gamma)


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> Array:
    noise = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def shuffle(img: Array, res: int, a: float, b: float, rng: np.random.Generator | None = None) -> Array:
    """Content shuffle: the image warped by a smooth random flow (a new one each call, as the extension's)."""
    padded, remove_pad = resize_image_with_pad(img, res)
    img = remove_pad(padded)
    h, w, _ = img.shape
    rng = rng or np.random.default_rng()
    x = _noise_disk(h, w, 256, rng) * float(w - 1)
    y = _noise_disk(h, w, 256, rng) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)
