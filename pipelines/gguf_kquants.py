"""GGUF K-quant writers (Q4_K, Q5_K, Q6_K) in numpy: the gguf package reads these types but cannot write them, and
they are what ComfyUI-GGUF and Forge users download (flux1-dev-Q4_K_S.gguf, qwen-image-Q4_K_M.gguf).

The byte layouts are llama.cpp's (ggml-common.h), the inverse of gguf.quants' dequantizers, which the tests use as
the reference. Super-blocks of 256 values:

- Q4_K / Q5_K: 8 sub-blocks of 32, value = d * sc[j] * q - dmin * m[j] with q in 0..15 (0..31), the sub-block scales
  and minimums 6-bit integers under one fp16 `d` and `dmin` (144 / 176 bytes).
- Q6_K: 16 sub-blocks of 16, value = d * sc[j] * q with q in -32..31 and sc an int8 (210 bytes).

Each sub-block's scale and minimum start from its range and are refined by least squares on the rounded values (the
idea of llama.cpp's make_qkx2_quants, without its search over starting points), which is within a few percent of its
error at a fraction of the time: a 12 B transformer converts in minutes on a few cores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK_BLOCKS = 16384  # super-blocks converted at once: bounds the float32 temporaries to about 100 MB


def quantize(data: np.ndarray, qname: str) -> np.ndarray:
    """`data` (rows of a whole number of 256-value super-blocks) as `qname` bytes, shaped like gguf.quants.quantize's
    output: the last axis becomes bytes."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"{qname}: rows of {data.shape[-1]} values are not a whole number of {QK_K}-value blocks")
    convert = _QUANTIZERS[qname]
    blocks = data.astype(np.float32, copy=False).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], TYPE_SIZES[qname]), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = convert(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * TYPE_SIZES[qname])


def _safe_inverse(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(x > 0, 1.0 / np.where(x > 0, x, 1.0), 0.0).astype(np.float32)


def _fit_scale_min(x: np.ndarray, nmax: int, rounds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) `scale` >= 0 and `low` <= 0 with x ~ scale * q + low, q in 0..nmax: the range first,
    then least-squares refits on the rounded q, each kept only where it lowers the squared error."""
    low = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - low) / nmax

    def error(scale: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.rint((x - low[..., None]) * _safe_inverse(scale)[..., None]), 0, nmax)
        return q, np.square(scale[..., None] * q + low[..., None] - x).sum(-1)

    q, best = error(scale, low)
    n = x.shape[-1]
    for _ in range(rounds):
        sq, sqq, sx, sqx = q.sum(-1), np.square(q).sum(-1), x.sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        new_scale = np.where(ok, (n * sqx - sq * sx) / det, scale)
        new_low = np.where(ok, (sqq * sx - sq * sqx) / det, low)
        # The format stores -low as a non-negative minimum: where the fit wants low > 0, refit the scale alone.
        positive = new_low > 0
        new_scale = np.where(positive, sqx * _safe_inverse(sqq), new_scale)
        new_low = np.where(positive, 0.0, new_low)
        new_scale = np.maximum(new_scale, 0.0)
        new_q, new_error = error(new_scale, new_low)
        better = new_error < best
        scale, low = np.where(better, new_scale, scale), np.where(better, new_low, low)
        best = np.minimum(new_error, best)
        q = np.where(better[..., None], new_q, q)
    return scale.astype(np.float32), low.astype(np.float32)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values (blocks, 8) as one fp16 factor per block times 6-bit integers."""
    factor = (values.max(-1) / 63).astype(np.float16)
    levels = np.clip(np.rint(values * _safe_inverse(factor.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    return factor, levels


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and minimums per block in llama.cpp's 12 bytes (gguf.quants.Q4_K.get_scale_min's inverse)."""
    head = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mins = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    tail = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([head, mins, tail], axis=-1).astype(np.uint8)


def _affine_k(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's shared part: (d, dmin, 12 scale bytes) as bytes, and q (blocks, 8, 32) in 0..nmax."""
    x = blocks.reshape(-1, 8, 32)
    scale, low = _fit_scale_min(x, nmax)
    d, sc = _six_bit(scale)
    dmin, m = _six_bit(-low)
    step = d.astype(np.float32)[:, None] * sc  # what a reader multiplies by: the stored, rounded factors
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint((x + offset[..., None]) * _safe_inverse(step)[..., None]), 0, nmax).astype(np.uint8)
    head = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_scales(sc, m)], axis=-1)
    return head, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2i and 2i+1 (of 32) in the low and high nibbles of bytes 32i..32i+31."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    head, q = _affine_k(blocks, 15)
    return np.concatenate([head, _nibbles(q)], axis=-1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    head, q = _affine_k(blocks, 31)
    high = (q >> 4).astype(np.uint8)  # (blocks, 8, 32): sub-block j's fifth bit is bit j of byte l
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate([head, qh, _nibbles(q)], axis=-1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    # Per sub-block: the value of largest magnitude maps to -32 (the wider side of -32..31), then one least-squares
    # refit of the scale on the rounded q.
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / -32
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(x / np.where(scale == 0, 1, scale)[..., None]), -32, 31)
        refit = np.where((q * q).sum(-1) > 0, (q * x).sum(-1) / np.maximum((q * q).sum(-1), 1), scale)
    refit_error = np.square(refit[..., None] * q - x).sum(-1)
    scale = np.where(refit_error < np.square(scale[..., None] * q - x).sum(-1), refit, scale)
    # One fp16 d per block, int8 sub-block scales.
    d = (np.abs(scale).max(-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(scale * _safe_inverse(d.astype(np.float32))[:, None]), -127, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] != 0, np.rint(x / np.where(step == 0, 1, step)[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128, four runs of 32
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # runs 0,1 low nibbles; runs 2,3 high
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d[:, None].view(np.uint8)], axis=-1
    )


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
