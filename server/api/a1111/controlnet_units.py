"""`alwayson_scripts.controlnet.args`: the sd-webui-controlnet extension's units -> `ControlUnit`s.

Defaults and spellings are the extension's (internal_controlnet/args.py, v1.1.455): `enabled` false, module "none",
weight 1 (0-2), resize_mode "Crop and Resize", processor_res / threshold_a / threshold_b -1 (the module's default),
guidance 0-1, control_mode "Balanced", pixel_perfect false, hr_option "Both", save_detected_map true. Older
clients' spellings are read too: `input_image` (image), `guidance` (guidance_end), `lowvram` (low_vram), `mask_image`
(mask), control_mode and resize_mode as ints, the old resize mode names. Every problem is a 422 naming the unit's
field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines import controlnet_models
from pipelines.control_units import (
    ControlMode,
    ControlResize,
    ControlUnit,
    HiresOption,
    fit_control_image,
)
from pipelines.controlnet_preprocessors import (
    PreprocessorError,
    PreprocessorParams,
    canonical_module,
    pixel_perfect_resolution,
    resolve_params,
    run_preprocessor,
)
from pipelines.request import GenerationRequest
from server.errors import ApiError, FieldError
from server.images import decode_image
from server.settings import Settings

log = logging.getLogger("easel.a1111")

SCRIPT = "controlnet"
MAX_UNITS = 10  # the extension's UI offers up to 10 units (control_net_unit_count)
LEGACY_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}
RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": ControlResize.INNER_FIT,
    "Outer Fit (Shrink to Fit)": ControlResize.OUTER_FIT,
    "Scale to Fit (Inner Fit)": ControlResize.INNER_FIT,
    "Envelope (Outer Fit)": ControlResize.OUTER_FIT,
}
NO_MODEL = ("", "none")


def script_args(alwayson: dict[str, Any]) -> tuple[str, Any] | None:
    """The key clients used for the extension (A1111 matches script names in any case) and its `args`."""
    for key, value in alwayson.items():
        if key.lower() == SCRIPT:
            return key, value.get("args", []) if isinstance(value, dict) else value
    return None


def is_controlnet_script(name: str) -> bool:
    return name.lower() == SCRIPT


@dataclass
class ParsedUnit:
    """A unit's fields after defaults and checks; images still base64."""

    index: int
    module: str
    model: controlnet_models.ControlNetEntry
    weight: float
    image: Any
    mask: Any
    resize_mode: ControlResize
    processor_res: int
    threshold_a: float
    threshold_b: float
    guidance_start: float
    guidance_end: float
    control_mode: ControlMode
    pixel_perfect: bool
    save_detected_map: bool
    hr_option: HiresOption
    image_encoder: str | None = None  # an IP-Adapter unit's CLIP image encoder (pipelines.ip_adapter)


def _number(raw: dict[str, Any], name: str, default: float, bad: list[FieldError], where: str) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        bad.append(FieldError(f"{where}.{name}", "must be a finite number"))
        return default
    return float(value)


def _control_mode(value: Any) -> ControlMode | None:
    if isinstance(value, ControlMode):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ControlMode):
        return list(ControlMode)[value]
    if isinstance(value, str):
        return next((m for m in ControlMode if m.value == value), None)
    return None


