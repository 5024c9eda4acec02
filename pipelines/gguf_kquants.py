"""GGUF K-quant writers (Q4_K, Q5_K, Q6_K) in torch: the gguf package reads these types but cannot write them, and
they are what ComfyUI-GGUF and Forge users download (flux1-dev-Q4_K_S.gguf, qwen-image-Q4_K_M.gguf).

The byte layouts are llama.cpp's (ggml-common.h), the inverse of gguf.quants' dequantizers, which the tests use as
the reference. Super-blocks of 256 values:

- Q4_K / Q5_K: 8 sub-blocks of 32, value = d * sc[j] * q - dmin * m[j] with q in 0..15 (0..31), the sub-block scales
  and minimums 6-bit integers under one fp16 `d` and `dmin` (144 / 176 bytes).
- Q6_K: 16 sub-blocks of 16, value = d * sc[j] * q with q in -32..31 and sc an int8 (210 bytes).

Each sub-block's scale and minimum start from its range and are refined by least squares on the rounded values (the
idea of llama.cpp's make_qkx2_quants, without its search over starting points), within a few percent of its error at
a fraction of the time. Written in torch so the same code runs on the GPU where the writer has one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK_BLOCKS = 16384  # super-blocks converted at once: bounds the float32 temporaries to about 100 MB


def quantize(data: torch.Tensor, qname: str) -> torch.Tensor:
    """`data` (rows of a whole number of 256-value super-blocks) as `qname` bytes (uint8, on `data`'s device),
    shaped like gguf.quants.quantize's output: the last axis becomes bytes."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"{qname}: rows of {data.shape[-1]} values are not a whole number of {QK_K}-value blocks")
    convert = _QUANTIZERS[qname]
    blocks = data.reshape(-1, QK_K)
    out = torch.empty((blocks.shape[0], TYPE_SIZES[qname]), dtype=torch.uint8, device=data.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = convert(blocks[start : start + _CHUNK_BLOCKS].float())
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * TYPE_SIZES[qname])


def _inverse(x: torch.Tensor) -> torch.Tensor:
    """1 / x where x > 0, else 0 (an all-zero sub-block quantizes to q = 0)."""
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def _fit_scale_min(x: torch.Tensor, nmax: int, rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last axis) `scale` >= 0 and `low` <= 0 with x ~ scale * q + low, q in 0..nmax: the range first,
    then least-squares refits on the rounded q, each kept only where it lowers the squared error."""
    low = x.amin(-1).clamp(max=0.0)
    scale = (x.amax(-1) - low) / nmax

    def error(scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round((x - low[..., None]) * _inverse(scale)[..., None]).clamp(0, nmax)
        return q, (scale[..., None] * q + low[..., None] - x).square().sum(-1)

    q, best = error(scale, low)
    n = x.shape[-1]
    for _ in range(rounds):
        sq, sqq, sx, sqx = q.sum(-1), q.square().sum(-1), x.sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        new_scale = torch.where(ok, (n * sqx - sq * sx) / det, scale)
        new_low = torch.where(ok, (sqq * sx - sq * sqx) / det, low)
        # The format stores -low as a non-negative minimum: where the fit wants low > 0, refit the scale alone.
        positive = new_low > 0
        new_scale = torch.where(positive, sqx * _inverse(sqq), new_scale).clamp(min=0.0)
        new_low = torch.where(positive, 0.0, new_low)
        new_q, new_error = error(new_scale, new_low)
        better = new_error < best
        scale, low = torch.where(better, new_scale, scale), torch.where(better, new_low, low)
        best = torch.minimum(new_error, best)
        q = torch.where(better[..., None], new_q, q)
    return scale, low


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative per-sub-block values (blocks, 8) as one fp16 factor per block times 6-bit integers."""
    factor = (values.amax(-1) / 63).half()
    levels = torch.round(values * _inverse(factor.float())[:, None]).clamp(0, 63).to(torch.uint8)
    return factor, levels


def _bytes(values: torch.Tensor) -> torch.Tensor:
    """(blocks,) fp16 or (blocks, n) int8 as their little-endian bytes, (blocks, 2) or (blocks, n)."""
    return values.reshape(values.shape[0], -1).contiguous().view(torch.uint8)


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and minimums per block in llama.cpp's 12 bytes (gguf.quants.Q4_K.get_scale_min's inverse)."""
    head = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mins = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    tail = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return torch.cat([head, mins, tail], dim=-1)


def _affine_k(blocks: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's shared part: (d, dmin, 12 scale bytes) as bytes, and q (blocks, 8, 32) in 0..nmax."""
    x = blocks.reshape(-1, 8, 32)
    scale, low = _fit_scale_min(x, nmax)
    d, sc = _six_bit(scale)
    dmin, m = _six_bit(-low)
    step = d.float()[:, None] * sc  # what a reader multiplies by: the stored, rounded factors
    offset = dmin.float()[:, None] * m
    q = torch.round((x + offset[..., None]) * _inverse(step)[..., None]).clamp(0, nmax).to(torch.uint8)
    return torch.cat([_bytes(d), _bytes(dmin), _pack_scales(sc, m)], dim=-1), q


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Sub-blocks 2i and 2i+1 (of 32) in the low and high nibbles of bytes 32i..32i+31."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _bits(values: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """Disjoint bit fields `values << shifts` OR-ed along `dim` (a sum, as no two fields share a bit)."""
    return (values.to(torch.int32) << shifts).sum(dim).to(torch.uint8)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    head, q = _affine_k(blocks, 15)
    return torch.cat([head, _nibbles(q)], dim=-1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    head, q = _affine_k(blocks, 31)
    # Sub-block j's fifth bit is bit j of byte l.
    qh = _bits(q >> 4, torch.arange(8, device=q.device)[None, :, None], dim=1)
    return torch.cat([head, qh, _nibbles(q)], dim=-1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    x = blocks.reshape(-1, 16, 16)
    # Per sub-block: the value of largest magnitude maps to -32 (the wider side of -32..31), then one least-squares
    # refit of the scale on the rounded q, kept where it lowers the error.
    scale = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0] / -32
    q = torch.round(x * torch.where(scale == 0, 0.0, 1.0 / torch.where(scale == 0, 1.0, scale))[..., None])
    q = q.clamp(-32, 31)
    qq = q.square().sum(-1)
    refit = torch.where(qq > 0, (q * x).sum(-1) / qq.clamp(min=1), scale)
    better = (refit[..., None] * q - x).square().sum(-1) < (scale[..., None] * q - x).square().sum(-1)
    scale = torch.where(better, refit, scale)
    # One fp16 d per block, int8 sub-block scales.
    d = (scale.abs().amax(-1) / 127).half()
    sc = torch.round(scale * _inverse(d.float())[:, None]).clamp(-127, 127).to(torch.int8)
    step = d.float()[:, None] * sc
    q = torch.round(x * torch.where(step == 0, 0.0, 1.0 / torch.where(step == 0, 1.0, step))[..., None])
    q = (q.clamp(-32, 31) + 32).to(torch.uint8).reshape(-1, 2, 4, 32)  # halves of 128, four runs of 32
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # runs 0,1 in the low nibbles; runs 2,3 high
    qh = _bits(q >> 4, 2 * torch.arange(4, device=q.device)[None, None, :, None], dim=2)
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), _bytes(sc), _bytes(d)], dim=-1)


_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
