"""The A1111 options (`opts`) this server knows, as data: type, range or choices, default. Every value is checked
when it is set (POST /options, kept `override_settings`): a bad one is a 422 naming the option, so no stored value
can make a later txt2img/img2img fail. Values are read back through `effective` too, which replaces anything that
does not pass (a value stored before these checks existed) with the default.

The rest of A1111's own options (`a1111_options.yaml`: every setting of A1111 v1.10 with its default, and its range
or choices where A1111 fixes them) are served by GET /options with those defaults, checked for their type (and range
or choices) when set, and stored: they change nothing here. `OPTIONS` below wins over that file for the options that
change what this server does.

Options this server does not know (A1111 extensions set many) are kept as clients send them, within size bounds:
`MAX_VALUE_BYTES` per value as JSON, `MAX_TOTAL_BYTES` for everything one session stores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from server.errors import FieldError

MAX_VALUE_BYTES = 4 * 1024
MAX_TOTAL_BYTES = 64 * 1024
MAX_NAME_CHARS = 128
MAX_INT = 2**63 - 1  # what a 64-bit integer column (and torch) can hold

Kind = Literal["bool", "int", "float", "str", "choice", "color", "list", "any"]
CATALOG_PATH = Path(__file__).with_name("a1111_options.yaml")
HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class Option:
    kind: Kind
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    max_chars: int = 256


def _b(default: bool) -> Option:
    return Option("bool", default)


# Ranges follow A1111's own sliders (modules/shared_options.py); choices are what this server can honour.
OPTIONS: dict[str, Option] = {
    "samples_format": Option("choice", "png", choices=("png", "jpg", "jpeg", "webp")),
    # The ControlNet extension's: detected maps left out of the returned images; units its UI shows.
    "control_net_no_detectmap": _b(False),
    "control_net_unit_count": Option("int", 3, min=1, max=10),
    "jpeg_quality": Option("int", 80, min=1, max=100),
    "webp_lossless": _b(False),
    "enable_pnginfo": _b(True),
    "add_model_hash_to_info": _b(True),
    "add_model_name_to_info": _b(True),
    "add_version_to_infotext": _b(True),
    "return_grid": _b(True),
    "grid_only_if_multiple": _b(True),
    "n_rows": Option("int", -1, min=-1, max=16),
    "return_mask": _b(False),
    "return_mask_composite": _b(False),
    "sd_vae": Option("str", "Automatic"),
    "sd_checkpoints_limit": Option("int", 3, min=1, max=1000),
    "sd_checkpoint_cache": Option("int", 0, min=0, max=10),
    "CLIP_stop_at_last_layers": Option("int", 1, min=1, max=12),
    "eta_noise_seed_delta": Option("int", 0, min=0, max=MAX_INT),
    "randn_source": Option("choice", "GPU", choices=("GPU", "CPU", "NV")),
    "eta_ancestral": Option("float", 1.0, min=0.0, max=1.0),
    "eta_ddim": Option("float", 0.0, min=0.0, max=1.0),
    "s_churn": Option("float", 0.0, min=0.0, max=100.0),
    "s_tmin": Option("float", 0.0, min=0.0, max=10.0),
    "s_tmax": Option("float", 0.0, min=0.0, max=999.0),
    "s_noise": Option("float", 1.0, min=0.0, max=1.1),
    "k_sched_type": Option("choice", "Automatic", choices=("Automatic", "karras", "exponential", "polyexponential")),
    "sigma_min": Option("float", 0.0, min=0.0, max=1000.0),
    "sigma_max": Option("float", 0.0, min=0.0, max=1000.0),
    "rho": Option("float", 0.0, min=0.0, max=100.0),
    "img2img_background_color": Option("color", "#ffffff"),
    "inpainting_mask_weight": Option("float", 1.0, min=0.0, max=1.0),
    "initial_noise_multiplier": Option("float", 1.0, min=0.0, max=1.5),
    "face_restoration": _b(False),
    "face_restoration_model": Option("str", None, nullable=True),
    "tiling": _b(False),
    # 0 = live previews off (this server does not make previews; A1111's -1 means "after each batch").
    # Live previews (pipelines.previews, A1111's "Approx cheap") on /progress every N steps; 0 or -1: none.
    "show_progress_every_n_steps": Option("int", 10, min=-1, max=32),
    "live_previews_enable": _b(True),
    "api_enable_requests": _b(False),
    "api_forbid_local_requests": _b(True),
    "sd_model_checkpoint": Option("str", None, nullable=True, max_chars=1024),  # resolved against the registry
}
# Not in the stored defaults: absent means "the default" (A1111 has them, clients may set them).
NOT_LISTED = frozenset({"s_tmax", "sd_model_checkpoint"})


def _catalog_option(name: str, entry: Mapping[str, Any]) -> Option:
    """One entry of a1111_options.yaml as an Option: the kind is the default's type."""
    default = entry["default"]
    choices = tuple(entry.get("choices") or ())
    low, high = entry.get("min"), entry.get("max")
    if isinstance(default, bool):
        return Option("bool", default)
    if isinstance(default, int | float):
        return Option("int" if isinstance(default, int) else "float", default, min=low, max=high)
    if isinstance(default, str):
        if choices:
            return Option("choice", default, choices=choices)
        return Option("color", default) if HEX_COLOR.match(default) else Option("str", default, max_chars=1024)
    if isinstance(default, list):
        return Option("list", default)
    if default is None:
        return Option("any", None, nullable=True)
    raise ValueError(f"{CATALOG_PATH.name}: option {name!r} has a default of unsupported type {type(default).__name__}")


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, Option]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {name: _catalog_option(name, entry) for name, entry in entries.items()}