def _resize_mode(value: Any) -> ControlResize | None:
    """Names, the old names, and ints (0-2; 3, A1111's "Just Resize (Latent upscale)", and above are Just Resize)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value < 0 else list(ControlResize)[value] if value < len(ControlResize) else ControlResize.RESIZE
    if isinstance(value, str):
        return RESIZE_ALIASES.get(value) or next((m for m in ControlResize if m.value == value), None)
    return None


def _is_ip_adapter(module: str, model: str) -> bool:
    text = f"{module} {model}".lower()
    return "ip-adapter" in text or "ip_adapter" in text or "ipadapter" in text


Entries = list[controlnet_models.ControlNetEntry]


def image_encoder_for(
    entry: controlnet_models.ControlNetEntry, module: str, models: Path | None
) -> tuple[str | None, str | None]:
    """An IP-Adapter's CLIP image encoder folder, or why there is none. The extension picks the encoder by module:
    `ip-adapter_clip_sdxl` / `_clip_g` use ViT-bigG, the others ViT-H; here they are transformers folders
    (config.json + model.safetensors) at `<models>/clip_vision/clip_g` and `clip_h`."""
    if entry.source.startswith("demo-ip:"):
        return entry.source, None  # the demo IP-Adapter brings its own
    name = entry.name.lower()
    bigg = module in ("ip-adapter_clip_sdxl", "ip-adapter_clip_g") or (
        module == "ip-adapter-auto" and "sdxl" in name and "vit-h" not in name
    )
    folder_name = "clip_g" if bigg else "clip_h"
    folder = models / "clip_vision" / folder_name if models is not None else None
    if folder is None or not (folder / "config.json").is_file():
        return None, (
            f"IP-Adapter '{entry.name}' needs its image encoder: a CLIPVisionModelWithProjection folder "
            f"(config.json + model.safetensors) at <models>/clip_vision/{folder_name}"
        )
    return str(folder), None


def _is_ip_adapter_entry(entry: controlnet_models.ControlNetEntry) -> bool:
    return entry.source.startswith("demo-ip:") or _is_ip_adapter("", entry.name)


def parse_unit(
    raw: Any, index: int, entries: Entries, models: Path | None = None
) -> tuple[ParsedUnit | None, list[FieldError]]:
    """One unit: (None, []) when it is not enabled, else the parsed unit or its problems."""
    where = f"alwayson_scripts.controlnet.args.{index}"
    bad: list[FieldError] = []
    values = dict(raw)
    for alias, key in LEGACY_ALIASES.items():
        if alias in values:
            if key in values and values[key] is not None and values[alias] is not None:
                return None, [FieldError(f"{where}.{alias}", f"conflicts with '{key}': send one of them")]
            values[key] = values.pop(alias)
    if not values.get("enabled", False):
        if values.get("model") not in (None, "None", ""):
            log.info('ControlNet unit %d is not enabled (send "enabled": true to use it); skipped', index)
        return None, []
    module = str(values.get("module") or "none")
    model_name = str(values.get("model") or "None")
    ip = _is_ip_adapter(module, model_name)
    if ip:  # the CLIP image encoder is the "preprocessor" (pipelines.ip_adapter), not an image operation
        module = module.strip().lower()
        if "face_id" in module or "faceid" in model_name.lower():
            bad.append(FieldError(f"{where}.model", "IP-Adapter FaceID needs insightface, which this server lacks"))
        elif not module.startswith("ip-adapter"):
            bad.append(FieldError(f"{where}.module", "an IP-Adapter model needs an ip-adapter_clip_* module"))
    else:
        try:
            module = canonical_module(module)
        except PreprocessorError as e:
            bad.append(FieldError(f"{where}.module", str(e)))
    entry = None
    if model_name.strip().lower() in NO_MODEL:
        bad.append(FieldError(f"{where}.model", "no ControlNet model selected (see GET /controlnet/model_list)"))
    elif (entry := controlnet_models.resolve(entries, model_name)) is None:
        bad.append(FieldError(f"{where}.model", f"model({model_name}) not found in supported models"))
    encoder = None
    if ip and entry is not None and not bad:
        if not _is_ip_adapter_entry(entry):
            bad.append(FieldError(f"{where}.model", f"'{entry.title}' is a ControlNet, not an IP-Adapter"))
        else:
            encoder, why = image_encoder_for(entry, module, models)
            if why is not None:
                bad.append(FieldError(f"{where}.module", why))
    weight = _number(values, "weight", 1.0, bad, where)
    if not 0.0 <= weight <= 2.0:
        bad.append(FieldError(f"{where}.weight", "must be between 0 and 2"))
    start = _number(values, "guidance_start", 0.0, bad, where)
    end = _number(values, "guidance_end", 1.0, bad, where)
    for name, value in (("guidance_start", start), ("guidance_end", end)):
        if not 0.0 <= value <= 1.0:
            bad.append(FieldError(f"{where}.{name}", "must be between 0 and 1"))
    if start > end:
        bad.append(FieldError(f"{where}.guidance_start", f"guidance_start({start:g}) > guidance_end({end:g})"))
    mode = _control_mode(values.get("control_mode", ControlMode.BALANCED))
    if mode is None:
        choices = ", ".join(f"'{m.value}'" for m in ControlMode)
        bad.append(FieldError(f"{where}.control_mode", f"must be one of {choices} (or 0-2)"))
    resize = _resize_mode(values.get("resize_mode", ControlResize.INNER_FIT.value))
    if resize is None:
        choices = ", ".join(f"'{m.value}'" for m in ControlResize)
        bad.append(FieldError(f"{where}.resize_mode", f"must be one of {choices} (or 0-2)"))
    hr_value = values.get("hr_option", HiresOption.BOTH.value)
    hr_option = next((o for o in HiresOption if o.value == hr_value), None)
    if hr_option is None:
        choices = ", ".join(f"'{o.value}'" for o in HiresOption)
        bad.append(FieldError(f"{where}.hr_option", f"must be one of {choices}"))
    res = _number(values, "processor_res", -1, bad, where)
    ta = _number(values, "threshold_a", -1, bad, where)
    tb = _number(values, "threshold_b", -1, bad, where)
    if bad or entry is None or mode is None or resize is None or hr_option is None:
        return None, bad
    return ParsedUnit(
        index=index,
        module=module,
        model=entry,
        weight=weight,
        image=values.get("image") or None,  # webuiapi sends "" for "no image"
        mask=values.get("mask") or None,
        resize_mode=resize,
        processor_res=int(res),
        threshold_a=ta,
        threshold_b=tb,
        guidance_start=start,
        guidance_end=end,
        control_mode=mode,
        pixel_perfect=bool(values.get("pixel_perfect", False)),
        save_detected_map=bool(values.get("save_detected_map", True)),
        hr_option=hr_option,
        image_encoder=encoder,
    ), []


def parse_units(alwayson: dict[str, Any], entries: Entries, models: Path | None = None) -> list[ParsedUnit]:
    """The enabled units of a request, in order; a 422 naming every bad field."""
    found = script_args(alwayson)
    if found is None:
        return []
    _, args = found
    if not isinstance(args, list):
        raise ApiError.invalid([FieldError("alwayson_scripts.controlnet.args", "must be a list of units")])
    units: list[ParsedUnit] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(args):
        if not isinstance(raw, dict):  # the extension skips what is not a unit (UI positional leftovers)
            continue
        unit, bad = parse_unit(raw, index, entries, models)
        errors += bad
        if unit is not None:
            units.append(unit)
    if len(units) > MAX_UNITS:
        errors.append(FieldError("alwayson_scripts.controlnet.args", f"at most {MAX_UNITS} enabled units"))
    if errors:
        raise ApiError.invalid(errors)
    return units


# Images ---------------------------------------------------------------------------------------------------------


def _image_and_mask(unit: ParsedUnit) -> tuple[Any, Any]:
    """The extension's image forms: base64, {"image", "mask"}, [image, mask], or a list of such dicts (one used)."""
    image, mask = unit.image, unit.mask
    if isinstance(image, list | tuple):
        if image and isinstance(image[0], dict):
            image = image[0]
        elif len(image) == 2:
            image, mask = image
        else:
            raise ApiError.invalid([FieldError(_field(unit, "image"), "expected an image, or [image, mask]")])
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    return image, mask


