"""bitsandbytes 4-bit weights (NF4, FP4) in a .safetensors file, read without bitsandbytes: Forge's
flux1-dev-bnb-nf4 (v1, double-quantized) and -v2 (float32 block scales), and checkpoints saved by diffusers or
transformers with a BitsAndBytesConfig.

A quantized weight `W` is stored as bitsandbytes' `QuantState.as_dict(packed=True)` writes it:

- `W`: uint8, two 4-bit codes per byte, the first value in the high nibble;
- `W.quant_map`: the 16 code values (NF4's normal-float table, or FP4's);
- `W.absmax`: one scale per block of `blocksize` values (float32), or, double-quantized, one uint8 per block decoded
  as `nested_quant_map[absmax] * nested_absmax[block // nested_blocksize] + nested_offset`;
- `W.quant_state.bitsandbytes__nf4` (or `__fp4`): JSON as uint8 bytes with `shape`, `dtype`, `blocksize` and the
  `nested_*` fields.

value = quant_map[code] * absmax[index // blocksize]. 8-bit (LLM.int8) weights (`W.SCB`) are another format, refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import torch

QUANT_STATE = ".quant_state.bitsandbytes__"
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
INT8_SUFFIXES = (".SCB", ".weight_format")
QUANT_TYPES = ("nf4", "fp4")


def is_aux(key: str) -> bool:
    """A key that belongs to a quantized weight's state rather than being a weight itself."""
    return key.endswith(AUX_SUFFIXES) or QUANT_STATE in key


def quant_types(keys: Iterable[str]) -> set[str]:
    """The bitsandbytes formats among `keys` ('nf4', 'fp4', 'int8'; empty when none)."""
    keys = list(keys)
    found = {k.rpartition(QUANT_STATE)[2] for k in keys if QUANT_STATE in k}
    if any(k.endswith(INT8_SUFFIXES) for k in keys):
        found.add("int8")
    return found


def check_quant_types(keys: Iterable[str]) -> None:
    """ValueError naming what is not readable here: bitsandbytes 8-bit or an unknown 4-bit type."""
    unsupported = sorted(quant_types(keys) - set(QUANT_TYPES))
    if unsupported:
        raise ValueError(
            f"bitsandbytes {', '.join(unsupported)} weights are not supported (4-bit NF4 and FP4 files are; "
            "re-save the model in bf16, FP8 or GGUF)"
        )


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every bitsandbytes 4-bit weight decoded to its stored dtype and the state keys removed; other
    tensors as they are. ValueError where a weight's state is incomplete or inconsistent."""
    check_quant_types(tensors)
    out = {k: v for k, v in tensors.items() if not is_aux(k)}
    for key in tensors:
        if QUANT_STATE in key:
            weight = key.rpartition(QUANT_STATE)[0]
            if weight not in tensors:
                raise ValueError(f"{key}: the quantized weight {weight} is missing")
            try:
                state = json.loads(bytes(tensors[key].flatten().tolist()).decode())
            except (ValueError, TypeError) as e:  # not UTF-8 JSON
                raise ValueError(f"{key}: an unreadable bitsandbytes quant state ({e})") from e
            out[weight] = _decode(weight, tensors, state)
    return out


def _decode(weight: str, tensors: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    try:
        shape, blocksize = tuple(state["shape"]), int(state["blocksize"])
        dtype = getattr(torch, state["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {state['dtype']!r}")
        codes = tensors[f"{weight}.quant_map"].float()
        absmax = tensors[f"{weight}.absmax"]
        if "nested_blocksize" in state:
            nested_map = tensors[f"{weight}.nested_quant_map"].float()
            nested_scale = tensors[f"{weight}.nested_absmax"].float()
            block_of = torch.arange(absmax.numel()) // int(state["nested_blocksize"])
            absmax = nested_map[absmax.long()] * nested_scale[block_of] + float(state["nested_offset"])
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise ValueError(f"{weight}: an incomplete bitsandbytes 4-bit state ({type(e).__name__}: {e})") from e
    count = math.prod(shape)
    packed = tensors[weight].reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != (count + 1) // 2 or absmax.numel() != -(-count // blocksize):
        raise ValueError(
            f"{weight}: {packed.numel()} packed bytes and {absmax.numel()} block scales do not make the shape "
            f"{list(shape)} in blocks of {blocksize}"
        )
    index = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)[:count].long()
    values = codes[index] * absmax.float().repeat_interleave(blocksize)[:count]
    return values.reshape(shape).to(dtype)
