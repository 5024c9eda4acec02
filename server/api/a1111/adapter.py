"""A1111 request -> `GenerationRequest`, and `GenerationResult` -> A1111 response. Pure functions, no I/O.

A1111's API defaults win over models.yaml defaults here (clients rely on them: steps 50, Euler, 512x512).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipelines.hires import HIRES_UPSCALERS, HiresOptions, plan_hires
from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, GenerationResult, InpaintOptions, Task
from server.api.a1111 import scripts
from server.api.a1111.controlnet_units import is_controlnet_script
from server.api.a1111.infotext import create_infotext, format_number
from server.api.a1111.schemas import (
    GatewayImg2ImgRequest,
    GatewayTxt2ImgRequest,
    GenerationBase,
    Img2ImgRequest,
    Txt2ImgRequest,
)
from server.errors import ApiError, FieldError
from server.settings import Settings
from server.styles import StyleBook

MAX_SEED = 2**63 - 1
A1111_RANDOM_SEED_RANGE = 4294967294  # processing.get_fixed_seed: randrange(4294967294)
DEFAULT_REFINER_SWITCH_AT = 0.8  # A1111's UI default, used when a request names a refiner without a switch point
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
# GenerationRequest field -> A1111 field, to name the A1111 field when the engine refuses a request.
ENGINE_FIELD_NAMES = {
    "guidance": "cfg_scale",
    "strength": "denoising_strength",
    "sampler": "sampler_name",
    "schedule": "scheduler",
}


@dataclass
class ModelChoice:
    spec: ModelSpec
    field: str | None  # the request field that chose it (None: the dialect's current checkpoint)


@dataclass
class InputImages:
    """Decoded img2img inputs."""

    init_images: list[Image.Image]
    mask: Image.Image | None = None


@dataclass
class StyledPrompts:
    """The prompts after `styles` (A1111 `apply_styles_to_prompt`), and the style names no preset answers to."""

    prompt: str
    negative_prompt: str
    unknown: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """Everything needed to render the response once the engine has answered."""

    body: GenerationBase
    spec: ModelSpec
    request: GenerationRequest
    job_timestamp: str
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    subseed: int = -1


# Model ---------------------------------------------------------------------------------------------------------------


def check_image_count(field: str, count: int, settings: Settings) -> None:
    """A list of input images over max_images_per_request is a 422 naming `field` (extras batch, ControlNet detect)."""
    if count > settings.max_images_per_request:
        raise ApiError(
            422,
            f"{field}: {count} images, at most max_images_per_request={settings.max_images_per_request}",
            field=field,
        )


def unknown_model(registry: Registry, name: str, field_name: str, status: int = 404) -> ApiError:
    known = ", ".join(m.title for m in registry)
    return ApiError(
        status, f"{field_name}: model '{name}' not found (available: {known})", field=field_name, code="model_not_found"
    )


def choose_model(
    body: GenerationBase, registry: Registry, current: ModelSpec, gateway_default: str | None = None
) -> ModelChoice:
    """override_settings.sd_model_checkpoint, else the gateway's `model`, else the current checkpoint.

    Unknown names are refused (A1111 silently ignores them, which users report as "my model was not used").
    """
    override = body.override_settings.get("sd_model_checkpoint")
    if override:
        spec = registry.resolve(str(override))
        if spec is None:
            raise unknown_model(registry, str(override), "override_settings.sd_model_checkpoint")
        return ModelChoice(spec, "override_settings.sd_model_checkpoint")
    if isinstance(body, (GatewayTxt2ImgRequest, GatewayImg2ImgRequest)):
        if body.model:
            spec = registry.resolve(body.model)
            if spec is None:
                raise unknown_model(registry, body.model, "model")
            return ModelChoice(spec, "model")
        spec = registry.resolve(gateway_default) if gateway_default else None
        if spec is not None:
            return ModelChoice(spec, "model")
    return ModelChoice(current, None)


# Validation ----------------------------------------------------------------------------------------------------------


def floor_to(value: int, multiple: int) -> int:
    return value // multiple * multiple


def check_request(body: GenerationBase, settings: Settings, spec: ModelSpec) -> list[FieldError]:
    """Every limit A1111 leaves unchecked, each failure naming its field."""
    errors: list[FieldError] = []

    def bad(name: str, message: str) -> None:
        errors.append(FieldError(name, message))

    for name in ("prompt", "negative_prompt"):
        if len(getattr(body, name)) > settings.max_prompt_chars:
            bad(name, f"longer than max_prompt_chars={settings.max_prompt_chars}")
    if not 1 <= body.steps <= settings.max_steps:
        bad("steps", f"must be between 1 and max_steps={settings.max_steps}")
    m = spec.size_multiple
    for name, value, limit in (("width", body.width, settings.max_width), ("height", body.height, settings.max_height)):
        if value <= 0:
            bad(name, "must be positive")
        elif value > limit:
            bad(name, f"must be at most max_{name}={limit}")
        elif value < m:
            bad(name, f"must be at least {m} for model family {spec.family}")
    if body.batch_size < 1:
        bad("batch_size", "must be at least 1")
    if body.n_iter < 1:
        bad("n_iter", "must be at least 1")
    if body.batch_size >= 1 and body.n_iter >= 1 and body.batch_size * body.n_iter > settings.max_images_per_request:
        bad(
            "batch_size",
            f"batch_size * n_iter = {body.batch_size * body.n_iter} exceeds "
            f"max_images_per_request={settings.max_images_per_request}",
        )
    if not math.isfinite(body.cfg_scale) or body.cfg_scale < 0:
        bad("cfg_scale", "must be a finite number >= 0")
    if not 0.0 <= body.denoising_strength <= 1.0:
        bad("denoising_strength", "must be between 0 and 1")
    if not -1 <= body.seed <= MAX_SEED:
        bad("seed", f"must be -1 (random) or between 0 and {MAX_SEED}")
    errors.extend(scripts.select(body)[1])  # an unknown name is A1111's 422 "Script '<name>' not found"
    for script in body.alwayson_scripts:
        if not is_controlnet_script(script):  # the ControlNet extension's units are read by controlnet_units
            bad(f"alwayson_scripts.{script}", f"always-on script '{script}' not found")
    if isinstance(body, Img2ImgRequest):
        errors.extend(_check_img2img(body))
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        errors.extend(_check_hires(body, settings, spec))
    return errors


def reported_size(prep: Prepared, result: GenerationResult) -> tuple[int, int]:
    """A1111 reports the first-pass size for a hires job ("Size" plus "Hires upscale"), the image size otherwise."""
    if prep.request.hires is not None:
        return prep.request.width, prep.request.height
    return result.width, result.height


def hires_options(body: Txt2ImgRequest) -> HiresOptions:
    return HiresOptions(
        scale=body.hr_scale,
        resize_x=body.hr_resize_x,
        resize_y=body.hr_resize_y,
        upscaler=body.hr_upscaler or "Latent",  # A1111's latent_upscale_default_mode
        second_pass_steps=body.hr_second_pass_steps,
        denoising_strength=body.denoising_strength,
    )


def _check_hires(body: Txt2ImgRequest, settings: Settings, spec: ModelSpec) -> list[FieldError]:
    errors = []
    opts = hires_options(body)
    if opts.upscaler not in HIRES_UPSCALERS:
        errors.append(
            FieldError(
                "hr_upscaler", f"could not find upscaler named {opts.upscaler!r}; one of: " + ", ".join(HIRES_UPSCALERS)
            )
        )
    if not (math.isfinite(opts.scale) and 1.0 <= opts.scale <= 8.0):
        errors.append(FieldError("hr_scale", "must be between 1 and 8"))
    for name, value in (("hr_resize_x", opts.resize_x), ("hr_resize_y", opts.resize_y)):
        if value < 0:
            errors.append(FieldError(name, "must be 0 (use hr_scale) or a positive size"))
    if not 0 <= opts.second_pass_steps <= settings.max_steps:
        errors.append(FieldError("hr_second_pass_steps", f"must be between 0 and max_steps={settings.max_steps}"))
    if errors or body.width < spec.size_multiple or body.height < spec.size_multiple:
        return errors
    plan = plan_hires(body.width, body.height, opts, spec.size_multiple)
    if plan.upscale_to[0] > settings.max_width or plan.upscale_to[1] > settings.max_height:
        errors.append(
            FieldError(
                "hr_scale" if not (opts.resize_x or opts.resize_y) else "hr_resize_x",
                f"the hires size {plan.upscale_to[0]}x{plan.upscale_to[1]} exceeds "
                f"max_width={settings.max_width} / max_height={settings.max_height}",
            )
        )
    return errors


def txt2img_extra_params(body: Txt2ImgRequest, spec: ModelSpec) -> dict[str, Any]:
    """What A1111's hires fix adds to `extra_generation_params`."""
    if not body.enable_hr:
        return {}
    opts = hires_options(body)
    plan = plan_hires(
        floor_to(body.width, spec.size_multiple), floor_to(body.height, spec.size_multiple), opts, spec.size_multiple
    )
    extra: dict[str, Any] = {"Denoising strength": opts.denoising_strength, **plan.extra_params}
    extra["Hires upscaler"] = opts.upscaler
    if opts.second_pass_steps:
        extra["Hires steps"] = opts.second_pass_steps
    return extra


