"""The original (ldm / lllyasviel) single-file ControlNet layout, built from a diffusers ControlNet: the reverse of
diffusers' `convert_controlnet_checkpoint` (diffusers/loaders/single_file_utils.py), so tests can make the files
users download (control_v11p_sd15_canny.safetensors) offline from the tiny demo ControlNet.

ldm numbers the UNet's encoder flat: `input_blocks.0.0` is conv_in, then each down block has `layers_per_block`
blocks of (resnet `.0`, attention `.1` where the block has one) and, except the last, a downsampler `.0.op`. The
mid block is `middle_block.0/1/2` (resnet, attention, resnet), the zero convolutions `zero_convs.N.0` (one per input
block) and `middle_block_out.0`, the hint embedding `input_hint_block.0, 2, 4, ..., 14` (SiLUs between)."""

from __future__ import annotations

import torch

# diffusers' resnet names -> ldm's (update_unet_resnet_ldm_to_diffusers, reversed)
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP = {  # DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_cond_embedding.conv_out": "input_hint_block.14",
    "controlnet_mid_block": "middle_block_out.0",
}


def resnet_to_ldm(rest: str) -> str:
    """A diffusers resnet parameter (`conv1.weight`) under ldm's name (`in_layers.2.weight`)."""
    layer, _, param = rest.partition(".")
    return f"{_RESNET[layer]}.{param}"


def to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, prefix: str = "control_model.") -> dict:
    """`state` (a diffusers ControlNetModel's state dict) under the ldm names, each with `prefix` (the original
    files carry `control_model.`; some extracted ones none)."""
    out: dict[str, torch.Tensor] = {}
    per_block = layers_per_block + 1  # ldm input blocks per down block: its layers and a downsampler
    for key, value in state.items():
        parts = key.split(".")
        top = next((t for t in _TOP if key.startswith(t + ".")), None)
        if top is not None:
            name = _TOP[top] + key[len(top) :]
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":  # conv.weight -> op.weight
                name = f"input_blocks.{1 + block * per_block + layers_per_block}.0.op.{parts[-1]}"
            elif kind == "resnets":
                name = f"input_blocks.{1 + block * per_block + index}.0.{resnet_to_ldm(rest)}"
            else:  # attentions: the transformer's inner names are the same in both layouts
                name = f"input_blocks.{1 + block * per_block + index}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                name = f"middle_block.{2 * index}.{resnet_to_ldm(rest)}"
            else:
                name = f"middle_block.1.{rest}"
        elif parts[0] == "controlnet_down_blocks":
            name = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif key.startswith("controlnet_cond_embedding.blocks."):
            name = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[3]}"
        else:
            raise ValueError(f"no ldm name for {key}")
        out[prefix + name] = value
    return out
