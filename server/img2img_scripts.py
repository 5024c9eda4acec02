"""A1111's built-in img2img scripts as sequences of ordinary engine jobs: SD upscale (tiled img2img of an upscaled
image), Outpainting mk2 (one inpainting job per direction over matched noise) and Poor man's outpainting (tiled
inpainting of the new borders). Dialect-neutral and torch-free: each runner gets the request as the dialect built
it and an `execute` function that submits one `GenerationRequest` through the engine's normal job path (queue,
batching, limits, progress, interrupt) and waits for it. The geometry is `pipelines.script_geometry`.

Sources: A1111 v1.10 scripts/sd_upscale.py, scripts/outpainting_mk_2.py, scripts/poor_mans_outpainting.py.
Approximation: A1111 gives the outpainting jobs a second, sharper `latent_mask` for the latent blend; the engine's
inpainting has one mask, so the (blurred) image mask does both.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from pipelines.request import GenerationRequest, GenerationResult, InpaintOptions, Task
from pipelines.script_geometry import Grid, combine_grid, expansion, matched_noise_image, split_grid

Execute = Callable[[GenerationRequest], GenerationResult]
Box = tuple[int, int, int, int]
RANDOM_SEED_RANGE = 4294967294  # A1111 processing.get_fixed_seed
DIRECTIONS = ("left", "right", "up", "down")


@dataclass
class ScriptResult:
    """What a script made: its images, one seed per image, the first job's result (sampler, model, steps...),
    the infotext keys it adds, and whether an interrupt cut it short."""

    images: list[Image.Image]
    seeds: list[int]
    first: GenerationResult
    extra_params: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0
    interrupted: bool = False
    # The "Size" A1111 reports: the script's `p.width x p.height`, i.e. the (last) job's size, not the picture's.
    reported_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SDUpscaleArgs:
    overlap: int = 64
    upscaler: str = "None"
    scale_factor: float = 2.0


@dataclass(frozen=True)
class OutpaintingMk2Args:
    pixels: int = 128
    mask_blur: int = 8
    directions: tuple[str, ...] = DIRECTIONS
    noise_q: float = 1.0
    color_variation: float = 0.05


@dataclass(frozen=True)
class PoorMansArgs:
    pixels: int = 128
    mask_blur: int = 4
    inpainting_fill: int = 0
    directions: tuple[str, ...] = DIRECTIONS


def _job(base: GenerationRequest, **changes: Any) -> GenerationRequest:
    """One job of a script: the request as sent, with the script's inputs, one call, no hires/refiner pass."""
    changes.setdefault("n_iter", 1)
    changes.setdefault("tags", dict(base.tags))  # each job its own copy
    changes.setdefault("resize_mode", 0)
    return dataclasses.replace(base, **changes)


