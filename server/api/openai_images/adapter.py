"""OpenAI Images request -> `JobSpec` (a `GenerationRequest` plus how to render the `ImagesResponse`). Blocking (image
decoding): run in a thread.

Models: `model` is any models.yaml id or alias (OpenAI names such as gpt-image-1 or dall-e-3 are aliases of local
models); without one, models.yaml's `routes: openai` (generations) or `openai-edit` (edits) decides, falling back to
`openai` and then to `default_model`.

Edits follow the gateway's gpt-image edit: with a mask, inpainting of the first image (only the area the mask leaves
transparent changes; the rest is pasted back from the source); without one, an edit-family model edits by
instruction (several images stitched side by side as one reference), other models run image-to-image from the first
image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult, InpaintOptions, Task, evenly
from server.api.background import check_transparent_background
from server.api.gateway import sizes
from server.api.gateway.adapter import (
    EDIT_FAMILIES,
    MASK_BLUR,
    Context,
    _gpt_size,
    is_kontext,
    seed_of,
    stitch,
)
from server.api.model_names import bare_name, resolve_name
from server.api.openai_images.schemas import EditFields, GenerateRequest, ImageOptions, VariationFields
from server.errors import ApiError, FieldError
from server.images import b64, decode_image
from server.jobs import JobSpec, StoredImage
from server.jobs.service import Renderer
from server.settings import Settings
from server.webhooks.policy import check_webhook_url

DIALECT = "openai"
GENERATE_ROUTE = "openai"
EDIT_ROUTE = "openai-edit"
VARIATION_ROUTE = "openai-variation"  # the job's route (result_ttl_s_by_route); the model is routes: openai's
DEFAULT_VARIATION_SIZE = "1024x1024"  # OpenAI's default for variations
MAX_EDIT_IMAGES = 16  # OpenAI's limit for GPT-image edits
TRANSPARENT_BELOW = 128  # mask alpha below this counts as transparent (OpenAI: alpha 0), i.e. the area to edit
QUALITY_LABELS = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "hd": "high",
    "auto": "medium",
    "standard": "medium",
}
# GenerationRequest fields the engine may name in an InvalidRequest -> the wire field the client sent
WIRE_FIELDS = {
    "width": "size",
    "height": "size",
    "batch_size": "n",
    "init_images": "image",
    "mask": "mask",
    "guidance": "guidance_scale",
    "denoising_strength": "image",
    "loras": "prompt",  # <lora:name:w> tags in the prompt
}


@dataclass(frozen=True)
class ImagePart:
    """One uploaded image: its wire field (`image`, `image[]`, `mask`) and its bytes (or base64 text)."""

    field: str
    data: bytes | str


@dataclass(frozen=True)
class Plan:
    spec: JobSpec
    stream: bool = False  # answer with Server-Sent Events: partial images, then the completed image(s)
    partial_images: int = 0
    events: str = "image_generation"  # the streaming events' prefix (image_edit for edits)

    def wire_field(self, field: str) -> str:
        return WIRE_FIELDS.get(field, field)


@dataclass(frozen=True)
class Output:
    """How the result is rendered: what the response says besides the images."""

    response_format: str
    output_format: str
    quality: str  # low | medium | high
    prompt_tokens: int
    input_image_tokens: int
    transparent: bool = False  # alpha made by the background-removal model (or a model that makes alpha)


# Usage -------------------------------------------------------------------------------------------------------------


def text_tokens(text: str) -> int:
    """About 4 characters per token (the usual estimate for English text with OpenAI's tokenizers)."""
    return math.ceil(len(text) / 4)


def image_tokens(width: int, height: int) -> int:
    """OpenAI's published vision cost of an image of this size: fit within 2048x2048, shortest side down to 768,
    then 85 + 170 per 512-pixel tile. A local model counts no tokens; this gives clients a stable, size-aware figure."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def usage(out: Output, images: list[StoredImage]) -> dict[str, Any]:
    output_tokens = sum(image_tokens(im.width, im.height) for im in images)
    input_tokens = out.prompt_tokens + out.input_image_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"image_tokens": out.input_image_tokens, "text_tokens": out.prompt_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def renderer(out: Output) -> Renderer:
    def render(result: GenerationResult, images: list[StoredImage]) -> dict[str, Any]:
        if out.response_format == "url":
            data = [{"url": im.as_url()} for im in images]
        else:
            data = [{"b64_json": im.as_base64()} for im in images]
        width, height = (images[0].width, images[0].height) if images else (result.width, result.height)
        return {
            "created": int(time.time()),
            "data": data,
            "background": "transparent" if out.transparent else "opaque",
            "output_format": out.output_format,
            "quality": out.quality,
            "size": f"{width}x{height}",
            "usage": usage(out, images),
        }

    return render


# Fields ------------------------------------------------------------------------------------------------------------


def resolve_model(registry: Registry, name: str | None, route: str) -> ModelSpec:
    if name and name.strip():
        spec = resolve_name(registry, name).spec  # `openai/dall-e-3` (IndoxHub's form) runs dall-e-3's model
        if spec is None:
            raise ApiError(
                404,
                f"The model '{name}' does not exist on this server; GET /v1/models lists the models and aliases",
                field="model",
                code="model_not_found",
            )
        return spec
    return registry.route_model(route) or registry.route_model(GENERATE_ROUTE) or registry.get(registry.default_model)


def default_response_format(model_name: str | None) -> str:
    """OpenAI: dall-e models answer with URLs by default, GPT-image models with base64; local names get base64."""
    return "url" if (bare_name(model_name) or "").lower().startswith("dall-e") else "b64_json"


def check_options(body: ImageOptions, settings: Settings) -> None:
    """The limits a schema cannot know (settings), and the features this server refuses, each naming its field."""
    errors: list[FieldError] = []
    if len(body.prompt) > settings.max_prompt_chars:
        errors.append(FieldError("prompt", f"longer than this server's max_prompt_chars={settings.max_prompt_chars}"))
    if body.negative_prompt and len(body.negative_prompt) > settings.max_prompt_chars:
        errors.append(FieldError("negative_prompt", f"longer than max_prompt_chars={settings.max_prompt_chars}"))
    if body.n is not None and body.n > settings.max_images_per_request:
        errors.append(FieldError("n", f"above this server's max_images_per_request={settings.max_images_per_request}"))
    if body.steps is not None and body.steps > settings.max_steps:
        errors.append(FieldError("steps", f"above this server's max_steps={settings.max_steps}"))
    if errors:
        raise ApiError.invalid(errors)


def output_of(body: ImageOptions, prompt_tokens: int, input_image_tokens: int = 0, transparent: bool = False) -> Output:
    return Output(
        # A stream carries the images themselves, as OpenAI's does.
        response_format="b64_json" if body.stream else body.response_format or default_response_format(body.model),
        output_format=body.output_format or "png",
        quality=QUALITY_LABELS[body.quality or "auto"],
        prompt_tokens=prompt_tokens,
        input_image_tokens=input_image_tokens,
        transparent=transparent,
    )


def transparency(body: ImageOptions, spec: ModelSpec, ctx: Context) -> tuple[bool, bool]:
    """(the response says transparent, the engine removes the background) for `background`."""
    removal = check_transparent_background(body.background, body.output_format, spec, ctx.registry, ctx.settings)
    return body.background == "transparent", removal


def _request(spec: ModelSpec, body: ImageOptions, route: str, settings: Settings, **fields: Any) -> GenerationRequest:
    steps = body.steps or sizes.quality_steps(body.quality or "auto", spec, settings)
    guidance = spec.defaults.cfg if body.guidance_scale is None else body.guidance_scale
    tags: dict[str, Any] = {"dialect": DIALECT, "route": route}
    # Streamed partial images are live previews, spread evenly over the steps.
    previews = evenly(steps, body.partial_images or 0) if body.stream else 0
    return GenerationRequest(
        preview_every=previews,
        model=spec.id,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or "",
        steps=steps,
        guidance=guidance,
        seed=seed_of(body.seed),
        batch_size=body.n or 1,
        tags=tags,
        **fields,
    )


def _spec(body: ImageOptions, route: str, request: GenerationRequest, out: Output, settings: Settings) -> JobSpec:
    request_json = body.model_dump(exclude_none=True, exclude={"webhook_url"})  # a URL may carry a secret token
    compression = 100 if body.output_compression is None else body.output_compression
    return JobSpec(
        webhook_url=check_webhook_url(body.webhook_url, settings),
        request=request,
        dialect=DIALECT,
        route=route,
        request_json=request_json,
        render=renderer(out),
        output_format=out.output_format,
        quality=compression,  # jpeg / webp only; PNG is lossless
        ttl_s=settings.result_ttl_for(route),
    )


# Generations -------------------------------------------------------------------------------------------------------


def generation_plan(body: GenerateRequest, ctx: Context) -> Plan:
    check_options(body, ctx.settings)
    spec = resolve_model(ctx.registry, body.model, GENERATE_ROUTE)
    if spec.family in EDIT_FAMILIES:
        raise ApiError(
            400,
            f"model '{spec.id}' (family {spec.family}) edits images and cannot generate from text alone; use it with "
            "POST /v1/images/edits, or pick a text-to-image model",
            field="model",
            code="invalid_value",
        )
    width, height = _gpt_size(body.size or "auto", spec, ctx)
    transparent, removal = transparency(body, spec, ctx)
    request = _request(
        spec, body, GENERATE_ROUTE, ctx.settings, width=width, height=height, transparent_background=removal
    )
    out = output_of(body, text_tokens(body.prompt), transparent=transparent)
    return Plan(_spec(body, GENERATE_ROUTE, request, out, ctx.settings), **_streaming(body, "image_generation"))


# Edits -------------------------------------------------------------------------------------------------------------


def decode_part(part: ImagePart, settings: Settings) -> Image.Image:
    data = part.data if isinstance(part.data, str) else b64(part.data)
    return decode_image(data, part.field, settings.max_body_bytes, settings.max_image_pixels)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def edit_area(mask: Image.Image, field: str = "mask") -> Image.Image:
    """OpenAI's mask marks the area to edit with transparent pixels; the engine's mask is white where it repaints."""
    if not has_alpha(mask):
        raise ApiError.invalid(
            [
                FieldError(
                    field,
                    f"the mask has no alpha channel (mode {mask.mode}): send a PNG whose transparent pixels "
                    "(alpha 0) mark the area to edit and whose opaque pixels are kept",
                )
            ]
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda v: 255 if v < TRANSPARENT_BELOW else 0)


def edit_plan(body: EditFields, parts: list[ImagePart], mask_part: ImagePart | None, ctx: Context) -> Plan:
    check_options(body, ctx.settings)
    if not parts:
        raise ApiError.invalid([FieldError("image", "missing", "missing")])
    if len(parts) > MAX_EDIT_IMAGES:
        raise ApiError.invalid([FieldError("image", f"{len(parts)} images sent; at most {MAX_EDIT_IMAGES}")])
    spec = resolve_model(ctx.registry, body.model, EDIT_ROUTE)
    images = [decode_part(part, ctx.settings).convert("RGB") for part in parts]
    width, height = _gpt_size(body.size or "auto", spec, ctx, images[0])
    transparent, removal = transparency(body, spec, ctx)
    fields: dict[str, Any] = {"width": width, "height": height, "transparent_background": removal}
    if mask_part is not None:
        raw_mask = decode_part(mask_part, ctx.settings)
        if raw_mask.size != images[0].size:
            w, h = images[0].size
            message = f"the mask is {raw_mask.width}x{raw_mask.height} but the first image is {w}x{h}; sizes must match"
            raise ApiError.invalid([FieldError("mask", message)])
        fields.update(
            task=Task.INPAINT,
            init_images=[images[0]],
            mask=edit_area(raw_mask),
            strength=ctx.settings.gateway_inpaint_strength,
            # Whole picture, original content under the mask as the start, original pasted back outside it.
            inpaint=InpaintOptions(mask_blur=MASK_BLUR, inpainting_fill=1, full_res=False, composite_original=True),
        )
    elif spec.family in EDIT_FAMILIES:
        fields.update(task=Task.EDIT, init_images=[stitch(images, ctx.settings.max_work_pixels, "image")])
    elif is_kontext(spec):  # the flux adapter runs Kontext's IMG2IMG as reference editing
        fields.update(task=Task.IMG2IMG, init_images=[stitch(images, ctx.settings.max_work_pixels, "image")])
    else:
        fields.update(task=Task.IMG2IMG, init_images=[images[0]], strength=ctx.settings.gateway_img2img_strength)
    request = _request(spec, body, EDIT_ROUTE, ctx.settings, **fields)
    input_tokens = sum(image_tokens(im.width, im.height) for im in images)
    out = output_of(body, text_tokens(body.prompt), input_tokens, transparent)
    job = _spec(body, EDIT_ROUTE, request, out, ctx.settings)
    job.request_json.update(image=[_described(p) for p in parts], mask=_described(mask_part) if mask_part else None)
    return Plan(job, **_streaming(body, "image_edit"))


def _streaming(body: ImageOptions, events: str) -> dict[str, Any]:
    return {"stream": bool(body.stream), "partial_images": body.partial_images or 0, "events": events}


def _described(part: ImagePart) -> str:
    """What the job record keeps of an uploaded image: its size, never its bytes."""
    kind = "bytes" if isinstance(part.data, bytes) else "base64 characters"
    return f"<image, {len(part.data)} {kind}>"


# Variations --------------------------------------------------------------------------------------------------------


def variation_plan(body: VariationFields, part: ImagePart, ctx: Context) -> Plan:
    """OpenAI `images.create_variation`: image-to-image from the uploaded image on the generations model, without a
    prompt unless the `prompt` extension gives one; image i uses seed + i, so the n variations differ."""
    settings = ctx.settings
    errors: list[FieldError] = []
    if body.n is not None and body.n > settings.max_images_per_request:
        errors.append(FieldError("n", f"above this server's max_images_per_request={settings.max_images_per_request}"))
    if body.steps is not None and body.steps > settings.max_steps:
        errors.append(FieldError("steps", f"above this server's max_steps={settings.max_steps}"))
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text and len(text) > settings.max_prompt_chars:
            errors.append(FieldError(name, f"longer than this server's max_prompt_chars={settings.max_prompt_chars}"))
    if errors:
        raise ApiError.invalid(errors)
    spec = resolve_model(ctx.registry, body.model, GENERATE_ROUTE)
    if spec.family in EDIT_FAMILIES:
        message = f"model '{spec.id}' (family {spec.family}) edits by instruction; variations need an image model"
        raise ApiError(400, message, field="model", code="invalid_value")
    image = decode_part(part, settings).convert("RGB")
    width, height = _gpt_size(body.size or DEFAULT_VARIATION_SIZE, spec, ctx, image)
    request = GenerationRequest(
        model=spec.id,
        prompt=body.prompt or "",
        negative_prompt=body.negative_prompt or "",
        task=Task.IMG2IMG,
        init_images=[image],
        strength=body.strength if body.strength is not None else settings.openai_variation_strength,
        width=width,
        height=height,
        steps=body.steps or spec.defaults.steps,
        guidance=spec.defaults.cfg if body.guidance_scale is None else body.guidance_scale,
        seed=seed_of(body.seed),
        batch_size=body.n or 1,
        tags={"dialect": DIALECT, "route": VARIATION_ROUTE},
    )
    out = Output(
        response_format=body.response_format or "url",
        output_format="png",
        quality="medium",
        prompt_tokens=text_tokens(body.prompt or ""),
        input_image_tokens=image_tokens(image.width, image.height),
    )
    job = JobSpec(
        request=request,
        dialect=DIALECT,
        route=VARIATION_ROUTE,
        request_json={**body.model_dump(exclude_none=True), "image": _described(part)},
        render=renderer(out),
        output_format="png",
        ttl_s=settings.result_ttl_for(VARIATION_ROUTE),
    )
    return Plan(job)
