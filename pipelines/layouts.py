"""Key layouts of denoiser files: the community's (ldm UNet keys for SD1.x/SDXL, BFL keys for FLUX.1, Qwen-Image's
own, which are diffusers') and diffusers'. Community files may also carry the `model.diffusion_model.` prefix.

`to_diffusers` reads any of them into diffusers' keys (diffusers' own converters where they fit: the ldm UNet one;
ours for FLUX, whose width diffusers' converter fixes at 3072); `to_community` is the inverse, used by
`easel quantize` so its files load in ComfyUI/Forge as well as here. Pure renames and dim-0 splits/concatenations,
so they work unchanged on GGUF-quantized parameters (diffusers' GGUFParameter keeps its quantisation type through
them: a row is a whole number of quantisation blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from pipelines import flux_keys
from pipelines.single_file import convert_flux_to_diffusers

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
UNET_FAMILIES = ("sd15", "sdxl")


class LayoutError(ValueError):
    """The tensors are not a denoiser of the expected family (the message says what they look like)."""


def common_prefix(keys: Iterable[str]) -> str:
    """The `model.diffusion_model.`-style prefix every key has, or ""."""
    keys = list(keys)
    return next((p for p in PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def denoiser_keys(keys: Iterable[str]) -> list[str]:
    """The denoiser's keys of a file: all of them when it holds only the denoiser (with or without a
    `model.diffusion_model.`-style prefix); those under the prefix in an all-in-one checkpoint, where the text
    encoders and VAE sit beside it (ComfyUI's flux1-dev-fp8, A1111's SD checkpoints)."""
    keys = list(keys)
    for prefix in PREFIXES:
        inside = [k for k in keys if k.startswith(prefix)]
        if inside:
            return inside
    return keys


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = common_prefix(state)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def detect_layout(keys: set[str]) -> tuple[str, str]:
    """(family kind, layout) of a denoiser's keys (prefix stripped): kind unet|flux|qwen, layout original|diffusers."""
    if any(k.startswith("double_blocks.") for k in keys):
        return "flux", "original"
    if any(k.startswith("input_blocks.") for k in keys):
        return "unet", "original"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "unet", "diffusers"
    if "x_embedder.weight" in keys and any(k.startswith("single_transformer_blocks.") for k in keys):
        return "flux", "diffusers"
    if "img_in.weight" in keys and "txt_norm.weight" in keys:
        return "qwen", "diffusers"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise LayoutError(f"not a UNet, FLUX or Qwen-Image denoiser (keys like {sample})")


def kind_of(family: str) -> str:
    return "unet" if family in UNET_FAMILIES else "flux" if family == "flux" else "qwen"


KIND_LABELS = {"unet": "an SD1.x/SDXL UNet", "flux": "a FLUX.1 transformer", "qwen": "a Qwen-Image transformer"}


def to_diffusers(state: Mapping[str, torch.Tensor], family: str, config: Mapping) -> dict[str, torch.Tensor]:
    """Any supported layout of `family`'s denoiser -> diffusers keys. Raises LayoutError for another family's file."""
    state = strip_prefix(state)
    kind, layout = detect_layout(set(state))
    if kind != kind_of(family):
        raise LayoutError(f"it holds {KIND_LABELS[kind]}, but the model's family is {family}")
    if layout == "diffusers":
        return state
    if kind == "flux":
        return convert_flux_to_diffusers(state)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint({PREFIXES[0] + k: v for k, v in state.items()}, dict(config))


def to_community(state: Mapping[str, torch.Tensor], family: str, config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers keys -> the layout community files use: ldm (no prefix) for UNets, BFL for FLUX, as is for Qwen."""
    if family in UNET_FAMILIES:
        return {unet_key_to_ldm(k, config): v for k, v in state.items()}
    if family == "flux":
        return flux_to_bfl(state)
    return dict(state)


# --- SD UNet: diffusers -> ldm ---------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def unet_key_to_ldm(key: str, config: Mapping) -> str:
    """One diffusers UNet2DConditionModel key as the ldm key (for any number of levels and layers per level)."""
    per_level = config["layers_per_block"]
    per_level = per_level if isinstance(per_level, int) else per_level[0]
    for src, dst in _TOP.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    parts = key.split(".")
    if parts[0] == "mid_block":  # resnet, attention, resnet
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block.1", *rest])
        return ".".join([f"middle_block.{2 * j}", _RESNET.get(rest[0], rest[0]), *rest[1:]])
    if parts[0] not in ("down_blocks", "up_blocks"):
        raise LayoutError(f"no ldm name for UNet key {key}")
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if kind == "downsamplers":  # conv -> input_blocks.N.0.op, after the level's layers
        return ".".join([f"input_blocks.{(level + 1) * (per_level + 1)}.0.op", *rest[1:]])
    if kind == "upsamplers":  # conv -> output_blocks.N.{1|2}.conv, after the level's last resnet (and attention)
        block = level * (per_level + 1) + per_level
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return ".".join([f"output_blocks.{block}.{slot}", *rest])
    if parts[0] == "down_blocks":
        block = f"input_blocks.{1 + level * (per_level + 1) + j}"
    else:  # up levels have one layer more (the skip connections of the down level's layers and its downsample)
        block = f"output_blocks.{level * (per_level + 1) + j}"
    if kind == "attentions":  # the transformer's inner names are the same in both layouts
        return ".".join([block + ".1", *rest])
    return ".".join([block + ".0", _RESNET.get(rest[0], rest[0]), *rest[1:]])


# --- FLUX: diffusers -> BFL ------------------------------------------------------------------------------------------


def flux_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> BFL keys (the inverse of `convert_flux_to_diffusers`)."""
    try:
        out, unnamed = flux_keys.to_bfl(sd)
    except KeyError as e:
        raise LayoutError(f"FLUX transformer without the tensor {e}") from e
    if unnamed:
        raise LayoutError(f"FLUX transformer keys with no BFL name: {', '.join(sorted(unnamed)[:3])}")
    return out
