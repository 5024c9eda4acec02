"""FLUX.1 transformer keys in BFL's layout (the original; community and ComfyUI/Forge files) and in diffusers'.

One table drives both directions, so loading a BFL file (`to_diffusers`) and writing one (`to_bfl`, for
`easel quantize`) cannot drift apart. The mapping is diffusers' `convert_flux_transformer_checkpoint_to_diffusers`,
except that the hidden size is read from the weights (diffusers' fixes it at 3072: full-size FLUX.1 only).

Only renames, dim-0 splits/concatenations and a swap of two dim-0 halves: they work unchanged on GGUF-quantized
parameters (a row is a whole number of quantisation blocks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    """One BFL tensor and the diffusers tensor(s) it holds: several are its dim-0 parts, in order, of equal size
    (qkv) or, with `mlp_last`, `inner` rows each but the last, which takes the rest (a single block's linear1)."""

    bfl: str
    diffusers: tuple[str, ...]
    mlp_last: bool = False
    swap_halves: bool = False  # the final AdaLayerNorm: BFL projects to (shift, scale), diffusers to (scale, shift)


_LINEAR = ("weight", "bias")
_TOP = [
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
# dev/Fill/Kontext are guidance-distilled; schnell has no guidance embedder.
_GUIDANCE = [
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
]
_DOUBLE = [
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
]
_DOUBLE_NORMS = [  # RMSNorm scales: BFL `.scale`, diffusers `.weight`
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [
    ("modulation.lin", ("norm.linear",)),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


def rules(double_blocks: int, single_blocks: int, guidance: bool) -> list[Rule]:
    """Every tensor of a FLUX.1 transformer with this many blocks, as BFL -> diffusers rules."""
    linears = [(b, (d,)) for b, d in _TOP + (_GUIDANCE if guidance else [])]
    norms: list[tuple[str, str]] = []
    for i in range(double_blocks):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        linears += [(b + bfl, tuple(d + n for n in names)) for bfl, names in _DOUBLE]
        norms += [(b + bfl, d + name) for bfl, name in _DOUBLE_NORMS]
    for i in range(single_blocks):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        linears += [(b + bfl, tuple(d + n for n in names)) for bfl, names in _SINGLE]
        norms += [(b + bfl, d + name) for bfl, name in _SINGLE_NORMS]
    out = [
        Rule(f"{b}.{kind}", tuple(f"{n}.{kind}" for n in ds), mlp_last=ds[-1].endswith("proj_mlp"))
        for b, ds in linears
        for kind in _LINEAR
    ]
    out += [Rule(b, (d,)) for b, d in norms]
    out += [Rule(f"final_layer.adaLN_modulation.1.{k}", (f"norm_out.linear.{k}",), swap_halves=True) for k in _LINEAR]
    return out


def _count(keys: Mapping[str, object], root: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(root)}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_diffusers(bfl: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """BFL keys -> (diffusers keys, the tensors no rule names). A missing tensor raises KeyError naming it."""
    src = dict(bfl)
    inner = src["img_in.weight"].shape[0]
    guidance = "guidance_in.in_layer.weight" in src
    out: dict[str, torch.Tensor] = {}
    for rule in rules(_count(src, "double_blocks"), _count(src, "single_blocks"), guidance):
        tensor = src.pop(rule.bfl)
        if rule.swap_halves:
            tensor = _swap_halves(tensor)
        if len(rule.diffusers) == 1:
            out[rule.diffusers[0]] = tensor
            continue
        n = len(rule.diffusers)
        parts = (
            tensor.split([inner] * (n - 1) + [tensor.shape[0] - inner * (n - 1)]) if rule.mlp_last else tensor.chunk(n)
        )
        for name, part in zip(rule.diffusers, parts, strict=True):
            out[name] = part.contiguous()
    return out, src


def to_bfl(diffusers: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """diffusers keys -> (BFL keys, the tensors no rule names). A missing tensor raises KeyError naming it."""
    src = dict(diffusers)
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in src
    out: dict[str, torch.Tensor] = {}
    for rule in rules(_count(src, "transformer_blocks"), _count(src, "single_transformer_blocks"), guidance):
        parts = [src.pop(name) for name in rule.diffusers]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[rule.bfl] = _swap_halves(tensor) if rule.swap_halves else tensor
    return out, src
