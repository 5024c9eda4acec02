"""Image preparation around img2img / inpainting pipelines, reproducing A1111 in pixel space.

Sources: A1111 v1.10 `modules/images.py` (resize_image, flatten), `modules/masking.py` (get_crop_region_v2,
expand_crop_region, fill), `modules/processing.py` (create_binary_mask, StableDiffusionProcessingImg2Img.init,
apply_overlay). Pillow and numpy only (no torch, no cv2), so the HTTP side could use it too.

Approximations, all in pixel space because diffusers' inpaint pipelines take a picture and a mask, not latents:
- inpainting_fill 2 ("latent noise") and 3 ("latent nothing"): A1111 runs the same pixel `fill` as for 0 and then
  replaces the masked latents with noise / zeros. We do the pixel fill only; the pipeline's own masked-latent
  handling (strength) stands in for the latent step.
- (not an approximation) the mask blur reproduces cv2.GaussianBlur's fixed-point 8-bit path bit for bit.
- the final composite is a plain alpha blend; A1111 goes through Pillow's premultiplied "RGBa" mode, which rounds
  differently where the mask is partly transparent. Pixels outside the mask are the original's, exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipelines.errors import InvalidRequest
from pipelines.request import GenerationRequest, InpaintOptions, Task

LANCZOS = Image.Resampling.LANCZOS
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), PIL crop convention

# --------------------------------------------------------------------------------------------------------------------
# Work-size bounds: every image made from an input is sized before it is allocated. A 1x2000 PNG is 91 bytes, but
# "crop and resize" to 512x512 scales it to cover the frame first: 512x1024000 pixels, 2 GiB.
# --------------------------------------------------------------------------------------------------------------------

Size = tuple[int, int]


def _cover_size(src: Size, width: int, height: int) -> Size:
    """The size `_crop_and_resize` scales `src` to before cutting out width x height (A1111's arithmetic)."""
    sw, sh = src
    ratio, src_ratio = width / height, sw / sh
    return (width if ratio > src_ratio else sw * height // sh, height if ratio <= src_ratio else sh * width // sw)


def resize_work_pixels(src: Size, width: int, height: int, resize_mode: int = 0) -> int:
    """The largest image `resize_image(src -> width x height, resize_mode)` allocates, in pixels. Mode 2 fits
    inside the frame, so only mode 1 (cover, then crop) can make more than the output."""
    out = width * height
    if resize_mode == 1 and src[0] > 0 and src[1] > 0:
        w, h = _cover_size(src, width, height)
        return max(out, w * h)
    return out


def check_work(pixels: int, max_pixels: int | None, field: str, what: str) -> None:
    """InvalidRequest (422 naming `field`) when an intermediate image would exceed `max_pixels`."""
    if max_pixels is not None and pixels > max_pixels:
        raise InvalidRequest(
            field,
            f"{what} would make an intermediate image of {pixels} pixels, above max_work_pixels={max_pixels}; "
            "send an image closer to the output's aspect ratio or use resize_mode 0 or 2",
        )


def check_request_work(req: GenerationRequest, max_pixels: int | None) -> None:
    """Every intermediate image the preparation of `req` will make whose size is known from the sizes alone
    (resizing each init image and the mask); "only masked" inpainting checks its crop when the mask is read."""
    if max_pixels is None or req.task not in (Task.IMG2IMG, Task.INPAINT, Task.EDIT):
        return
    mode = req.resize_mode
    for i, im in enumerate(req.init_images):
        what = f"resizing init image {i} ({im.width}x{im.height}) to {req.width}x{req.height} (mode {mode})"
        check_work(resize_work_pixels(im.size, req.width, req.height, mode), max_pixels, "init_images", what)
    if req.task == Task.INPAINT and req.mask is not None and not (req.inpaint and req.inpaint.full_res):
        mode = 0 if mode == 3 else mode
        what = f"resizing the mask ({req.mask.width}x{req.mask.height}) to {req.width}x{req.height} (mode {mode})"
        check_work(resize_work_pixels(req.mask.size, req.width, req.height, mode), max_pixels, "mask", what)


PRESIZE_MIN_PIXELS = 1024 * 1024  # inputs below this stay as they are: the saving would not matter


def presize_inputs(req: GenerationRequest) -> GenerationRequest:
    """`req` with large img2img / edit inputs already resized to the output, exactly as the engine's preparation
    would (the engine's own resize of an image already at the output size is then a copy): a queued job holds
    output-sized images, not the 4096x4096 inputs it was sent. Inpainting keeps its inputs (the result is pasted
    back into the original)."""
    if req.task not in (Task.IMG2IMG, Task.EDIT) or not needs_presize(req):
        return req
    images = [resize_image(flatten(im), req.width, req.height, req.resize_mode) for im in req.init_images]
    return dataclasses.replace(req, init_images=images)


def needs_presize(req: GenerationRequest) -> bool:
    out = req.width * req.height
    return req.task in (Task.IMG2IMG, Task.EDIT) and any(
        im.width * im.height > max(out, PRESIZE_MIN_PIXELS) for im in req.init_images
    )


# --------------------------------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------------------------------


def resize_image(img: Image.Image, width: int, height: int, resize_mode: int = 0) -> Image.Image:
    """A1111 `images.resize_image` without upscalers (LANCZOS).

    0 just resize; 1 crop and resize (fill the frame, centre, cut the excess); 2 resize and fill (fit inside,
    centre, stretch the edge rows/columns into the bands); 3 "latent upscale" is a latent-space resize in A1111 and
    is treated as 0 here. The canvas keeps the input's mode (A1111 always makes RGB, which turns masks into RGB).
    """
    if resize_mode == 1:
        return _crop_and_resize(img, width, height)
    if resize_mode == 2:
        return _resize_and_fill(img, width, height)
    return img.resize((width, height), resample=LANCZOS)


def _crop_and_resize(img: Image.Image, width: int, height: int) -> Image.Image:
    src_w, src_h = _cover_size(img.size, width, height)
    resized = img.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new(img.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def _resize_and_fill(img: Image.Image, width: int, height: int) -> Image.Image:
    ratio, src_ratio = width / height, img.width / img.height
    # At least 1 px: a sliver (1x2000 into 64x64) would otherwise round to a 0-pixel image, which Pillow refuses.
    src_w = width if ratio < src_ratio else max(1, img.width * height // img.height)
    src_h = height if ratio >= src_ratio else max(1, img.height * width // img.width)
    resized = img.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new(img.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    # The bands are the image's first/last row (or column) stretched: a zero-height box samples just that edge.
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            res.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            edge = (0, resized.height, width, resized.height)
            res.paste(resized.resize((width, band), box=edge), box=(0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            res.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            edge = (resized.width, 0, resized.width, height)
            res.paste(resized.resize((band, height), box=edge), box=(band + src_w, 0))
    return res


def flatten(img: Image.Image, background: str = "#ffffff") -> Image.Image:
    """A1111 `images.flatten`: transparency over `background` (opts.img2img_background_color), returned as RGB."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------------


def binarize_mask(mask: Image.Image) -> Image.Image:
    """A1111 `create_binary_mask(round=True)`: a mask with real transparency is its alpha channel, thresholded
    (> 128 -> 255, as A1111 writes it); anything else is `convert("L")` with its grey levels kept (A1111 rounds
    those later, in latent space; diffusers' mask processor binarizes at 0.5 the same way)."""
    if mask.mode in ("LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """cv2's bit-exact 8-bit Gaussian kernel (getGaussianKernelBitExact + getGaussianKernelFixedPoint_ED) for
    A1111's size 2*int(2.5*sigma + 0.5) + 1: integer weights in 1/256 summing to 256, rounded with error diffusion."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    half = size // 2
    x = np.arange(1 - size, 1 - size + 2 * half, 2, dtype=np.float64)  # 2 * offset from the centre
    side = np.exp((x * x) * (-0.125 / (sigma * sigma)))
    side = side / (2 * side.sum() + 1.0)
    weights = np.zeros(size, dtype=np.int64)
    err = 0.0
    for i, v in enumerate(side):
        adj = v * 256 + err
        q = int(np.rint(adj))  # cvRound: half to even
        err = adj - q
        weights[i] = weights[size - 1 - i] = q
    weights[half] = 256 - 2 * int(weights[:half].sum())
    return weights


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """cv2.GaussianBlur on uint8 with a 1-D kernel along `axis`, bit for bit: BORDER_REFLECT_101 (numpy "reflect"),
    fixed-point weights, result rounded half up from 1/256 units.

    Convolution by FFT (exact after rounding, the true sums are integers): the kernel reaches 321 taps at
    mask_blur 64, too slow as a loop over big masks.
    """
    w = _gaussian_kernel(sigma)
    r = len(w) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    padded = np.pad(a.astype(np.float64), pad, mode="reflect")
    size = padded.shape[axis] + 2 * r  # room for the full linear convolution
    shape = [1, 1]
    shape[axis] = -1
    spectrum = np.fft.rfft(padded, size, axis=axis) * np.fft.rfft(w.astype(np.float64), size).reshape(shape)
    full = np.rint(np.fft.irfft(spectrum, size, axis=axis)).astype(np.int64)
    sums = np.take(full, np.arange(2 * r, 2 * r + a.shape[axis]), axis=axis)  # the "valid" part
    return np.clip((sums + 128) >> 8, 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a horizontal then a vertical Gaussian pass with sigma = blur (0 = off).

    Only the mask's bounding box grown by the kernel radii is processed: the blur of an all-zero area is zero, and
    the zero margin left inside the cut makes the reflected border equal to the true (zero) neighbours. Bit-exact
    with A1111's two cv2 passes.
    """
    blur_y = blur_x if blur_y is None else blur_y
    box = mask.getbbox()
    if box is None or (blur_x <= 0 and blur_y <= 0):
        return mask
    # radius + 1: reflect-101 mirrors the r pixels *after* the edge one, which must all be zero too
    rx = len(_gaussian_kernel(blur_x)) // 2 + 1 if blur_x > 0 else 0
    ry = len(_gaussian_kernel(blur_y)) // 2 + 1 if blur_y > 0 else 0
    x1, y1 = max(box[0] - rx, 0), max(box[1] - ry, 0)
    x2, y2 = min(box[2] + rx, mask.width), min(box[3] + ry, mask.height)
    region = np.asarray(mask.crop((x1, y1, x2, y2)), dtype=np.uint8)
    if blur_x > 0:
        region = _blur_axis(region, blur_x, axis=1)
    if blur_y > 0:
        region = _blur_axis(region, blur_y, axis=0)
    out = Image.new("L", mask.size, 0)
    out.paste(Image.fromarray(region, mode="L"), (x1, y1))
    return out


def get_crop_region(mask: Image.Image, pad: int = 0) -> Box | None:
    """A1111 `masking.get_crop_region_v2`: bounding box of the non-zero mask grown by `pad`; None if all black."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(region: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """A1111 `masking.expand_crop_region`: grow the region to the processing aspect ratio, staying in the image."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow_segment(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_segment(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_segment(c1: int, c2: int, diff: int, limit: int) -> tuple[int, int]:
    c1 -= diff // 2
    c2 += diff - diff // 2
    if c2 >= limit:  # shift back inside, then clamp what still sticks out
        c1 -= c2 - limit
        c2 = limit
    if c1 < 0:
        c2 -= c1
        c1 = 0
    return c1, min(c2, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 `masking.fill`: paint the masked area with colours blurred in from its surroundings."""
    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Inpainting
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedInpaint:
    """What the pipeline gets (`image`, `mask`: width x height, white = repaint) and how to put results back.

    `output_size` is the size `finish` returns: width x height for "whole picture", the original init image's size
    for "only masked" (full_res), as in A1111, where only the crop is processed at width x height.
    `mask_empty` is True when nothing is to be repainted (all-black mask): `finish` then returns the (resized)
    original, so a caller may skip the pipeline call altogether.
    """

    image: Image.Image
    mask: Image.Image
    mask_empty: bool = False
    crop_region: Box | None = None  # full_res: where the processed crop goes back in the original
    canvas: Image.Image | None = field(default=None, repr=False)  # the picture results are composited onto
    overlay_mask: Image.Image | None = field(default=None, repr=False)  # canvas-sized; white = take the result
    composite: bool = True

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.canvas or self.image).size

    def finish(self, results: Sequence[Image.Image]) -> list[Image.Image]:
        """A1111 `apply_overlay` for each result: paste the crop back (full_res), keep the original outside the
        (blurred) mask."""
        return [self._finish_one(r) for r in results]

    def _finish_one(self, result: Image.Image) -> Image.Image:
        result = result.convert("RGB")
        if result.size != self.image.size:  # a pipeline that rounded the size down to its multiple
            result = result.resize(self.image.size, resample=LANCZOS)
        canvas = self.canvas if self.canvas is not None else self.image
        if self.crop_region is not None:
            x1, y1, x2, y2 = self.crop_region
            pasted = canvas.copy()
            pasted.paste(resize_image(result, x2 - x1, y2 - y1, 1), (x1, y1))
            result = pasted
        if not self.composite or self.overlay_mask is None:
            return result
        return composite_over(canvas, result, self.overlay_mask)


def composite_over(original: Image.Image, result: Image.Image, mask: Image.Image) -> Image.Image:
    """`result` where the mask is white, `original` where it is black, blended in between (exact at both ends)."""
    orig = np.asarray(original.convert("RGB"), dtype=np.uint32)
    gen = np.asarray(result.convert("RGB"), dtype=np.uint32)
    m = np.asarray(mask.convert("L"), dtype=np.uint32)[..., None]
    out = (gen * m + orig * (255 - m) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def prepare_inpaint(
    init: Image.Image,
    mask: Image.Image,
    width: int,
    height: int,
    opts: InpaintOptions,
    resize_mode: int = 0,
    max_pixels: int | None = None,
) -> PreparedInpaint:
    """A1111 `StableDiffusionProcessingImg2Img.init` for one init image with a mask, in pixel space. Intermediate
    images above `max_pixels` are refused (InvalidRequest) before they are made."""
    image = flatten(init)
    mask = binarize_mask(mask)
    if opts.invert:
        mask = ImageOps.invert(mask)
    if opts.full_res and mask.size != image.size:
        mask = mask.resize(image.size, resample=LANCZOS)  # the crop region must mean the same pixels in both
    mask = blur_mask(mask, opts.mask_blur, opts.mask_blur_y)
    region = get_crop_region(mask, opts.full_res_padding) if opts.full_res else None
    if region is not None:
        prepared = _prepare_only_masked(image, mask, region, width, height, max_pixels)
    else:
        # Also A1111's fallback when "only masked" gets a blank mask (it then switches to whole-picture img2img).
        prepared = _prepare_whole_picture(image, mask, width, height, 0 if resize_mode == 3 else resize_mode)
    if opts.inpainting_fill != 1:  # A1111 fills for 0, and for 2/3 before replacing the masked latents
        prepared.image = fill(prepared.image, prepared.mask)
    prepared.composite = opts.composite_original
    return prepared


def _prepare_whole_picture(
    image: Image.Image, mask: Image.Image, width: int, height: int, resize_mode: int
) -> PreparedInpaint:
    work_image = resize_image(image, width, height, resize_mode)
    work_mask = resize_image(mask, width, height, resize_mode)
    # A1111 doubles the blurred mask for the overlay, so the result shows through the whole blurred edge.
    overlay = work_mask.point(lambda v: min(2 * v, 255))
    return PreparedInpaint(
        image=work_image,
        mask=work_mask,
        mask_empty=work_mask.getbbox() is None,
        canvas=work_image,
        overlay_mask=overlay,
    )


def _prepare_only_masked(
    image: Image.Image, mask: Image.Image, region: Box, width: int, height: int, max_pixels: int | None = None
) -> PreparedInpaint:
    region = expand_crop_region(region, width, height, mask.width, mask.height)
    # `finish` covers the region with the width x height result ("crop and resize"): a thin region stuck to the
    # image's edge would scale it far past both sizes.
    rw, rh = region[2] - region[0], region[3] - region[1]
    what = f"pasting the {width}x{height} result back into the {rw}x{rh} masked region"
    check_work(resize_work_pixels((width, height), rw, rh, 1), max_pixels, "init_images", what)
    return PreparedInpaint(
        image=resize_image(image.crop(region), width, height, 2),
        mask=resize_image(mask.crop(region), width, height, 2),
        crop_region=region,
        canvas=image,
        overlay_mask=mask,
    )
