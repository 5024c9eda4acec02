"""Why a single-file ControlNet did not load, in words a user can act on.

diffusers converts an ldm (lllyasviel) ControlNet file with `dict.get`, so a file with missing tensors fails deep in
the load with "is_floating_point(): argument 'input' must be Tensor, not NoneType". Only after such a failure (the
check reads the file once more), this converts the file the same way and compares it with the model its config
describes: which tensors are missing, which have another shape, or that the file is no ControlNet at all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file

LABELS = {"sd15": "an SD1.5", "sdxl": "an SDXL"}


class ControlNetFileError(ValueError):
    """A single-file ControlNet whose tensors are not the model its config describes (the message says how)."""


def describe_mismatch(path: Path, config: Path, label: str) -> str | None:
    """What keeps `path` from being the `label` ControlNet `config` describes, or None when nothing is found."""
    model_config = ControlNetModel.load_config(str(config))
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in ControlNetModel.from_config(model_config).state_dict().items()}
    state = load_file(str(path))
    try:
        converted = convert_controlnet_checkpoint(state, model_config)
    except (KeyError, IndexError, ValueError) as e:  # a layout the converter cannot even walk
        converted, reason = {}, f"{type(e).__name__}: {e}"
    else:
        reason = ""
    found = {k: tuple(v.shape) for k, v in converted.items() if isinstance(v, torch.Tensor)}
    if not expected.keys() & found.keys():
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        detail = f"; {reason}" if reason else ""
        return f"{path.name} is not {label} ControlNet in the ldm or diffusers layout (keys like {sample}){detail}"
    missing = sorted(expected.keys() - found.keys())
    if missing:
        return (
            f"{path.name} lacks {len(missing)} of the {len(expected)} tensors of {label} ControlNet "
            f"(e.g. {', '.join(missing[:3])}): a truncated or partial file"
        )
    reshaped = [f"{k} {found[k]} where the config needs {shape}" for k, shape in expected.items() if found[k] != shape]
    if reshaped:
        return (
            f"{path.name} does not fit the config in {config}: {len(reshaped)} tensors of {label} ControlNet have "
            f"another shape (e.g. {reshaped[0]})"
        )
    return None
