"""A1111 `tiling` (seamless images): every Conv2d of the denoiser and the VAE pads circularly for one call.

A1111 (`modules/sd_hijack.py` `apply_circular`) switches `padding_mode` of every Conv2d of the model to "circular", so
the image wraps around at its edges and tiles without seams. The modules are shared by the cached pipelines, so the
switch is undone when the call ends; the engine's worker runs one call at a time per device, so no other call sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline


def tiling_convs(pipe: DiffusionPipeline) -> list[torch.nn.Conv2d]:
    """The Conv2d layers of the pipeline's denoiser (UNet or transformer) and VAE."""
    convs: list[torch.nn.Conv2d] = []
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            convs.extend(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return convs


@contextmanager
def tiling_scope(pipe: DiffusionPipeline, enabled: bool) -> Iterator[None]:
    """Circular padding in the pipeline's convolutions while inside, when `enabled`; restored on the way out."""
    if not enabled:
        yield
        return
    convs = tiling_convs(pipe)
    before = [c.padding_mode for c in convs]
    try:
        for c in convs:
            c.padding_mode = "circular"
        yield
    finally:
        for c, mode in zip(convs, before, strict=True):
            c.padding_mode = mode