def _field(unit: ParsedUnit, name: str) -> str:
    return f"alwayson_scripts.controlnet.args.{unit.index}.{name}"


def _decode(data: Any, field: str, settings: Settings) -> Image.Image:
    if not isinstance(data, str):
        raise ApiError.invalid([FieldError(field, "expected a base64-encoded image")])
    try:
        return decode_image(data, field, settings.max_body_bytes, settings.max_image_pixels)
    except ApiError as e:
        if e.status != 422:
            raise
        raise ApiError.invalid([FieldError(field, e.message.removeprefix(f"{field}: "))]) from None


def input_image(
    unit: ParsedUnit, generation: GenerationRequest, settings: Settings
) -> tuple[Image.Image, ControlResize]:
    """The unit's input (and resize mode): its own image, else img2img's first init image with img2img's resize
    mode, as the extension chooses. A mask that is not all on or all off is the input itself (the extension's
    canvas scribble)."""
    data, mask_data = _image_and_mask(unit)
    if data is None:
        if not generation.init_images:
            raise ApiError.invalid(
                [FieldError(_field(unit, "image"), "controlnet is enabled but no input image is given")]
            )
        return generation.init_images[0].convert("RGB"), _resize_mode(generation.resize_mode) or ControlResize.RESIZE
    image = _decode(data, _field(unit, "image"), settings).convert("RGB")
    if mask_data is not None:
        mask = _decode(mask_data, _field(unit, "mask"), settings).convert("L")
        if mask.size != image.size:
            raise ApiError.invalid(
                [FieldError(_field(unit, "mask"), f"size {mask.size} does not match the image's {image.size}")]
            )
        low, high = mask.getextrema()
        if not (high <= 5 or low >= 250):
            image = mask.convert("RGB")
    return image, unit.resize_mode


