"""Gateway wire request -> `JobSpec` (a `GenerationRequest` plus how to render its result). Blocking (decoding,
fetching URLs): run in a thread.

Each route runs the model that models.yaml's `routes:` maps it to. Steps and guidance are the model's defaults
(models.yaml `defaults`), except gpt-image's `quality`, which scales the steps.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult, InpaintOptions, Task
from server.api.gateway import sizes
from server.api.gateway.schemas import (
    FluxRequest,
    GatewayRequest,
    GeminiRequest,
    GptImageEditRequest,
    GptImageRequest,
    QwenEditRequest,
    QwenRequest,
)
from server.errors import ApiError, FieldError
from server.fetch import FetchError, FetchPolicy, fetch
from server.images import decode_image
from server.jobs import JobSpec, StoredImage
from server.jobs.service import Renderer
from server.settings import Settings
from server.upscale import resizer
from server.webhooks.policy import check_webhook_url

DIALECT = "gateway"
# Families whose adapter runs Task.EDIT: instruction / reference editing, and no text-to-image. (pipelines/families
# says so too, but importing it would import torch.)
EDIT_FAMILIES = frozenset({"qwen-image-edit"})
# FLUX.1 Kontext is family flux with this variant: its IMG2IMG is reference editing by the prompt (one image).
KONTEXT_VARIANT = "flux-kontext"
MASK_BLUR = 4  # px: soft edge between the edited area and the kept original (A1111's default)
RANDOM_SEED = -1
GEMINI_FIELDS = {"width": "image_size", "height": "image_size"}


@dataclass(frozen=True)
class Context:
    registry: Registry
    settings: Settings


@dataclass(frozen=True)
class Plan:
    """A job to submit, and how engine errors about internal fields map back to the wire fields."""

    spec: JobSpec
    field_names: dict[str, str]


# Rendering ---------------------------------------------------------------------------------------------------------


def images_base64(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    return {"images": [im.as_base64() for im in images]}


def images_urls(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    return {"images": [im.as_url() for im in images]}


def urls(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
    return {"urls": [im.as_url() for im in images]}


# Models, prompts, images -------------------------------------------------------------------------------------------


def route_model(registry: Registry, route: str) -> ModelSpec:
    spec = registry.route_model(route)
    if spec is None:
        where = f" ({registry.source})" if registry.source else ""
        raise ApiError(
            404,
            f"route '{route}' is not mapped to a model on this server: add `{route}: <model id>` under `routes:` "
            f"in models.yaml{where} and restart",
            code="route_not_mapped",
        )
    return spec


def require_text_to_image(spec: ModelSpec, route: str) -> None:
    if spec.family in EDIT_FAMILIES:
        raise ApiError(
            500,
            f"route '{route}' is mapped to model '{spec.id}' (family {spec.family}), which cannot generate from text "
            "alone; map the route to a text-to-image model under `routes:` in models.yaml",
            code="route_misconfigured",
        )


def check_prompt(body: GatewayRequest, settings: Settings) -> None:
    if len(body.prompt) > settings.max_prompt_chars:
        raise ApiError.invalid([FieldError("prompt", f"longer than max_prompt_chars={settings.max_prompt_chars}")])


def seed_of(value: int | None) -> int:
    return RANDOM_SEED if value is None else value


def decode_base64_image(data: str, field: str, settings: Settings) -> Image.Image:
    return decode_image(data, field, settings.max_body_bytes, settings.max_image_pixels)


def load_image(value: str, field: str, settings: Settings) -> Image.Image:
    """An image given as base64 (or data URL) or, for routes that allow it, as an http(s) URL."""
    if not value.strip().lower().startswith(("http://", "https://")):
        return decode_base64_image(value, field, settings)
    policy = FetchPolicy(
        max_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        max_redirects=settings.fetch_max_redirects,
        allowed_networks=tuple(settings.fetch_allowed_networks),
    )
    try:
        data = fetch(value.strip(), policy)
    except FetchError as e:
        raise ApiError(e.status, f"{field}: {e}", field=field, code="image_url_unusable") from None
    if not data:
        raise ApiError(422, f"{field}: the URL returned no data", field=field, code="image_url_unusable")
    # decode_image applies the same format and pixel checks as to base64 input.
    return decode_base64_image(base64.b64encode(data).decode("ascii"), field, settings)


def stitch(images: list[Image.Image], max_pixels: int, field: str) -> Image.Image:
    """Reference images side by side at the first one's height: the usual way to give several references to a
    model that conditions on one image (FLUX Kontext, Qwen-Image-Edit). Sized before anything is allocated: a
    1x16000 first image would scale a 4096x4096 second one to 16000x16000; above `max_pixels` it is a 422 naming
    `field`."""
    height = images[0].height
    widths = [max(1, round(im.width * height / im.height)) for im in images]
    if sum(widths) * height > max_pixels:
        sizes = " + ".join(f"{im.width}x{im.height}" for im in images)
        message = (
            f"the images ({sizes}) side by side at the first one's height make {sum(widths)}x{height} = "
            f"{sum(widths) * height} pixels, above max_work_pixels={max_pixels}; send images of similar heights"
        )
        raise ApiError.invalid([FieldError(field, message)])
    scaled = [im.convert("RGB").resize((w, height)) for im, w in zip(images, widths, strict=True)]
    canvas = Image.new("RGB", (sum(im.width for im in scaled), height), "white")
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def binary_mask(mask: Image.Image) -> Image.Image:
    """White (bright) = edit. A mask with transparency uses its alpha (opaque = edit), like a painted overlay."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 127 else 0)
    return mask.convert("L").point(lambda v: 255 if v > 127 else 0)


