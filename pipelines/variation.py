"""A1111 variation seeds: the initial noise of image i mixes the noise of its seed with the noise of its subseed.

Reproduces A1111 v1.10 `modules/rng.py` (`ImageRNG.first`, `slerp`) with its CPU random source (`randn_source:
CPU`, which is what this server's per-image CPU generators are): each seed's noise is `torch.randn(shape)` from a
CPU generator seeded with it, as the (C, H/8, W/8) latent of one image; with `subseed_strength` s the noise is
`slerp(s, noise(seed), noise(subseed))`; with `seed_resize_from_w/h` the mixed noise is made at that size and
pasted, centred, into the noise of the real size (A1111's "resize seed from"). Image i of a request uses seed + i
and subseed + i. The result is the unscaled noise: the pipeline multiplies it by the scheduler's initial sigma, as
A1111's samplers do.
"""

from __future__ import annotations

import torch


def wants_variation(subseed_strength: float, resize_from_w: int, resize_from_h: int) -> bool:
    """Whether a request's noise differs from its plain seeds' (else the pipeline draws it itself)."""
    return subseed_strength != 0 or (resize_from_w > 0 and resize_from_h > 0)


def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A1111 `rng.randn` with the CPU source: float32 noise from a CPU generator seeded `seed`."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111 `rng.slerp`, verbatim (rows along dim 0, norms over dim 1), including its near-parallel fallback, which
    weights `low` by `val` (the opposite of the spherical branch); kept, since A1111's images follow it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def image_noise(
    shape: tuple[int, int, int],
    seed: int,
    subseed: int,
    subseed_strength: float,
    resize_from_w: int = 0,
    resize_from_h: int = 0,
    factor: int = 8,
) -> torch.Tensor:
    """The (C, H, W) initial noise of one image, as A1111's `ImageRNG.first` makes it."""
    resized = resize_from_h > 0 and resize_from_w > 0
    noise_shape = (shape[0], resize_from_h // factor, resize_from_w // factor) if resized else shape
    noise = randn(seed, noise_shape)
    if subseed_strength != 0:
        noise = slerp(subseed_strength, noise, randn(subseed, noise_shape))
    if noise_shape != shape:
        x = randn(seed, shape)
        dx = (shape[2] - noise_shape[2]) // 2
        dy = (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        dx, dy = max(-dx, 0), max(-dy, 0)
        x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
        noise = x
    return noise


def batch_noise(
    shape: tuple[int, int, int],
    seeds: list[int],
    subseeds: list[int],
    subseed_strength: float,
    resize_from_w: int = 0,
    resize_from_h: int = 0,
    factor: int = 8,
) -> torch.Tensor:
    """(N, C, H, W): image j from seeds[j] and subseeds[j]."""
    return torch.stack(
        [
            image_noise(shape, s, sub, subseed_strength, resize_from_w, resize_from_h, factor)
            for s, sub in zip(seeds, subseeds, strict=True)
        ]
    )