def _floor(value: int, multiple: int) -> int:
    return max(value // multiple * multiple, multiple)


# SD upscale -----------------------------------------------------------------------------------------------------------


def upscaled_grid(init: Image.Image, base: GenerationRequest, args: SDUpscaleArgs,
                  upscale: Callable[[Image.Image], Image.Image]) -> Grid:  # fmt: skip
    return split_grid(upscale(init), tile_w=base.width, tile_h=base.height, overlap=args.overlap)


def sd_upscale(base: GenerationRequest, args: SDUpscaleArgs, upscale: Callable[[Image.Image], Image.Image],
               execute: Execute) -> ScriptResult:  # fmt: skip
    """A1111 `sd_upscale.Script.run`: the first init image upscaled, cut into width x height tiles overlapping by
    `overlap`, each tile img2img'd with the request's prompt and strength (`batch_size` tiles per job), the tiles
    blended back. `n_iter` upscales, the n-th from seed + n; within one, each job starts one seed after the previous
    job's first seed (A1111's `p.seed = processed.seed + 1`). An interrupt leaves the remaining tiles as upscaled."""
    seed = base.seed if base.seed >= 0 else random.randrange(RANDOM_SEED_RANGE)  # processing.fix_seed
    grid = upscaled_grid(base.init_images[0], base, args, upscale)
    tiles = list(grid)
    size = max(base.batch_size, 1)
    images, first, jobs, stopped = [], None, 0, False
    for n in range(base.n_iter):
        next_seed = seed + n
        done: list[Image.Image] = []
        for i in range(0, len(tiles), size):
            if stopped:
                break
            batch = [t.image for t in tiles[i : i + size]]
            result = execute(_job(base, task=Task.IMG2IMG, init_images=batch, batch_size=len(batch),
                                  seed=next_seed, mask=None, hires=None))  # fmt: skip
            jobs += 1
            first = first or result
            next_seed = (result.seeds[0] if result.seeds else next_seed) + 1
            done += result.images
            stopped = result.interrupted
        for tile, image in zip(tiles, done, strict=False):
            tile.image = image
        images.append(combine_grid(grid))
        if stopped:
            break
    assert first is not None  # a grid has at least one tile
    extra = {"SD upscale overlap": args.overlap, "SD upscale upscaler": args.upscaler}
    seeds = [seed + n for n in range(len(images))]
    return ScriptResult(images, seeds, first, extra, jobs, stopped, (base.width, base.height))


# Outpainting mk2 ------------------------------------------------------------------------------------------------------


def outpainting_mk2(base: GenerationRequest, args: OutpaintingMk2Args, execute: Execute, multiple: int = 8
                    ) -> ScriptResult:  # fmt: skip
    """A1111 `outpainting_mk_2.Script.run`: for each direction in turn (left, right, up, down) the picture grows on
    a canvas rounded to 64, the new area is filled with matched noise and inpainted ("original" content, mask blur
    x4 along the expanded axes), at most width (height) pixels of it at a time. `batch_size` pictures per job,
    `n_iter` rounds; every job uses the request's seed, as A1111's does."""
    init = base.init_images[0]
    exp = expansion(init.width, init.height, args.pixels, set(args.directions))
    blur_x = args.mask_blur if exp.left or exp.right else 0
    blur_y = args.mask_blur if exp.up or exp.down else 0
    inpaint = InpaintOptions(
        mask_blur=blur_x * 4, mask_blur_y=blur_y * 4, inpainting_fill=1, full_res=False, composite_original=True
    )
    state: dict[str, Any] = {"first": None, "jobs": 0, "stopped": False, "size": None}

    def expand(pictures: list[Image.Image], pixels: int, side: str) -> list[Image.Image]:
        horiz, vert = side in ("left", "right"), side in ("up", "down")
        ph, pv = (pixels if horiz else 0), (pixels if vert else 0)
        outputs, work, mask = [], [], None
        res_w = res_h = 0
        for picture in pictures:
            res_w, res_h = picture.width + ph, picture.height + pv
            canvas_w, canvas_h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
            canvas = Image.new("RGB", (canvas_w, canvas_h))
            canvas.paste(picture, (ph if side == "left" else 0, pv if side == "up" else 0))
            mask = Image.new("RGB", (canvas_w, canvas_h), "white")
            ImageDraw.Draw(mask).rectangle(
                (
                    pixels + blur_x if side == "left" else 0,
                    pixels + blur_y if side == "up" else 0,
                    canvas_w - pixels - blur_x if side == "right" else res_w,
                    canvas_h - pixels - blur_y if side == "down" else res_h,
                ),
                fill="black",
            )
            noised = matched_noise_image(canvas, mask, args.noise_q, args.color_variation)
            outputs.append(noised)
            # The job covers the new strip and as much of the picture as width (height) allows; floored to what
            # the model takes (A1111's latent floors it to 8 the same way).
            tw = _floor(min(base.width, picture.width + ph), multiple) if horiz else canvas_w
            th = _floor(min(base.height, picture.height + pv), multiple) if vert else canvas_h
            box = (
                0 if side == "left" else canvas_w - tw,
                0 if side == "up" else canvas_h - th,
                tw if side == "left" else canvas_w,
                th if side == "up" else canvas_h,
            )
            mask = mask.crop(box)
            work.append(noised.crop(box))
        assert mask is not None
        result = execute(_job(base, task=Task.INPAINT, init_images=work, mask=mask, inpaint=inpaint,
                              width=mask.width, height=mask.height, batch_size=len(work), hires=None))  # fmt: skip
        state["jobs"] += 1
        state["size"] = (mask.width, mask.height)
        state["first"] = state["first"] or result
        state["stopped"] = result.interrupted
        done = []
        for out, image in zip(outputs, result.images, strict=False):
            at = (0 if side == "left" else out.width - image.width, 0 if side == "up" else out.height - image.height)
            out.paste(image, at)
            done.append(out.crop((0, 0, res_w, res_h)))
        return done

    finished: list[Image.Image] = []
    for _ in range(base.n_iter):
        pictures = [init] * max(base.batch_size, 1)
        for side in DIRECTIONS:
            pixels = getattr(exp, side)
            if pixels > 0 and not state["stopped"]:
                pictures = expand(pictures, pixels, side)
        finished += pictures
        if state["stopped"]:
            break
    first: GenerationResult | None = state["first"]
    if first is None:
        raise ValueError("outpainting mk2 needs at least one direction")  # the dialect checks it first
    start = first.seeds[0] if first.seeds else base.seed
    seeds = [start + i % max(base.batch_size, 1) for i in range(len(finished))]
    extra = {"Mask blur": max(blur_x, blur_y) * 4}
    return ScriptResult(finished, seeds, first, extra, state["jobs"], state["stopped"], state["size"])


# Poor man's outpainting -----------------------------------------------------------------------------------------------


def poor_mans_canvas(init: Image.Image, args: PoorMansArgs) -> tuple[Image.Image, Image.Image, Box]:
    """The expanded canvas (picture pasted, new area black), its inpainting mask (white = new area, the picture's
    edge kept clear by mask_blur * 2 on expanded sides) and the picture's box on it."""
    exp = expansion(init.width, init.height, args.pixels, set(args.directions))
    w, h = exp.size(init.width, init.height)
    canvas = Image.new("RGB", (w, h))
    canvas.paste(init, (exp.left, exp.up))
    mask = Image.new("L", (w, h), "white")
    b = args.mask_blur * 2
    ImageDraw.Draw(mask).rectangle(
        (
            exp.left + (b if exp.left > 0 else 0),
            exp.up + (b if exp.up > 0 else 0),
            w - exp.right - (b if exp.right > 0 else 0),
            h - exp.down - (b if exp.down > 0 else 0),
        ),
        fill="black",
    )
    return canvas, mask, (exp.left, exp.up, w - exp.right, h - exp.down)


def poor_mans_outpainting(base: GenerationRequest, args: PoorMansArgs, execute: Execute) -> ScriptResult:
    """A1111 `poor_mans_outpainting.Script.run`: the canvas cut into width x height tiles overlapping by `pixels`;
    every tile not wholly inside the picture is inpainted on its own (one image, seeds counting up from the first
    job's), then the tiles are blended back. One picture whatever batch_size and n_iter say, as A1111's."""
    canvas, mask, (left, up, right, down) = poor_mans_canvas(base.init_images[0], args)
    grid = split_grid(canvas, tile_w=base.width, tile_h=base.height, overlap=args.pixels)
    masks = split_grid(mask, tile_w=base.width, tile_h=base.height, overlap=args.pixels)
    inpaint = InpaintOptions(mask_blur=args.mask_blur * 2, inpainting_fill=args.inpainting_fill, full_res=False)
    first, jobs, stopped, seed = None, 0, False, base.seed
    for row, mask_row in zip(grid.rows, masks.rows, strict=True):
        for tile, tile_mask in zip(row.tiles, mask_row.tiles, strict=True):
            inside = tile.x >= left and tile.x + tile.width <= right and row.y >= up and row.y + row.height <= down
            if inside or stopped:
                continue
            result = execute(_job(base, task=Task.INPAINT, init_images=[tile.image], mask=tile_mask.image,
                                  inpaint=inpaint, batch_size=1, seed=seed, hires=None))  # fmt: skip
            jobs += 1
            first = first or result
            seed = (result.seeds[0] if result.seeds else seed) + 1
            stopped = result.interrupted
            if result.images:
                tile.image = result.images[0]
    if first is None:
        raise ValueError("poor man's outpainting needs at least one direction")  # the dialect checks it first
    start = first.seeds[0] if first.seeds else base.seed
    extra = {"Mask blur": args.mask_blur * 2}
    return ScriptResult([combine_grid(grid)], [start], first, extra, jobs, stopped, (base.width, base.height))