# A1111's whole option set, with this server's own table over it.
CATALOG: dict[str, Option] = load_catalog()
ALL_OPTIONS: dict[str, Option] = {**CATALOG, **OPTIONS}


def catalog_defaults() -> dict[str, Any]:
    """Every A1111 option with its default, as GET /options shows it before anything is stored (this server's own
    defaults over A1111's). Kept apart from the stored options, so they do not count against MAX_TOTAL_BYTES."""
    return {k: o.default for k, o in ALL_OPTIONS.items()}


def defaults(**overrides: Any) -> dict[str, Any]:
    """The options GET /options shows before anyone sets one."""
    return {**{k: o.default for k, o in OPTIONS.items() if k not in NOT_LISTED}, **overrides}


def problem(option: Option, value: Any) -> str | None:
    """Why `value` is not a valid value of `option`, or None."""
    if value is None:
        return None if option.nullable else "must not be null"
    if option.kind == "any":
        return None
    if option.kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if option.kind == "list":
        return None if isinstance(value, list) else "must be a list"
    if option.kind in ("int", "float"):
        number_ok = isinstance(value, int) or (option.kind == "float" and isinstance(value, float))
        if isinstance(value, bool) or not number_ok:
            return "must be an integer" if option.kind == "int" else "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if (option.min is not None and value < option.min) or (option.max is not None and value > option.max):
            return f"must be between {option.min:g} and {option.max:g}"
        return None
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > option.max_chars:
        return f"must be at most {option.max_chars} characters"
    if option.kind == "choice" and value.lower() not in {c.lower() for c in option.choices}:
        return f"must be one of: {', '.join(option.choices)}"
    if option.kind == "color" and not HEX_COLOR.match(value):
        return "must be a colour as #rrggbb"
    return None


def _json_size(value: Any) -> int | None:
    """Bytes of `value` as JSON, or None if it cannot be stored (lone surrogates, NaN)."""
    try:
        return len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError):
        return None


def check(values: Mapping[str, Any], prefix: str = "") -> list[FieldError]:
    """Every problem with `values` (a POST /options body, or override_settings with `prefix`), each naming its
    option; the sizes of unknown options are bounded here, the total by `check_total`."""
    errors: list[FieldError] = []
    for name, value in values.items():
        field = f"{prefix}{name}"
        if len(name) > MAX_NAME_CHARS or _json_size(name) is None:
            errors.append(FieldError(field[:MAX_NAME_CHARS], "not a valid option name"))
            continue
        size = _json_size(value)
        if size is None:
            errors.append(FieldError(field, "not a storable value (invalid text or number)"))
        elif size > MAX_VALUE_BYTES:
            errors.append(FieldError(field, f"too large: at most {MAX_VALUE_BYTES} bytes as JSON"))
        elif (option := ALL_OPTIONS.get(name)) is not None and (why := problem(option, value)) is not None:
            errors.append(FieldError(field, why))
    return errors


def check_total(stored: Mapping[str, Any], field: str) -> list[FieldError]:
    size = _json_size(dict(stored)) or 0
    if size > MAX_TOTAL_BYTES:
        return [FieldError(field, f"the options would take {size} bytes; at most {MAX_TOTAL_BYTES} are kept")]
    return []


def normalise(name: str, value: Any) -> Any:
    """A checked value as it is kept: choices in their canonical spelling, integral floats as floats."""
    option = ALL_OPTIONS.get(name)
    if option is None or value is None:
        return value
    if option.kind == "choice":
        return next(c for c in option.choices if c.lower() == value.lower())
    if option.kind == "float":
        return float(value)
    return value


def effective(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Options as requests use them: a known option whose stored value does not pass falls back to its default."""
    out = dict(stored)
    for name, option in ALL_OPTIONS.items():
        if name in out and problem(option, out[name]) is not None:
            out[name] = option.default
    return out
