"""A1111 `script_name` / `script_args` for the built-in img2img scripts that need no extra model: "SD upscale",
"Outpainting mk2", "Poor man's outpainting". Their argument lists (order, defaults, labels as /script-info reports
them), the checks that name `script_args[i]`, and the glue that runs a script's jobs through the engine. The work
itself is server.img2img_scripts.

A1111 matches `script_name` case-insensitively against the titles and lists the names lowercased; any other name
is its 422 "Script '<name>' not found". Missing trailing arguments take their defaults; more than the script has
are refused.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import Request
from PIL import Image

from pipelines.engine_api import EngineClient, JobHandle
from pipelines.errors import JobCancelled
from pipelines.request import GenerationRequest, GenerationResult
from pipelines.script_geometry import expansion, grid_shape
from server.api.a1111 import extras
from server.api.a1111.catalog import BUILTIN_UPSCALERS
from server.api.a1111.schemas import GenerationBase, Img2ImgRequest
from server.errors import ApiError, FieldError
from server.img2img_scripts import (
    DIRECTIONS,
    OutpaintingMk2Args,
    PoorMansArgs,
    ScriptResult,
    SDUpscaleArgs,
    outpainting_mk2,
    poor_mans_outpainting,
    sd_upscale,
)
from server.jobs.http import cancel_on_disconnect
from server.settings import Settings

SD_UPSCALE, MK2, POOR_MAN = "SD upscale", "Outpainting mk2", "Poor man's outpainting"
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
SCRIPT_ARGS = "script_args"

# /script-info: each control as A1111 reports it (label, value, minimum, maximum, step, choices), in script_args order.
_SD_UPSCALE_INFO = (
    '<p style="margin-bottom:0.75em">Will upscale the image by the selected scale factor; use width and height '
    "sliders to set tile size</p>"
)
_MK2_INFO = (
    '<p style="margin-bottom:0.75em">Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, '
    "Denoising strength: 0.8</p>"
)


def _arg(label: str = "", value: Any = None, minimum: Any = None, maximum: Any = None, step: Any = None,
         choices: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"label": label, "value": value, "minimum": minimum, "maximum": maximum, "step": step, "choices": choices}


_DIRECTION_ARG = _arg("Outpainting direction", list(DIRECTIONS), choices=list(DIRECTIONS))
SCRIPT_INFO_ARGS: dict[str, list[dict[str, Any]]] = {
    SD_UPSCALE: [
        _arg("", _SD_UPSCALE_INFO),
        _arg("Tile overlap", 64, 0, 256, 16),
        _arg("Upscaler", BUILTIN_UPSCALERS[0], choices=list(BUILTIN_UPSCALERS)),
        _arg("Scale Factor", 2.0, 1.0, 4.0, 0.05),
    ],
    MK2: [
        _arg("", _MK2_INFO),
        _arg("Pixels to expand", 128, 8, 256, 8),
        _arg("Mask blur", 8, 0, 64, 1),
        _DIRECTION_ARG,
        _arg("Fall-off exponent (lower=higher detail)", 1.0, 0.0, 4.0, 0.01),
        _arg("Color variation", 0.05, 0.0, 1.0, 0.01),
    ],
    POOR_MAN: [
        _arg("Pixels to expand", 128, 8, 256, 8),
        _arg("Mask blur", 4, 0, 64, 1),
        _arg("Masked content", "fill", choices=list(MASKED_CONTENT)),
        _DIRECTION_ARG,
    ],
}
TITLES = {title.lower(): title for title in SCRIPT_INFO_ARGS}


def names() -> dict[str, list[str]]:
    """/scripts: A1111 lists the selectable scripts by lowercased title; none of these is a txt2img script."""
    return {"txt2img": [], "img2img": list(TITLES)}


def script_info() -> list[dict[str, Any]]:
    """/script-info: A1111's `ScriptInfo` of each script."""
    return [
        {"name": title.lower(), "is_alwayson": False, "is_img2img": True, "args": args}
        for title, args in SCRIPT_INFO_ARGS.items()
    ]


# Arguments ------------------------------------------------------------------------------------------------------------

ScriptArgs = SDUpscaleArgs | OutpaintingMk2Args | PoorMansArgs


class _Bad(Exception):
    def __init__(self, index: int, message: str):
        self.error = FieldError(f"{SCRIPT_ARGS}[{index}]", message)


