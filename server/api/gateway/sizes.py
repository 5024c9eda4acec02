"""Output sizes and step counts of the gateway routes. Pure functions; errors name the wire field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipelines.registry import ModelSpec
from server.errors import ApiError, FieldError
from server.settings import Settings

MIN_SIDE = 64  # the gateway document's minimum (FLUX); used for every route
# image_size -> target pixel count (1K is about 1024 x 1024 whatever the aspect ratio)
IMAGE_SIZE_PIXELS = {"1K": 1024 * 1024, "2K": 2048 * 2048, "4K": 4096 * 4096}
FOUR_K_MULTIPLE = 16  # sides of an upscaled 4K image
_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def parse_wxh(value: str, field: str) -> tuple[int, int]:
    m = _WXH.match(value)
    if m is None:
        raise ApiError.invalid([FieldError(field, f"'{value}' is not a size; use WxH, e.g. 1024x1024")])
    return int(m.group(1)), int(m.group(2))


def check_size(
    width: int,
    height: int,
    spec: ModelSpec,
    settings: Settings,
    fields: tuple[str, str] = ("size", "size"),
    multiple: int | None = None,
) -> None:
    """422 naming the field (`fields` = the wire names of width and height) unless both sides are multiples of the
    model's (or the given) multiple, >= 64 and within max_width / max_height. Never rounds: the client gets the
    size it asked for or an error saying why not."""
    multiple = multiple or spec.size_multiple
    errors: list[FieldError] = []
    for side, field, value, limit in (
        ("width", fields[0], width, settings.max_width),
        ("height", fields[1], height, settings.max_height),
    ):
        if value < MIN_SIDE:
            problem = f"{side} {value} is below the minimum of {MIN_SIDE}"
        elif value > limit:
            problem = f"{side} {value} is above this server's max_{side}={limit}"
        elif value % multiple:
            problem = f"{side} {value} is not a multiple of {multiple} (model '{spec.id}', family {spec.family})"
        else:
            continue
        errors.append(FieldError(field, problem))
    if errors:
        raise ApiError.invalid(errors)


def gemini_size(aspect_ratio: str, image_size: str, multiple: int, settings: Settings) -> tuple[int, int]:
    """Width and height for an aspect ratio at 1K/2K/4K: about 1024^2 / 2048^2 / 4096^2 pixels, each side a
    multiple of the model's `multiple`, scaled down (ratio kept) to fit max_width, max_height and max_output_pixels.
    """
    return size_at_pixels(aspect_ratio, IMAGE_SIZE_PIXELS[image_size], multiple, settings)


def size_at_pixels(aspect_ratio: str, pixels: int, multiple: int, settings: Settings) -> tuple[int, int]:
    """The aspect ratio at about `pixels` pixels, each side a multiple of `multiple`, within the server's caps."""
    a, b = (int(p) for p in aspect_ratio.split(":"))
    pixels = min(pixels, settings.max_output_pixels)
    width = math.sqrt(pixels * a / b)
    height = width * b / a
    scale = min(1.0, settings.max_width / width, settings.max_height / height)
    width, height = width * scale, height * scale

    def fit(value: float, limit: int) -> int:
        most = max(multiple, limit // multiple * multiple)
        return max(multiple, min(round(value / multiple) * multiple, most))

    w, h = fit(width, settings.max_width), fit(height, settings.max_height)
    while w * h > settings.max_output_pixels and max(w, h) > multiple:  # rounding up went past the pixel cap
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h


@dataclass(frozen=True)
class UpscalePlan:
    """Gemini `image_size: 4K` beyond the server's caps: made at `generate`, resized to `output`."""

    generate: tuple[int, int]
    output: tuple[int, int]


def gemini_4k(aspect_ratio: str, spec: ModelSpec, settings: Settings) -> UpscalePlan | None:
    """None when the caps (max_width, max_height, max_output_pixels) allow 4K itself: the model makes it. Otherwise
    the model makes the ratio at its own default pixel count (models.yaml defaults, within the caps) and the image is
    upscaled to 4K: 4096^2 pixels at the ratio, sides multiples of 16 (1:1 is 4096x4096). Only this option passes the
    caps, and only by upscaling, so the GPU never runs a 4K denoising pass the operator did not allow."""
    a, b = (int(p) for p in aspect_ratio.split(":"))
    width = math.sqrt(IMAGE_SIZE_PIXELS["4K"] * a / b)
    output = (
        round(width / FOUR_K_MULTIPLE) * FOUR_K_MULTIPLE,
        round(width * b / a / FOUR_K_MULTIPLE) * FOUR_K_MULTIPLE,
    )
    if gemini_size(aspect_ratio, "4K", spec.size_multiple, settings) == output:
        return None
    model_pixels = spec.defaults.width * spec.defaults.height
    return UpscalePlan(size_at_pixels(aspect_ratio, model_pixels, spec.size_multiple, settings), output)


def quality_steps(quality: str, spec: ModelSpec, settings: Settings) -> int:
    """gpt-image quality -> steps: the model's default steps times the configured factor, within 1..max_steps."""
    factor = settings.gpt_image_quality_steps.get(quality, 1.0)
    return max(1, min(round(spec.defaults.steps * factor), settings.max_steps))