def resize_problem(size: tuple[int, int], target: tuple[int, int], resize_mode: int) -> str | None:
    """Why an input of `size` cannot be resized to `target` with A1111's `resize_mode`, or None: in "resize and
    fill" (2) the image is fitted inside the target, and a sliver's short side would round to 0 pixels."""
    (w, h), (tw, th) = size, target
    if resize_mode != 2 or w < 1 or h < 1 or tw < 1 or th < 1:
        return None
    fitted = (tw, h * tw // w) if tw / th < w / h else (w * th // h, th)
    if min(fitted) < 1:
        return (
            f"a {w}x{h} image fitted into {tw}x{th} (resize_mode 2, resize and fill) would be {fitted[0]}x{fitted[1]} "
            "pixels: use another resize_mode or a less extreme aspect ratio"
        )
    return None


def _check_img2img(body: Img2ImgRequest) -> list[FieldError]:
    errors = []
    if body.resize_mode not in (0, 1, 2, 3):
        errors.append(
            FieldError(
                "resize_mode", "must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 (latent upscale)"
            )
        )
    if body.inpainting_fill not in (0, 1, 2, 3):
        errors.append(
            FieldError("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
        )
    if body.inpainting_mask_invert not in (0, 1):
        errors.append(FieldError("inpainting_mask_invert", "must be 0 or 1"))
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
        value = getattr(body, name)
        if value is not None and value < 0:
            errors.append(FieldError(name, "must be >= 0"))
    if body.init_images and len(body.init_images) > body.batch_size:
        errors.append(
            FieldError("init_images", f"{len(body.init_images)} images given but batch_size is {body.batch_size}")
        )
    return errors


# Request -------------------------------------------------------------------------------------------------------------


def apply_styles(body: GenerationBase, styles: StyleBook) -> StyledPrompts:
    """Each named style in order, to the prompt and to the negative prompt (A1111 `apply_styles_to_prompt` and
    `apply_negative_styles_to_prompt`). Names are style names or ids; unknown ones are skipped, as A1111 does."""
    prompt, negative = body.prompt, body.negative_prompt
    unknown = []
    for name in body.styles:
        style = styles.by_name(name)
        if style is None:
            unknown.append(name)
            continue
        prompt, negative = style.apply(prompt, negative)
    return StyledPrompts(prompt, negative, unknown)


def binary_mask(mask: Image.Image, round_mask: bool = True) -> Image.Image:
    """A1111 `create_binary_mask`: a transparent RGBA mask uses its alpha, anything else its luminance."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1].convert("L")
    else:
        mask = mask.convert("L")
    return mask.point(lambda x: 255 if x > 128 else 0) if round_mask else mask


def flatten_rgb(img: Image.Image, background: str = "#ffffff") -> Image.Image:
    """A1111 `images.flatten`: transparent pixels over the img2img background colour, then RGB."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def inpaint_options(body: Img2ImgRequest) -> InpaintOptions:
    return InpaintOptions(
        mask_blur=body.mask_blur if body.mask_blur is not None else body.mask_blur_x,
        inpainting_fill=body.inpainting_fill,
        full_res=body.inpaint_full_res,
        full_res_padding=body.inpaint_full_res_padding,
        invert=bool(body.inpainting_mask_invert),
    )


def img2img_extra_params(body: Img2ImgRequest, has_mask: bool) -> dict[str, Any]:
    """What A1111's img2img adds to `extra_generation_params` (and so to the infotext)."""
    extra: dict[str, Any] = {"Denoising strength": body.denoising_strength}
    if has_mask:
        opts = inpaint_options(body)
        if opts.invert:
            extra["Mask mode"] = "Inpaint not masked"
        extra["Mask blur"] = opts.mask_blur
        extra["Masked content"] = MASKED_CONTENT[opts.inpainting_fill]
        if opts.full_res:
            extra["Inpaint area"] = "Only masked"
            extra["Masked area padding"] = opts.full_res_padding
    return extra


def to_generation_request(
    body: GenerationBase, spec: ModelSpec, images: InputImages | None = None, prompts: StyledPrompts | None = None
) -> GenerationRequest:
    """The internal request; width/height floored to what the model family needs (A1111 floors to /8). `prompts`:
    the prompts with the request's styles applied (default: as sent)."""
    prompts = prompts or StyledPrompts(body.prompt, body.negative_prompt)
    batch_size = body.batch_size
    task = Task.TXT2IMG
    init_images: list[Image.Image] = []
    mask = None
    inpaint = InpaintOptions()
    resize_mode = 0
    if isinstance(body, Img2ImgRequest) and images is not None:
        # A1111: one init image is used for the whole batch; k images make a batch of k.
        init_images = images.init_images * batch_size if len(images.init_images) == 1 else images.init_images
        batch_size = len(init_images)
        mask = images.mask
        task = Task.INPAINT if mask is not None else Task.IMG2IMG
        inpaint = inpaint_options(body)
        resize_mode = body.resize_mode
    return GenerationRequest(
        model=spec.id,
        prompt=prompts.prompt,
        task=task,
        negative_prompt=prompts.negative_prompt,
        width=floor_to(body.width, spec.size_multiple),
        height=floor_to(body.height, spec.size_multiple),
        steps=body.steps,
        guidance=body.cfg_scale,
        seed=body.seed,
        batch_size=batch_size,
        n_iter=body.n_iter,
        sampler=body.sampler_name or body.sampler_index,
        schedule=body.scheduler,
        strength=body.denoising_strength,
        init_images=init_images,
        mask=mask,
        inpaint=inpaint,
        resize_mode=resize_mode,
        hires=hires_options(body) if isinstance(body, Txt2ImgRequest) and body.enable_hr else None,
        subseed=body.subseed,
        subseed_strength=body.subseed_strength,
        seed_resize_from_w=max(body.seed_resize_from_w, 0),
        seed_resize_from_h=max(body.seed_resize_from_h, 0),
        tiling=bool(body.tiling),
        refiner=refiner_name(body),
        refiner_switch_at=DEFAULT_REFINER_SWITCH_AT if body.refiner_switch_at is None else body.refiner_switch_at,
        tags={"dialect": "a1111", **({"task_id": body.force_task_id} if body.force_task_id else {})},
    )


def refiner_name(body: GenerationBase) -> str | None:
    """`refiner_checkpoint`, None for A1111's spellings of "no refiner"."""
    name = (body.refiner_checkpoint or "").strip()
    return None if name in ("", "None", "none") else name


def resolve_subseed(subseed: int) -> int:
    """A1111 resolves -1 to a random subseed (used by variation seeds, reported either way)."""
    return random.randrange(A1111_RANDOM_SEED_RANGE) if subseed == -1 else subseed


# Response ------------------------------------------------------------------------------------------------------------


@dataclass
class InfotextOptions:
    add_model_hash: bool = True
    add_model_name: bool = True
    add_version: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InfotextOptions:
        return cls(
            add_model_hash=bool(options.get("add_model_hash_to_info", True)),
            add_model_name=bool(options.get("add_model_name_to_info", True)),
            add_version=bool(options.get("add_version_to_infotext", True)),
        )


def all_seeds(result: GenerationResult, first_seed: int, total: int) -> list[int]:
    """One seed per requested image: what the engine reported, continued with A1111's seed+i rule."""
    seeds = list(result.seeds[:total])
    start = seeds[0] if seeds else first_seed
    return seeds + [start + i for i in range(len(seeds), total)] if start >= 0 else seeds


def variation_params(prep: Prepared, index: int) -> dict[str, Any]:
    """A1111's "Variation seed", "Variation seed strength" and "Seed resize from" infotext keys for image `index`."""
    req = prep.request
    resized = req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0
    return {
        "Variation seed": None if req.subseed_strength == 0 else prep.subseed + index,
        "Variation seed strength": None if req.subseed_strength == 0 else format_number(req.subseed_strength),
        "Seed resize from": f"{req.seed_resize_from_w}x{req.seed_resize_from_h}" if resized else None,
    }


def image_infotext(
    prep: Prepared,
    result: GenerationResult,
    seed: int,
    options: InfotextOptions,
    version: str | None,
    index: int = 0,
) -> str:
    body = prep.body
    model_hash = result.model_hash or prep.spec.short_hash
    params: dict[str, Any] = {
        "Steps": result.steps,
        "Sampler": result.sampler,
        "Schedule type": result.schedule,
        "CFG scale": format_number(body.cfg_scale),
        "Seed": seed,
        "Size": "{}x{}".format(*reported_size(prep, result)),
        "Model hash": model_hash if options.add_model_hash else None,
        "Model": prep.spec.id if options.add_model_name else None,
        "Clip skip": prep.request.clip_skip if prep.request.clip_skip > 1 else None,
        **variation_params(prep, index),
        "Denoising strength": prep.extra_generation_params.get("Denoising strength"),
        "Tiling": "True" if prep.request.tiling else None,
        "Refiner": prep.request.refiner,
        "Refiner switch at": format_number(prep.request.refiner_switch_at) if prep.request.refiner else None,
        **prep.extra_generation_params,
        "Version": version if options.add_version else None,
    }
    # The prompts the model got, styles applied (A1111 writes `all_prompts[i]`).
    return create_infotext(prep.request.prompt, prep.request.negative_prompt, params)


def image_grid(images: list[Image.Image], batch_size: int, n_rows: int = -1) -> Image.Image:
    """A1111 `images.image_grid` with its default layout (about square, or `n_rows` / one row per batch)."""
    rows = n_rows if n_rows > 0 else batch_size if n_rows == 0 else round(math.sqrt(len(images)))
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), color="black")
    for i, img in enumerate(images):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def wants_grid(body: GenerationBase, image_count: int, options: dict[str, Any]) -> bool:
    """A1111 returns a grid only when save_images is set (the API sets do_not_save_grid = not save_images)."""
    if not body.save_images or not options.get("return_grid", True) or image_count == 0:
        return False
    return image_count >= 2 or not options.get("grid_only_if_multiple", True)