def _number(value: Any, index: int, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Bad(index, f"{label}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _Bad(index, f"{label}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _Bad(index, f"{label}: must be a finite number")
    return number


def _int(value: Any, index: int, label: str, lo: int, hi: int | None = None) -> int:
    number = int(_number(value, index, label))
    if number < lo or (hi is not None and number > hi):
        raise _Bad(index, f"{label}: must be between {lo} and {hi}" if hi is not None else f"{label}: must be >= {lo}")
    return number


def _float(value: Any, index: int, label: str, lo: float, hi: float | None = None, *, above: bool = False) -> float:
    number = _number(value, index, label)
    if (number <= lo if above else number < lo) or (hi is not None and number > hi):
        bound = f"above {lo:g}" if above else f"at least {lo:g}"
        raise _Bad(index, f"{label}: must be {bound}" + (f" and at most {hi:g}" if hi is not None else ""))
    return number


def _choice(value: Any, index: int, label: str, choices: tuple[str, ...]) -> str:
    """An index into `choices` (what A1111's radio of type "index" passes) or one of them by name."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        for choice in choices:
            if choice.lower() == value.strip().lower():
                return choice
        raise _Bad(index, f"{label}: {value!r} is not one of {', '.join(choices)}")
    i = int(_number(value, index, label))
    if not 0 <= i < len(choices):
        raise _Bad(index, f"{label}: index {i} out of range; one of 0..{len(choices) - 1} ({', '.join(choices)})")
    return choices[i]


def _directions(value: Any, index: int) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise _Bad(index, f"Outpainting direction: expected a list of {', '.join(DIRECTIONS)}, got {value!r}")
    unknown = [v for v in items if v not in DIRECTIONS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise _Bad(index, f"Outpainting direction: unknown {names}; one of {', '.join(DIRECTIONS)}")
    if not items:
        raise _Bad(index, "Outpainting direction: choose at least one of " + ", ".join(DIRECTIONS))
    return tuple(d for d in DIRECTIONS if d in items)


def _with_defaults(title: str, sent: list[Any]) -> list[Any]:
    defaults = [a["value"] for a in SCRIPT_INFO_ARGS[title]]
    if len(sent) > len(defaults):
        raise _Bad(len(defaults), f"{title} takes {len(defaults)} arguments, {len(sent)} were sent")
    return list(sent) + defaults[len(sent) :]


def _parse(title: str, sent: list[Any], body: GenerationBase) -> ScriptArgs:
    a = _with_defaults(title, sent)
    if title == SD_UPSCALE:
        overlap = _int(a[1], 1, "Tile overlap", 0)
        tile = min(body.width, body.height)
        if overlap >= tile:
            raise _Bad(1, f"Tile overlap: must be smaller than the tile (width x height = {body.width}x{body.height})")
        upscaler = _choice(a[2], 2, "Upscaler", BUILTIN_UPSCALERS)
        return SDUpscaleArgs(overlap, upscaler, _float(a[3], 3, "Scale Factor", 0.0, 8.0, above=True))
    if title == MK2:
        return OutpaintingMk2Args(
            pixels=_int(a[1], 1, "Pixels to expand", 1),
            mask_blur=_int(a[2], 2, "Mask blur", 0, 64),
            directions=_directions(a[3], 3),
            noise_q=_float(a[4], 4, "Fall-off exponent (lower=higher detail)", 0.0),
            color_variation=_float(a[5], 5, "Color variation", 0.0, 1.0),
        )
    pixels = _int(a[0], 0, "Pixels to expand", 1)
    if pixels >= min(body.width, body.height):  # it is the tiles' overlap
        raise _Bad(0, f"Pixels to expand: must be smaller than the tile (width x height = {body.width}x{body.height})")
    return PoorMansArgs(
        pixels=pixels,
        mask_blur=_int(a[1], 1, "Mask blur", 0, 64),
        inpainting_fill=MASKED_CONTENT.index(_choice(a[2], 2, "Masked content", MASKED_CONTENT)),
        directions=_directions(a[3], 3),
    )


@dataclass(frozen=True)
class Selected:
    title: str
    args: ScriptArgs


def select(body: GenerationBase) -> tuple[Selected | None, list[FieldError]]:
    """The script the request names with its parsed arguments, or the errors naming `script_name` / `script_args[i]`.
    (None, []) when no script is named."""
    if not body.script_name:
        return None, []
    title = TITLES.get(body.script_name.strip().lower()) if isinstance(body, Img2ImgRequest) else None
    if title is None:
        return None, [FieldError("script_name", f"Script '{body.script_name}' not found")]
    try:
        return Selected(title, _parse(title, list(body.script_args), body)), []
    except _Bad as e:
        return None, [e.error]


# Sizes ----------------------------------------------------------------------------------------------------------------


def _upscale_plan(image: Image.Image, args: SDUpscaleArgs) -> extras.Plan:
    """What A1111's `Upscaler.upscale` makes of the image: the scale, then the size floored to a multiple of 8."""
    w, h = image.size
    dest = (int((w * args.scale_factor) // 8 * 8), int((h * args.scale_factor) // 8 * 8))
    return extras.Plan(args.scale_factor, dest, None, {})


def upscaler_for(args: SDUpscaleArgs) -> Callable[[Image.Image], Image.Image]:
    """A1111 leaves the image as it is for the "None" upscaler; the others are extras' built-ins."""
    if args.upscaler == "None":
        return lambda image: image
    return lambda image: extras.upscale(image, args.upscaler, _upscale_plan(image, args))


def check_sizes(selected: Selected, request: GenerationRequest, settings: Settings) -> None:
    """Before any image is made from the decoded init image: 422 naming the script argument when the script's image
    would be empty or larger than max_width x max_height (or max_work_pixels), or need more than max_script_jobs."""
    init = request.init_images[0]
    args = selected.args
    if isinstance(args, SDUpscaleArgs):
        index, label = 3, "Scale Factor"
        size = _upscale_plan(init, args).upscaled if args.upscaler != "None" else init.size
        # the upscaler's own output, before the resize to the size floored to 8, is the largest image made
        largest = (int(init.width * args.scale_factor), int(init.height * args.scale_factor))
    else:
        index, label = (1, "Pixels to expand") if isinstance(args, OutpaintingMk2Args) else (0, "Pixels to expand")
        w, h = expansion(init.width, init.height, args.pixels, set(args.directions)).size(init.width, init.height)
        size = largest = (math.ceil(w / 64) * 64, math.ceil(h / 64) * 64)  # mk2's working canvas
    w, h = size
    what = f"the init image ({init.width}x{init.height}) would become {w}x{h}"
    if w < 8 or h < 8:
        _too_big(index, label, f"{what} pixels")
    if w > settings.max_width or h > settings.max_height:
        _too_big(index, label, f"{what}, over max_width={settings.max_width} / max_height={settings.max_height}")
    if max(w * h, largest[0] * largest[1]) > settings.max_work_pixels:
        pixels = max(w * h, largest[0] * largest[1])
        _too_big(index, label, f"{what} ({pixels} pixels on the way), over max_work_pixels={settings.max_work_pixels}")
    if isinstance(args, SDUpscaleArgs):
        cols, rows = grid_shape(w, h, request.width, request.height, args.overlap)
        jobs = request.n_iter * math.ceil(cols * rows / max(request.batch_size, 1))
    elif isinstance(args, PoorMansArgs):  # at most one job per tile (those inside the picture are skipped)
        cols, rows = grid_shape(w, h, request.width, request.height, args.pixels)
        jobs = cols * rows
    else:
        return  # mk2: one job per direction and n_iter
    if jobs > settings.max_script_jobs:
        tiles = f"{w}x{h} in {request.width}x{request.height} tiles ({cols} x {rows})"
        _too_big(index, label, f"{tiles} makes {jobs} jobs, more than max_script_jobs={settings.max_script_jobs}")


def _too_big(index: int, label: str, message: str) -> None:
    field = f"{SCRIPT_ARGS}[{index}]"
    raise ApiError(422, f"{field}: {label}: {message}", field=field, code="invalid_request")


def output_count(selected: Selected, body: GenerationBase) -> int:
    """How many images the script answers with (what the credits are held for)."""
    if selected.title == SD_UPSCALE:
        return body.n_iter
    if selected.title == MK2:
        return body.batch_size * body.n_iter
    return 1


def returns_grid(selected: Selected, count: int, options: dict[str, Any]) -> bool:
    """Outpainting mk2 puts its own grid first (`return_grid`, and more than one picture unless
    `grid_only_if_multiple` is off), whatever save_images says; the other two never return one."""
    if selected.title != MK2 or not options.get("return_grid", True):
        return False
    return count >= 2 or not options.get("grid_only_if_multiple", True)


# Running --------------------------------------------------------------------------------------------------------------


def runner(selected: Selected, multiple: int) -> Callable[[GenerationRequest, Callable], ScriptResult]:
    args = selected.args
    if isinstance(args, SDUpscaleArgs):
        return lambda base, execute: sd_upscale(base, args, upscaler_for(args), execute)
    if isinstance(args, OutpaintingMk2Args):
        return lambda base, execute: outpainting_mk2(base, args, execute, multiple)
    return lambda base, execute: poor_mans_outpainting(base, args, execute)


async def run(request: Request, engine: EngineClient, selected: Selected, base: GenerationRequest, multiple: int,
              timeout_s: float) -> ScriptResult:  # fmt: skip
    """Run the script on a worker thread; each of its jobs is submitted to the engine and awaited on the event loop.
    A client that hangs up cancels the job running and the rest of the script; past `timeout_s` the job running is
    cancelled and TimeoutError raised."""
    deadline = time.monotonic() + timeout_s
    current: list[JobHandle] = []
    cancelled = threading.Event()

    async def submit_and_wait(req: GenerationRequest) -> GenerationResult:
        if cancelled.is_set():
            raise JobCancelled("the client disconnected")
        job = engine.submit(req)
        current[:] = [job]
        try:
            return await job.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            job.cancel()
            raise

    def execute(req: GenerationRequest) -> GenerationResult:
        return anyio.from_thread.run(submit_and_wait, req)

    def cancel() -> None:
        cancelled.set()
        for job in current:
            job.cancel()

    work = runner(selected, multiple)
    async with cancel_on_disconnect(request, cancel):
        return await anyio.to_thread.run_sync(work, base, execute)
