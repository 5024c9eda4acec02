"""Image geometry of A1111's built-in img2img scripts (SD upscale, Outpainting mk2, Poor man's outpainting).

Sources: A1111 v1.10 `modules/images.py` (split_grid, combine_grid), `scripts/outpainting_mk_2.py`
(get_matched_noise, from g-diffuser-bot), `scripts/poor_mans_outpainting.py`. Pillow and numpy only (A1111 uses
scikit-image's `match_histograms`; its float path is reproduced here), so the HTTP side runs them off the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Tiles ----------------------------------------------------------------------------------------------------------------


@dataclass
class Tile:
    x: int
    width: int
    image: Image.Image


@dataclass
class TileRow:
    y: int
    height: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Grid:
    """A1111 `images.Grid`: rows of tiles of tile_w x tile_h cut from an image_w x image_h image."""

    rows: list[TileRow]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    def __iter__(self):  # every tile, row by row (A1111's order of work)
        for row in self.rows:
            yield from row.tiles

    def __len__(self) -> int:
        return sum(len(row.tiles) for row in self.rows)


def grid_shape(w: int, h: int, tile_w: int, tile_h: int, overlap: int) -> tuple[int, int]:
    """(cols, rows) of `split_grid`, at least one each (A1111 makes none for an image no wider than the overlap)."""
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    return max(cols, 1), max(rows, 1)


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> Grid:
    """A1111 `images.split_grid`: tiles spread evenly, the last one flush with the edge. `overlap` < tile sizes."""
    w, h = image.size
    cols, rows = grid_shape(w, h, tile_w, tile_h, overlap)
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for r in range(rows):
        y = int(r * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row = TileRow(y, tile_h)
        for c in range(cols):
            x = int(c * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row.tiles.append(Tile(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append(row)
    return grid


def _ramp(overlap: int, shape: tuple[int, int], axis: int) -> Image.Image:
    """A1111 `combine_grid`'s blending mask: 0..255 linearly across the overlap."""
    r = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    r = r.reshape((1, overlap) if axis == 1 else (overlap, 1))
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(r, shape)), "L")


def combine_grid(grid: Grid) -> Image.Image:
    """A1111 `images.combine_grid`: each tile pasted over its left and upper neighbours, blended linearly over the
    overlap. (A1111 cannot build its masks for overlap 0; here the tiles are then simply pasted.)"""
    ov = grid.overlap
    mask_w = _ramp(ov, (grid.tile_h, ov), axis=1) if ov > 0 else None
    mask_h = _ramp(ov, (ov, grid.image_w), axis=0) if ov > 0 else None
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for row in grid.rows:
        h = row.height
        line = Image.new("RGB", (grid.image_w, h))
        for tile in row.tiles:
            image = tile.image.convert("RGB")
            if tile.x == 0 or mask_w is None:
                line.paste(image, (tile.x, 0))
                continue
            line.paste(image.crop((0, 0, ov, h)), (tile.x, 0), mask=mask_w)
            line.paste(image.crop((ov, 0, tile.width, h)), (tile.x + ov, 0))
        if row.y == 0 or mask_h is None:
            combined.paste(line, (0, row.y))
            continue
        combined.paste(line.crop((0, 0, line.width, ov)), (0, row.y), mask=mask_h)
        combined.paste(line.crop((0, ov, line.width, h)), (0, row.y + ov))
    return combined


# Outpainting ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expansion:
    """How many pixels each side grows (A1111 rounds the total up to a multiple of 64, shared out by direction)."""

    left: int
    right: int
    up: int
    down: int

    def size(self, w: int, h: int) -> tuple[int, int]:
        return w + self.left + self.right, h + self.up + self.down