def build_units(units: list[ParsedUnit], generation: GenerationRequest, settings: Settings) -> list[ControlUnit]:
    """Decode each unit's input, run its preprocessor and fit the detected map to the output size (for the
    preparation thread: this is the image work)."""
    built = []
    for unit in units:
        if unit.image_encoder is not None:  # an IP-Adapter's image prompt: the picture itself, as sent
            image, _ = input_image(replace_mask(unit), generation, settings)
            built.append(
                ControlUnit(
                    model=unit.model.title,
                    source=unit.model.source,
                    image=image,
                    module=unit.module,
                    weight=unit.weight,
                    guidance_start=unit.guidance_start,
                    guidance_end=unit.guidance_end,
                    control_mode=unit.control_mode,
                    save_detected_map=False,
                    hr_option=unit.hr_option,
                    image_encoder=unit.image_encoder,
                )
            )
            continue
        image, resize = input_image(unit, generation, settings)
        resolution = unit.processor_res
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(image.size, (generation.width, generation.height), resize.value)
        # Values outside the module's sliders (the API's -1) are its defaults (controlnet_preprocessors).
        params = unit_params(unit, resolution)
        try:
            detected = run_preprocessor(unit.module, image, params, models_dir(settings))
        except PreprocessorError as e:
            raise ApiError.invalid([FieldError(_field(unit, "module"), str(e))]) from None
        built.append(
            ControlUnit(
                model=unit.model.title,
                source=unit.model.source,
                image=fit_control_image(detected, generation.width, generation.height, resize),
                module=unit.module,
                weight=unit.weight,
                guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end,
                control_mode=unit.control_mode,
                save_detected_map=unit.save_detected_map,
                hr_option=unit.hr_option,
            )
        )
    return built


def unit_params(unit: ParsedUnit, resolution: int | None = None) -> PreprocessorParams:
    res = unit.processor_res if resolution is None else resolution
    return PreprocessorParams(resolution=res, threshold_a=unit.threshold_a, threshold_b=unit.threshold_b)


def replace_mask(unit: ParsedUnit) -> ParsedUnit:
    """The unit without its mask (an IP-Adapter's CLIP mask is not applied here)."""
    return dataclasses.replace(unit, mask=None)


def models_dir(settings: Settings) -> Path | None:
    """The A1111 models directory (ControlNet/, annotator models) preprocessors and ControlNets come from."""
    return settings.checkpoints_dir


def with_units(generation: GenerationRequest, units: list[ControlUnit]) -> GenerationRequest:
    return replace(generation, control_units=units) if units else generation


def infotext_params(units: list[ParsedUnit]) -> dict[str, str]:
    """The extension's infotext keys (`ControlNetUnit.serialize`): `ControlNet N: "Module: none, Model: ...,
    Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, ..."` per enabled unit, values as Python prints
    them."""
    out = {}
    for i, u in enumerate(units):
        res, a, b = u.processor_res, u.threshold_a, u.threshold_b
        if u.image_encoder is None:  # written bound-checked, as the extension writes them
            resolved = resolve_params(u.module, unit_params(u))
            res, a, b = resolved.resolution, resolved.a, resolved.b
        fields = {
            "Module": u.module,
            "Model": u.model.title,
            "Weight": u.weight,
            "Resize Mode": u.resize_mode.value,
            "Processor Res": res,
            "Threshold A": a,
            "Threshold B": b,
            "Guidance Start": u.guidance_start,
            "Guidance End": u.guidance_end,
            "Pixel Perfect": u.pixel_perfect,
            "Control Mode": u.control_mode.value,
        }
        out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items())  # quoted by create_infotext
    return out
