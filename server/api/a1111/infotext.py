"""A1111 infotext: the "parameters" text stored in every image, written and parsed as A1111 v1.10 does
(`processing.create_infotext`, `infotext_utils.quote/unquote/parse_generation_parameters`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# infotext_utils.re_param_code (v1.10): "Key: value" pairs, values possibly JSON-quoted.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

# Keys parse_generation_parameters fills in when an infotext lacks them (the v1.10 defaults that need no options).
PARSE_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def quote(value: Any) -> Any:
    """JSON-quote a value that contains a separator (`,`, newline or `:`); leave others as they are."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_number(value: float | int) -> str:
    """7.0 -> "7", 7.5 -> "7.5": whole floats print as integers, as in A1111's infotexts."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def create_infotext(
    prompt: str,
    negative_prompt: str,
    params: Mapping[str, Any],
) -> str:
    """`{prompt}\\nNegative prompt: {neg}\\nSteps: 20, Sampler: Euler a, ...`.

    `params` is ordered as A1111 orders `generation_params`; None values are left out, a value equal to its key is
    written bare (A1111's `k if k == v`), others as `Key: quote(value)`.
    """
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{text}".strip()


def parse_generation_parameters(text: str, *, with_defaults: bool = True) -> dict[str, Any]:
    """Infotext -> dict with "Prompt", "Negative prompt", "Steps", "Sampler", "Size-1", "Size-2", ... (A1111 v1.10).

    Styles are not extracted (no style presets here); option-dependent back-compat rules are not applied.
    `with_defaults=False` leaves out the keys A1111 fills in when the text lacks them (only what the text says).
    """
    res: dict[str, Any] = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    for key, value in RE_PARAM.findall(lastline):
        if value and value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"] = m.group(1)
            res[f"{key}-2"] = m.group(2)
        else:
            res[key] = value

    if with_defaults:
        for key, default in PARSE_DEFAULTS.items():
            res.setdefault(key, default)
    return res