def redacted(body: GatewayRequest, image_fields: tuple[str, ...]) -> dict[str, Any]:
    """The wire request for the job record: image bytes replaced by their size, URLs stripped of query strings."""
    data = body.model_dump(by_alias=True, exclude={"webhook_url"})  # a webhook URL may carry a secret token
    for name in image_fields:
        value = data.get(name)
        if not value:
            continue
        if value.strip().lower().startswith(("http://", "https://")):
            parts = urlsplit(value.strip())
            host = parts.netloc.rpartition("@")[2]  # no credentials, no query (signed URLs carry secrets there)
            data[name] = urlunsplit((parts.scheme, host, parts.path, "", ""))
        else:
            data[name] = f"<base64 image, {len(value)} characters>"
    return data


def _spec(
    body: GatewayRequest,
    route: str,
    request: GenerationRequest,
    render: Renderer,
    settings: Settings,
    image_fields: tuple[str, ...] = (),
    output_format: str = "png",
) -> JobSpec:
    return JobSpec(
        request=request,
        dialect=DIALECT,
        route=route,
        request_json=redacted(body, image_fields),
        render=render,
        webhook_url=check_webhook_url(body.webhook_url, settings),
        output_format=output_format,
        ttl_s=settings.result_ttl_for(route),
    )


