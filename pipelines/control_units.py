"""ControlNet units as the engine runs them (torch-free, so the HTTP side builds them).

The sd-webui-controlnet extension's unit, after the dialect has parsed it: the model resolved to a file, the
preprocessor already run and its detected map fitted to the output size. What the denoising loop does with it
(weights, soft injection, the guidance window, cond-only control) lives in `pipelines.controlnet`.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image


class ControlMode(str, enum.Enum):
    """The extension's `ControlMode` (its values are what clients send; ints 0-2 index them in this order)."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class ControlResize(str, enum.Enum):
    """The extension's `ResizeMode` for control images (ints 0-2 index them; 3, A1111's latent upscale, is 0)."""

    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"


class HiresOption(str, enum.Enum):
    """The extension's `HiResFixOption`: which hires pass a unit controls."""

    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


@dataclass(frozen=True)
class ControlUnit:
    """One enabled ControlNet unit of a request.

    `model`: the listed name ("name [hash]"); `source`: where its weights are (a .safetensors file, a diffusers
    folder, or `demo:<family>` for the built-in tiny one). `image`: the detected map at the output size (RGB), one
    per unit; it is both what the ControlNet sees and what the response appends.
    """

    model: str
    source: str
    image: Image.Image
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    save_detected_map: bool = True
    hr_option: HiresOption = HiresOption.BOTH
    # Set for an IP-Adapter unit (an image prompt, pipelines.ip_adapter): its CLIP image encoder folder. `image` is
    # then the prompt image as sent, not a map at the output size.
    image_encoder: str | None = None

    @property
    def is_ip_adapter(self) -> bool:
        return self.image_encoder is not None

    def batch_key(self) -> Hashable:
        """What must be equal for two requests' units to share a pipeline call (the images may differ)."""
        return (self.source, self.weight, self.guidance_start, self.guidance_end, self.control_mode, self.hr_option)


def controlnet_units(units: list[ControlUnit]) -> list[ControlUnit]:
    return [u for u in units if not u.is_ip_adapter]


def ip_adapter_units(units: list[ControlUnit]) -> list[ControlUnit]:
    return [u for u in units if u.is_ip_adapter]


def guidance_stopped(step: int, total: int, start: float, end: float) -> bool:
    """The extension's window (scripts/hook.py): at sampling step `step` of `total` the unit is off when
    step/total < guidance_start or step/total > guidance_end."""
    percent = step / max(total, 1)
    return percent < start or percent > end


def soft_injection_scales(count: int) -> list[float]:
    """Per-residual scales of "My prompt is more important" / "ControlNet is more important": 0.825**(12-i) for the
    13 residuals of an SD1.5 ControlNet (12 down blocks, then the middle block); SDXL's 10 take the first 10, as the
    extension does."""
    return [0.825 ** float(12 - i) for i in range(max(13, count))][:count]


def fit_control_image(image: Image.Image, width: int, height: int, mode: ControlResize) -> Image.Image:
    """The extension's `detectmap_proc` on a detected map: Just Resize stretches it; Crop and Resize scales it to
    cover the output and cuts the centre; Resize and Fill scales it to fit inside and pads with the median colour
    of its border."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == ControlResize.RESIZE:
        return image.resize((width, height), Image.Resampling.BICUBIC)
    old_w, old_h = image.size
    k = (min if mode == ControlResize.OUTER_FIT else max)(height / old_h, width / old_w)
    new_w, new_h = max(1, round(old_w * k)), max(1, round(old_h * k))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if mode == ControlResize.INNER_FIT:
        left, top = max(0, (new_w - width) // 2), max(0, (new_h - height) // 2)
        return resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0, :, :], pixels[-1, :, :], pixels[:, 0, :], pixels[:, -1, :]], axis=0)
    colour = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(resized, (max(0, (width - new_w) // 2), max(0, (height - new_h) // 2)))
    return canvas


def crop_like_only_masked(
    image: Image.Image, canvas: tuple[int, int], region: tuple[int, int, int, int], width: int, height: int
) -> Image.Image:
    """A control image for "only masked" inpainting, as the extension crops its input with the A1111 mask
    (`inpaint_crop_input_image`): laid over the init image's canvas, cut to the masked region, and fitted to the
    output size the way the init crop is (resize and fill), so control and picture line up."""
    on_canvas = image.resize(canvas, Image.Resampling.BICUBIC)
    crop = on_canvas.crop(region)
    return fit_control_image(crop, width, height, ControlResize.OUTER_FIT)


# Preprocessors whose maps the extension always soft-injects in the hires pass (one-pixel edges upscaled show).
HIRES_SOFT_MODULES = ("canny", "mlsd")


def first_pass_units(units: list[ControlUnit]) -> list[ControlUnit]:
    """The units of a hires job's first pass (all but "High res only")."""
    return [u for u in units if u.hr_option != HiresOption.HIGH_RES_ONLY]


def second_pass_units(units: list[ControlUnit], width: int, height: int) -> list[ControlUnit]:
    """The units of the hires pass (all but "Low res only"), their maps at the hires size; canny and mlsd maps get
    soft injection there, as the extension forces it."""
    out = []
    for u in units:
        if u.hr_option == HiresOption.LOW_RES_ONLY:
            continue
        if u.is_ip_adapter:  # an image prompt, not a map: the same in both passes
            out.append(u)
            continue
        mode = u.control_mode
        if mode == ControlMode.BALANCED and any(m in u.module for m in HIRES_SOFT_MODULES):
            mode = ControlMode.PROMPT
        image = fit_control_image(u.image, width, height, ControlResize.RESIZE)
        out.append(replace(u, image=image, control_mode=mode))
    return out
