"""A1111 extras: `/extra-single-image` and `/extra-batch-images` (`postprocessing.run_extras` with the Upscale
postprocessing script), with the built-in upscalers of `/upscalers` on the CPU. No face-restoration model is
installed: a visibility of 0 is A1111's "off", anything above is refused.

Every size is checked against `max_work_pixels` before it is allocated, and the work runs under the image
preparation limit (server.imagework), off the event loop.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, Field

from server.api.a1111.catalog import BUILTIN_UPSCALERS
from server.api.a1111.infotext import quote
from server.api.a1111.schemas import A1111Model
from server.errors import ApiError, FieldError
from server.images import INFOTEXT_KEY, PNG_COMPRESS_LEVEL, b64, decode_image, encode_image, read_png_info
from server.settings import Settings

# A1111's do_upscale of each built-in; "None" leaves the image as it is (the final resize to size does the work).
RESAMPLE: dict[str, Image.Resampling | None] = {
    "None": None,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
assert set(RESAMPLE) == set(BUILTIN_UPSCALERS)
POSTPROCESSING_KEY = "postprocessing"  # the PNG text chunk A1111 writes the extras infotext to


class ExtrasBaseRequest(A1111Model):
    """A1111 `ExtrasBaseRequest` (v1.10), with its ranges."""

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(2, ge=1, le=8, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="base64 image or data URL")


class FileData(BaseModel):
    data: str = Field(description="base64 image or data URL")
    name: str


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's field name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def check(body: ExtrasBaseRequest) -> None:
    """Refuse what cannot be done, before any image is decoded: face restoration and unknown upscalers."""
    errors = []
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name) > 0:
            errors.append(
                FieldError(name, "no face-restoration model is installed on this server; send 0 (face restoration off)")
            )
    for name in ("upscaler_1", "upscaler_2"):
        if getattr(body, name) not in RESAMPLE:
            errors.append(
                FieldError(
                    name,
                    f"could not find upscaler named {getattr(body, name)!r}; one of: " + ", ".join(BUILTIN_UPSCALERS),
                )  # fmt: skip
            )
    if errors:
        raise ApiError.invalid(errors)


@dataclass
class Plan:
    """What the Upscale script does to one image of `size`."""

    scale: float
    upscaled: tuple[int, int]  # after the upscaler (A1111 floors to a multiple of 8)
    crop_to: tuple[int, int] | None
    info: dict[str, Any]


def plan(body: ExtrasBaseRequest, size: tuple[int, int]) -> Plan | None:
    """A1111 `ScriptPostprocessingUpscale.process`/`upscale` and `Upscaler.upscale`: None when upscaler_1 is "None"
    (A1111 then leaves the image as it is, whatever upscaler_2 says)."""
    if body.upscaler_1 == "None":
        return None
    w, h = size
    info: dict[str, Any] = {}
    crop_to = None
    if body.resize_mode == 1:
        tw, th = body.upscaling_resize_w, body.upscaling_resize_h
        scale = max(tw / w, th / h)
        info["Postprocess upscale to"] = f"{tw}x{th}"
        if body.upscaling_crop:
            crop_to = (tw, th)
            info["Postprocess crop to"] = f"{tw}x{th}"
    else:
        scale = body.upscaling_resize
        info["Postprocess upscale by"] = scale
    upscaled = (int((w * scale) // 8 * 8), int((h * scale) // 8 * 8))
    info["Postprocess upscaler"] = body.upscaler_1
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        info["Postprocess upscaler 2"] = body.upscaler_2
    return Plan(scale, upscaled, crop_to, info)


def check_size(body: ExtrasBaseRequest, p: Plan, size: tuple[int, int], settings: Settings, which: str) -> None:
    """422 naming the size field when an image this would make is empty or larger than max_work_pixels."""
    field = "upscaling_resize_w" if body.resize_mode == 1 else "upscaling_resize"
    first = (int(size[0] * p.scale), int(size[1] * p.scale))  # the upscaler's own output, before the final resize
    for w, h in (first, p.upscaled, p.crop_to or p.upscaled):
        if w < 1 or h < 1:
            raise ApiError(422, f"{field}: {which} would be upscaled to {w}x{h} pixels", field=field)
        if w * h > settings.max_work_pixels:
            raise ApiError(
                422,
                f"{field}: {which} would be upscaled to {w}x{h} = {w * h} pixels, over "
                f"max_work_pixels={settings.max_work_pixels}",
                field=field,
            )


def upscale(image: Image.Image, name: str, p: Plan) -> Image.Image:
    """A1111 `Upscaler.upscale`: the upscaler at `scale` unless the image already covers the size (its loop of up
    to three passes stops after one for these), then a Lanczos resize to the size floored to a multiple of 8."""
    resample = RESAMPLE[name]
    dest = p.upscaled
    if resample is not None and not (image.width >= dest[0] and image.height >= dest[1] and p.scale != 1):
        image = image.resize((int(image.width * p.scale), int(image.height * p.scale)), resample=resample)
    if image.size != dest:
        image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    return image


def process(image: Image.Image, body: ExtrasBaseRequest) -> tuple[Image.Image, str]:
    """One image through the Upscale script: the image and its postprocessing infotext."""
    p = plan(body, image.size)
    if p is None:
        return image, ""
    out = upscale(image, body.upscaler_1, p)
    if p.crop_to is not None:
        cropped = Image.new("RGB", p.crop_to)
        cropped.paste(out, box=(p.crop_to[0] // 2 - out.width // 2, p.crop_to[1] // 2 - out.height // 2))
        out = cropped
    if "Postprocess upscaler 2" in p.info:
        second = upscale(image, body.upscaler_2, p)
        if p.crop_to is not None:
            cropped = Image.new("RGB", p.crop_to)
            cropped.paste(second, box=(p.crop_to[0] // 2 - second.width // 2, p.crop_to[1] // 2 - second.height // 2))
            second = cropped
        if second.mode != out.mode:
            second = second.convert(out.mode)
        out = Image.blend(out, second, body.extras_upscaler_2_visibility)
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in p.info.items() if v is not None)
    return out, text


def plaintext_to_html(text: str) -> str:
    """A1111 `ui_common.plaintext_to_html`."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def encode(image: Image.Image, parameters: str | None, postprocessing: str, options: dict[str, Any]) -> str:
    """A1111 `encode_pil_to_base64`: `samples_format`; a PNG keeps the input's infotext and gains the extras one,
    JPEG/WEBP carry the input's infotext in EXIF."""
    fmt = str(options.get("samples_format") or "png").lower()
    with_info = bool(options.get("enable_pnginfo", True))
    if fmt not in ("jpg", "jpeg", "webp"):
        pnginfo = PngImagePlugin.PngInfo()
        if with_info and parameters:
            pnginfo.add_text(INFOTEXT_KEY, parameters)
        if with_info and postprocessing:
            pnginfo.add_text(POSTPROCESSING_KEY, postprocessing)
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=pnginfo, compress_level=PNG_COMPRESS_LEVEL)
        return b64(buf.getvalue())
    quality = int(options.get("jpeg_quality", 80))
    return b64(encode_image(image, fmt, quality, parameters if with_info else None))


def run(body: ExtrasBaseRequest, sources: Iterable[tuple[str, str]], settings: Settings, options: dict[str, Any]
        ) -> tuple[list[str], str]:  # fmt: skip
    """Decode, check, upscale and encode each (field, base64) in turn, keeping only the encoded results; returns
    them and the html_info of the last image (A1111's)."""
    encoded: list[str] = []
    text = ""
    for field, data in sources:
        image = decode_image(data, field, settings.max_body_bytes, settings.max_image_pixels)
        parameters = read_png_info(image)
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGB")
        p = plan(body, image.size)
        if p is not None:
            check_size(body, p, image.size, settings, f"{field} ({image.width}x{image.height})")
        image, text = process(image, body)
        encoded.append(encode(image, parameters, text, options))
    return encoded, plaintext_to_html(text)