def build_info(
    prep: Prepared, result: GenerationResult, infotexts: list[str], index_of_first_image: int, version: str | None
) -> str:
    """`info`: JSON string with exactly the 32 keys of A1111 `Processed.js()`."""
    body, req = prep.body, prep.request
    total = req.total_images
    seeds = all_seeds(result, req.seed, total)
    first_seed = seeds[0] if seeds else req.seed
    obj = {
        # A1111 `Processed.js`: all_prompts[0], i.e. with the styles applied; `parameters` keeps the prompt as sent.
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * total,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * total,
        "seed": first_seed,
        "all_seeds": seeds,
        "subseed": prep.subseed,
        "all_subseeds": [prep.subseed + i for i in range(total)],
        "subseed_strength": body.subseed_strength,
        "width": reported_size(prep, result)[0],
        "height": reported_size(prep, result)[1],
        "sampler_name": result.sampler,
        "cfg_scale": body.cfg_scale,
        "steps": result.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": prep.spec.id,
        "sd_model_hash": result.model_hash or prep.spec.short_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": body.denoising_strength,
        "extra_generation_params": prep.extra_generation_params,
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": body.styles,
        "job_timestamp": prep.job_timestamp,
        "clip_skip": prep.request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": version,
    }
    return json.dumps(obj, default=lambda o: None)


def echo_parameters(body: GenerationBase) -> dict[str, Any]:
    """`parameters`: the request after defaults; img2img drops the input images unless include_init_images."""
    params = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        params["init_images"] = None
        params["mask"] = None
    return params
