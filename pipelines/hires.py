"""A1111 hires fix: the second pass's size, and how the first pass is upscaled. Pure Python (no torch), so the
HTTP side can validate and report the same numbers the engine uses."""

from __future__ import annotations

from dataclasses import dataclass

# A1111 `shared.latent_upscale_modes`: name -> torch interpolate mode and antialias flag.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel-space upscalers we ship (A1111's built-ins); "None" resizes with Lanczos too, as A1111's upscaler "None" does
# for a hires pass.
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
HIRES_UPSCALERS = (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS)


@dataclass(frozen=True)
class HiresOptions:
    """`enable_hr` fields of an A1111 txt2img request."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    second_pass_steps: int = 0  # 0 = the first pass's step count
    denoising_strength: float = 0.7

    @property
    def is_latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALE_MODES


@dataclass(frozen=True)
class HiresPlan:
    upscale_to: tuple[int, int]  # size the first pass is upscaled to
    final: tuple[int, int]  # size after A1111's truncation to the requested resize box
    extra_params: dict[str, str | float]  # infotext "Hires upscale" / "Hires resize"


def plan_hires(width: int, height: int, opts: HiresOptions, multiple: int) -> HiresPlan:
    """A1111 `calculate_target_resolution`: scale, or fit the resize box keeping the aspect and crop the overflow.
    Sizes are floored to the model's multiple, as every other size Easel passes to diffusers."""

    def floor(v: int) -> int:
        return max(multiple, v // multiple * multiple)

    if opts.resize_x == 0 and opts.resize_y == 0:
        to = (int(width * opts.scale), int(height * opts.scale))
        up = (floor(to[0]), floor(to[1]))
        return HiresPlan(up, up, {"Hires upscale": opts.scale})
    extra = {"Hires resize": f"{opts.resize_x}x{opts.resize_y}"}
    if opts.resize_y == 0:
        up = (opts.resize_x, opts.resize_x * height // width)
        target = up
    elif opts.resize_x == 0:
        up = (opts.resize_y * width // height, opts.resize_y)
        target = up
    else:
        target = (opts.resize_x, opts.resize_y)
        if width / height < opts.resize_x / opts.resize_y:
            up = (opts.resize_x, opts.resize_x * height // width)
        else:
            up = (opts.resize_y * width // height, opts.resize_y)
    up = (floor(up[0]), floor(up[1]))
    final = (min(up[0], floor(target[0])), min(up[1], floor(target[1])))
    return HiresPlan(up, final, extra)


def crop_box(upscaled: tuple[int, int], final: tuple[int, int]) -> tuple[int, int, int, int]:
    """A1111 truncates the overflow evenly from both sides (one more on the far side when odd)."""
    dx, dy = upscaled[0] - final[0], upscaled[1] - final[1]
    return (dx // 2, dy // 2, upscaled[0] - (dx + 1) // 2, upscaled[1] - (dy + 1) // 2)