def _base_request(spec: ModelSpec, body: GatewayRequest, route: str, **fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {"steps": spec.defaults.steps, "guidance": spec.defaults.cfg, **fields}
    return GenerationRequest(model=spec.id, prompt=body.prompt, tags={"dialect": DIALECT, "route": route}, **values)


# Routes ------------------------------------------------------------------------------------------------------------

FLUX_IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")


def is_kontext(spec: ModelSpec) -> bool:
    return getattr(spec, "variant", None) == KONTEXT_VARIANT


def flux(body: FluxRequest, ctx: Context) -> Plan:
    """No reference image: text to image. With references: edit models (FLUX.1 Kontext, Qwen-Image-Edit) get them
    stitched into one reference; other models run image-to-image from each reference, one output per reference."""
    route = "flux"
    spec = route_model(ctx.registry, route)
    check_prompt(body, ctx.settings)
    sizes.check_size(body.width, body.height, spec, ctx.settings, ("width", "height"), _flux_multiple(spec))
    references = [(name, decode_base64_image(data, name, ctx.settings)) for name, data in body.reference_images()]
    max_work = ctx.settings.max_work_pixels
    fields: dict[str, Any] = {"width": body.width, "height": body.height, "seed": seed_of(body.seed)}
    if not references:
        require_text_to_image(spec, route)
    elif spec.family in EDIT_FAMILIES:
        fields.update(task=Task.EDIT, init_images=[stitch([im for _, im in references], max_work, "input_image")])
    elif is_kontext(spec):  # the flux adapter runs Kontext's IMG2IMG as reference editing
        fields.update(task=Task.IMG2IMG, init_images=[stitch([im for _, im in references], max_work, "input_image")])
    else:
        images = [im for _, im in references]
        strength = ctx.settings.gateway_img2img_strength
        fields.update(task=Task.IMG2IMG, init_images=images, batch_size=len(images), strength=strength)
    request = _base_request(spec, body, route, **fields)
    request.tags["safety_tolerance"] = body.safety_tolerance
    job = _spec(body, route, request, images_base64, ctx.settings, FLUX_IMAGE_FIELDS, body.output_format)
    return Plan(job, {"init_images": "input_image"})


def _flux_multiple(spec: ModelSpec) -> int:
    # The document's multiple of 32, or the model's own if it is coarser (a model mapped here that needs more).
    return max(32, spec.size_multiple)


def qwen(body: QwenRequest, ctx: Context) -> Plan:
    route = "qwen"
    spec = route_model(ctx.registry, route)
    require_text_to_image(spec, route)
    check_prompt(body, ctx.settings)
    width, height = sizes.parse_wxh(body.size, "size")
    sizes.check_size(width, height, spec, ctx.settings)
    request = _base_request(spec, body, route, width=width, height=height, seed=seed_of(body.seed))
    return Plan(_spec(body, route, request, urls, ctx.settings), {"width": "size", "height": "size"})


def qwen_edit(body: QwenEditRequest, ctx: Context) -> Plan:
    """The mapped edit model edits the image by instruction; a non-edit model mapped here runs image-to-image."""
    route = "qwen-edit"
    spec = route_model(ctx.registry, route)
    check_prompt(body, ctx.settings)
    width, height = sizes.parse_wxh(body.size, "size")
    sizes.check_size(width, height, spec, ctx.settings)
    image = load_image(body.image, "image", ctx.settings)
    fields: dict[str, Any] = {"width": width, "height": height, "seed": seed_of(body.seed), "init_images": [image]}
    if spec.family in EDIT_FAMILIES:
        fields["task"] = Task.EDIT
    else:
        fields.update(task=Task.IMG2IMG, strength=ctx.settings.gateway_img2img_strength)
    request = _base_request(spec, body, route, **fields)
    job = _spec(body, route, request, urls, ctx.settings, ("image",))
    return Plan(job, {"width": "size", "height": "size", "init_images": "image"})


def _gpt_size(size: str, spec: ModelSpec, ctx: Context, source: Image.Image | None = None) -> tuple[int, int]:
    """`auto`: the source image's size (edit), rounded down to the model's multiple and capped; else the model's
    default size (models.yaml defaults.width/height)."""
    if size != "auto":
        width, height = sizes.parse_wxh(size, "size")
        sizes.check_size(width, height, spec, ctx.settings)
        return width, height
    if source is None:
        return spec.defaults.width, spec.defaults.height
    m = spec.size_multiple
    scale = min(1.0, ctx.settings.max_width / source.width, ctx.settings.max_height / source.height)
    width = max(sizes.MIN_SIDE, int(source.width * scale) // m * m)
    height = max(sizes.MIN_SIDE, int(source.height * scale) // m * m)
    return width, height


def gpt_image(body: GptImageRequest, ctx: Context) -> Plan:
    route = "gpt-image"
    spec = route_model(ctx.registry, route)
    require_text_to_image(spec, route)
    check_prompt(body, ctx.settings)
    width, height = _gpt_size(body.size, spec, ctx)
    steps = sizes.quality_steps(body.quality, spec, ctx.settings)
    request = _base_request(spec, body, route, width=width, height=height, steps=steps, batch_size=body.n)
    return Plan(_spec(body, route, request, images_urls, ctx.settings), {"width": "size", "height": "size"})


def gpt_image_edit(body: GptImageEditRequest, ctx: Context) -> Plan:
    """With a mask: inpainting, only the white area changes (the rest is pasted back from the source). Without:
    the edit model's instruction edit, or image-to-image for other models."""
    route = "gpt-image-edit"
    spec = route_model(ctx.registry, route)
    check_prompt(body, ctx.settings)
    image = decode_base64_image(body.image, "image", ctx.settings)
    width, height = _gpt_size(body.size, spec, ctx, image)
    steps = sizes.quality_steps(body.quality, spec, ctx.settings)
    fields: dict[str, Any] = {
        "width": width,
        "height": height,
        "steps": steps,
        "batch_size": body.n,
        "init_images": [image],
    }
    if body.mask:
        mask = binary_mask(decode_base64_image(body.mask, "mask", ctx.settings))
        fields.update(
            task=Task.INPAINT,
            mask=mask,
            strength=ctx.settings.gateway_inpaint_strength,
            # Whole picture, original content under the mask as the start, original pasted back outside it.
            inpaint=InpaintOptions(mask_blur=MASK_BLUR, inpainting_fill=1, full_res=False, composite_original=True),
        )
    elif spec.family in EDIT_FAMILIES:
        fields["task"] = Task.EDIT
    else:
        fields.update(task=Task.IMG2IMG, strength=ctx.settings.gateway_img2img_strength)
    request = _base_request(spec, body, route, **fields)
    job = _spec(body, route, request, images_urls, ctx.settings, ("image", "mask"))
    return Plan(job, {"width": "size", "height": "size", "init_images": "image", "mask": "mask"})


def gemini(body: GeminiRequest, ctx: Context) -> Plan:
    route = "gemini-3"
    spec = route_model(ctx.registry, route)
    require_text_to_image(spec, route)
    check_prompt(body, ctx.settings)
    width, height = sizes.gemini_size(body.aspect_ratio, body.image_size, spec.size_multiple, ctx.settings)
    upscale = None
    if body.image_size == "4K" and ctx.settings.gemini_4k_upscale:
        upscale = sizes.gemini_4k(body.aspect_ratio, spec, ctx.settings)
    if upscale is not None:
        width, height = upscale.generate
    request = _base_request(spec, body, route, width=width, height=height)
    if upscale is None:
        return Plan(_spec(body, route, request, images_base64, ctx.settings), GEMINI_FIELDS)
    method = ctx.settings.gemini_upscaler
    (out_w, out_h) = upscale.output
    info = (
        f"made at {width}x{height} by {spec.id}, then upscaled to {out_w}x{out_h} ({method}): 4K is beyond this "
        "server's max_width/max_height/max_output_pixels, which bound what the model itself makes"
    )

    def render(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
        return {**images_base64(result, images), "info": info}

    job = _spec(body, route, request, render, ctx.settings)
    job.postprocess = resizer(upscale.output, method)
    job.request_json["made"] = info
    return Plan(job, GEMINI_FIELDS)