def expansion(w: int, h: int, pixels: int, directions: set[str]) -> Expansion:
    """A1111's arithmetic (both outpainting scripts): the new size is a multiple of 64 in each expanded axis."""
    left = pixels if "left" in directions else 0
    right = pixels if "right" in directions else 0
    up = pixels if "up" in directions else 0
    down = pixels if "down" in directions else 0
    target_w = math.ceil((w + left + right) / 64) * 64
    target_h = math.ceil((h + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - w) // (left + right)
    if right > 0:
        right = target_w - w - left
    if up > 0:
        up = up * (target_h - h) // (up + down)
    if down > 0:
        down = target_h - h - up
    return Expansion(left, right, up, down)


def _match_cumulative_cdf(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """scikit-image `_match_cumulative_cdf` (float path): each source value mapped to the template's quantile."""
    src_values, src_index, src_counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    tmpl_values, tmpl_counts = np.unique(template.ravel(), return_counts=True)
    src_quantiles = np.cumsum(src_counts) / source.size
    tmpl_quantiles = np.cumsum(tmpl_counts) / template.size
    return np.interp(src_quantiles, tmpl_quantiles, tmpl_values)[src_index].reshape(source.shape)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-image `exposure.match_histograms(image, reference, channel_axis=1)` for (N, C) arrays."""
    out = np.empty_like(image, dtype=np.float64)
    for c in range(image.shape[1]):
        out[:, c] = _match_cumulative_cdf(image[:, c], reference[:, c])
    return out


def _fft2(data: np.ndarray) -> np.ndarray:
    """Ortho-normalised FFT per channel, shifted before and after (g-diffuser's helper)."""
    out = np.fft.fft2(np.fft.fftshift(data, axes=(0, 1)), norm="ortho", axes=(0, 1))
    return np.fft.ifftshift(out, axes=(0, 1))


def _ifft2(data: np.ndarray) -> np.ndarray:
    out = np.fft.ifft2(np.fft.fftshift(data, axes=(0, 1)), norm="ortho", axes=(0, 1))
    return np.fft.ifftshift(out, axes=(0, 1))


def _noise_window(rows: int, cols: int, std: float = 3.14) -> np.ndarray:
    """g-diffuser `_get_gaussian_window(mode=1)`: a (rows, cols) low-pass window."""
    scale_r, scale_c = rows / min(rows, cols), cols / min(rows, cols)
    r = (np.arange(rows) / rows * 2.0 - 1.0) * scale_r
    c = (np.arange(cols) / cols * 2.0 - 1.0) * scale_c
    return (1 / ((r[:, None] ** 2 + 1.0) * (c[None, :] ** 2 + 1.0))) ** (std / 3.14)


def matched_noise(
    src: np.ndarray, mask_rgb: np.ndarray, noise_q: float = 1.0, color_variation: float = 0.05
) -> np.ndarray:
    """A1111 `get_matched_noise`: noise shaped like the unmasked picture's spectrum, histogram-matched to its colours,
    in the masked area (mask 1); the picture elsewhere. `src`, `mask_rgb`: (H, W, 3) floats in 0..1. Deterministic
    (seed 0), as A1111's. Guards against A1111's division by zero on an all-black picture."""
    rows, cols, channels = src.shape
    mask_grey = np.sum(mask_rgb, axis=2) / 3.0
    img_mask = mask_grey > 1e-6
    ref_mask = mask_grey < 1e-3

    windowed = src * (1.0 - np.repeat(mask_grey[:, :, None], 3, axis=2))
    peak = np.max(windowed)
    if peak > 0:
        windowed /= peak
    windowed += np.average(src) * mask_rgb  # the masked area at the average colour, not black, for the FFT

    src_fft = _fft2(windowed)
    src_dist = np.absolute(src_fft)
    src_phase = np.divide(src_fft, src_dist, out=np.zeros_like(src_fft), where=src_dist > 0)

    rng = np.random.default_rng(0)
    noise_rgb = rng.random((rows, cols, channels))
    noise_grey = np.sum(noise_rgb, axis=2) / 3.0
    noise_rgb *= color_variation  # colourfulness blended towards grey
    noise_rgb += ((1.0 - color_variation) * noise_grey)[:, :, None]

    noise_fft = _fft2(noise_rgb) * _noise_window(rows, cols)[:, :, None]
    noise_rgb = np.real(_ifft2(noise_fft))
    shaped_fft = np.absolute(_fft2(noise_rgb)) ** 2 * (src_dist**noise_q) * src_phase

    shaped = np.real(_ifft2(shaped_fft))
    shaped -= np.min(shaped)
    top = np.max(shaped)
    if top > 0:
        shaped /= top
    if img_mask.any() and ref_mask.any():
        shaped[img_mask, :] = match_histograms(shaped[img_mask, :], src[ref_mask, :])
    shaped = src * (1.0 - mask_rgb) + shaped * mask_rgb
    return np.clip(shaped, 0.0, 1.0)


def matched_noise_image(image: Image.Image, mask: Image.Image, noise_q: float, color_variation: float) -> Image.Image:
    """`matched_noise` on Pillow images (mask white = fill), as outpainting mk2 calls it."""
    src = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    m = np.asarray(mask.convert("RGB"), dtype=np.float64) / 255.0
    noised = matched_noise(src, m, noise_q, color_variation)
    return Image.fromarray(np.clip(noised * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB")
