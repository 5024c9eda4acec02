"""Live previews during denoising, with no extra model: latents to RGB through a fixed linear map per latent space
(what A1111 calls "Approx cheap"), at 1/8 of the image size.

The map is computed on the device and copied to pinned host memory without waiting; the image is built at a later
step (or at the end of the call) once the copy has landed, so a preview never makes the denoising loop wait for the
GPU. FLUX's and Qwen-Image's packed latents are unpacked first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

# Per latent space: RGB = latent channels @ FACTORS + BIAS, on the latents as the denoiser sees them (SD's scaled
# latents; FLUX's shifted and scaled ones; Qwen-Image's normalised Wan-2.1 latents). Published fits of the VAEs'
# decoders (the same numbers A1111 and ComfyUI use for their cheap previews).
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd15": (
        [
            [0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0000, 0.0000, 0.0000],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
    "flux": (
        [
            [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
            [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
            [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
            [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
    "qwen-image": (
        [
            [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747],
            [0.0372, 0.2344, 0.1420], [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665],
            [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975], [-0.0412, 0.0267, -0.1364],
            [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
            [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950],
            [0.1984, 0.0913, 0.1861],
        ],
        [-0.1835, -0.0868, -0.3360],
    ),
}  # fmt: skip
LATENT_RGB["qwen-image-edit"] = LATENT_RGB["qwen-image"]


def unpack(pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Latents as (batch, channels, h, w): FLUX and Qwen-Image pack 2x2 patches into tokens; Qwen's VAE is 3-D."""
    if latents.ndim == 3:  # (batch, tokens, channels * 4)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    if latents.ndim == 5:  # (batch, channels, frames, h, w)
        latents = latents[:, :, 0]
    return latents


def latents_to_rgb(latents: torch.Tensor, family: str) -> torch.Tensor:
    """(batch, channels, h, w) latents -> (batch, h, w, 3) uint8, on the latents' device."""
    factors, bias = LATENT_RGB[family]
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    offset = torch.tensor(bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), weight) + offset
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


@dataclasses.dataclass
class _Pending:
    step: int
    pixels: torch.Tensor  # (batch, h, w, 3) uint8 on the host; pinned memory being copied to on CUDA
    copied: torch.cuda.Event | None  # None: already there


class PreviewMaker:
    """Makes the previews of one pipeline call. `capture(step, latents)` at a preview step starts the work; finished
    previews go to `publish(step, images)` (one image per image of the call) from a later step or `flush()`."""

    def __init__(
        self, pipe: Any, family: str, width: int, height: int, publish: Callable[[int, list[Image.Image]], None]
    ):
        self.pipe, self.family, self.width, self.height = pipe, family, width, height
        self.publish = publish
        self._pending: list[_Pending] = []

    def capture(self, step: int, latents: torch.Tensor) -> None:
        rgb = latents_to_rgb(unpack(self.pipe, latents, self.width, self.height), self.family)
        if rgb.device.type == "cuda":
            host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append(_Pending(step, host, event))
        else:
            self._pending.append(_Pending(step, rgb, None))
        self.poll()

    def poll(self) -> None:
        """Publish the previews whose copy has landed (never waits)."""
        while self._pending and (self._pending[0].copied is None or self._pending[0].copied.query()):
            self._publish(self._pending.pop(0))

    def flush(self) -> None:
        """End of the call: wait for the copies still in flight (the call is over) and publish them."""
        for pending in self._pending:
            if pending.copied is not None:
                pending.copied.synchronize()
            self._publish(pending)
        self._pending.clear()

    def _publish(self, pending: _Pending) -> None:
        self.publish(pending.step, [Image.fromarray(a) for a in pending.pixels.numpy()])
