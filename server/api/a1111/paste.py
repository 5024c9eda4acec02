"""The v1.10 `infotext` request field: A1111 parses it (`Api.apply_infotext`) and fills every request field the
client did not set, from the infotext's paste fields (`ui.py` txt2img/img2img_paste_fields and the sampler and seed
scripts' `infotext_fields`), and adds the options it names to `override_settings` (`get_override_settings`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from server.api.a1111.infotext import parse_generation_parameters
from server.api.a1111.schemas import GenerationBase, Img2ImgRequest, Txt2ImgRequest
from server.errors import ApiError

Convert = Callable[[str], Any]
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def _text(value: Any) -> str:
    return str(value)


def _masked_content(value: str) -> int:
    return MASKED_CONTENT.index(value) if value in MASKED_CONTENT else int(value)


# (infotext key, request field, conversion), as A1111's PasteField(component, label, api=field).
COMMON_FIELDS: tuple[tuple[str, str, Convert], ...] = (
    ("Prompt", "prompt", _text),
    ("Negative prompt", "negative_prompt", _text),
    ("Steps", "steps", int),
    ("Sampler", "sampler_name", _text),
    ("Schedule type", "scheduler", _text),
    ("CFG scale", "cfg_scale", float),
    ("Seed", "seed", int),
    ("Size-1", "width", int),
    ("Size-2", "height", int),
    ("Batch size", "batch_size", int),
    ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float),
    ("Seed resize from-1", "seed_resize_from_w", int),
    ("Seed resize from-2", "seed_resize_from_h", int),
    ("Denoising strength", "denoising_strength", float),
)
TXT2IMG_FIELDS: tuple[tuple[str, str, Convert], ...] = (
    ("Hires upscale", "hr_scale", float),
    ("Hires upscaler", "hr_upscaler", _text),
    ("Hires steps", "hr_second_pass_steps", int),
    ("Hires resize-1", "hr_resize_x", int),
    ("Hires resize-2", "hr_resize_y", int),
    ("Hires prompt", "hr_prompt", _text),
    ("Hires negative prompt", "hr_negative_prompt", _text),
)
IMG2IMG_FIELDS: tuple[tuple[str, str, Convert], ...] = (
    ("Image CFG scale", "image_cfg_scale", float),
    ("Mask blur", "mask_blur", int),
    ("Masked content", "inpainting_fill", _masked_content),
    ("Inpaint area", "inpaint_full_res", lambda v: v == "Only masked"),
    ("Masked area padding", "inpaint_full_res_padding", int),
    ("Mask mode", "inpainting_mask_invert", lambda v: 1 if v == "Inpaint not masked" else 0),
)
# Options an infotext names (OptionInfo(infotext=...)) that this server applies. "Model hash" is left out: A1111's
# `disable_weights_auto_swap` (on by default) keeps the checkpoint the caller chose.
OPTION_FIELDS: tuple[tuple[str, str, Convert], ...] = (
    ("Clip skip", "CLIP_stop_at_last_layers", int),
    ("RNG", "randn_source", _text),
    ("ENSD", "eta_noise_seed_delta", int),
)


def _fields(body: GenerationBase) -> tuple[tuple[str, str, Convert], ...]:
    if isinstance(body, Txt2ImgRequest):
        return COMMON_FIELDS + TXT2IMG_FIELDS
    if isinstance(body, Img2ImgRequest):
        return COMMON_FIELDS + IMG2IMG_FIELDS
    return COMMON_FIELDS


def _convert(key: str, value: Any, convert: Convert) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ApiError(
            422, f"infotext: '{key}: {value}' is not a valid value", field="infotext", code="invalid_request"
        ) from None


def apply_infotext(body: GenerationBase, options: Mapping[str, Any]) -> GenerationBase:
    """`body` with the fields its `infotext` names filled in where the client did not set them (a copy);
    override_settings gains the options the infotext names that differ from the current `options`."""
    if not body.infotext:
        return body
    params = parse_generation_parameters(body.infotext, with_defaults=False)
    sent = body.model_fields_set
    update: dict[str, Any] = {}
    for key, name, convert in _fields(body):
        if name not in sent and key in params:
            update[name] = _convert(key, params[key], convert)
    if isinstance(body, Txt2ImgRequest) and "enable_hr" not in sent:
        hires = "Hires upscale" in params or "Hires upscaler" in params or "Hires resize-1" in params
        if "Denoising strength" in params and hires:
            update["enable_hr"] = True
    overrides = dict(body.override_settings)
    for key, name, convert in OPTION_FIELDS:
        if key in params and name not in overrides:
            value = _convert(key, params[key], convert)
            if value != options.get(name):
                overrides[name] = value
    if overrides != body.override_settings:
        update["override_settings"] = overrides
    if not update:
        return body
    return body.model_copy(update=update)  # values already converted to the fields' types
