"""`easel quantize`: a registered model's denoiser written as one file in the community layout (ldm keys for SD1.x/SDXL
UNets, BFL keys for FLUX.1, Qwen-Image's own), FP8 `.safetensors` or `.gguf`, so it loads here through a model
entry's `denoiser:` and in ComfyUI/Forge.

GGUF follows ComfyUI-GGUF's converter: 1-D tensors and tensors of at most 1024 values stay F32, tensors whose rows are
not a whole number of quantisation blocks (32 values, 256 for the K-quants; and convolutions, which diffusers runs
unquantized) F16, the rest in the chosen type, with `general.architecture` set to the family's name there (sd1, sdxl,
flux, qwen_image). Q8_0/Q5_0/Q4_0 come from the gguf package's quantizers, Q6_K/Q5_K/Q4_K from pipelines.gguf_kquants
(the package only reads those); every tensor in the file has the one type asked for, where llama.cpp's "_S"/"_M"
mixes give a few tensors a wider type. FP8 writes the
matrices and convolutions in float8_e4m3fn (no scales: the layout of flux1-dev-fp8 and qwen_image_fp8_e4m3fn) and the
rest in bf16; fp8-scaled the same with one scale per matrix (ComfyUI's "fp8_scaled" layout).

The file is written under a temporary name beside the target and renamed into place, so a reader never sees half a
file; an existing file is kept unless `force`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipelines import layouts

FORMATS = ("fp8", "fp8-scaled", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q5_0", "gguf-q4_k", "gguf-q4_0")
GGUF_ARCH = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux", "qwen-image": "qwen_image", "qwen-image-edit": "qwen_image"}
QUANTIZATION_THRESHOLD = 1024  # values; smaller tensors are not worth a quantisation block's overhead
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
CPU = torch.device("cpu")
T = TypeVar("T")


class QuantizeError(ValueError):
    """The file cannot be written as asked (the message says why)."""


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    bytes: int
    seconds: float
    quantized: int  # tensors in the target format
    kept: int  # tensors kept in a float format


def suffix_for(fmt: str) -> str:
    return ".safetensors" if fmt.startswith("fp8") else ".gguf"


def write_denoiser(
    model: torch.nn.Module,
    family: str,
    fmt: str,
    out: str | Path,
    *,
    force: bool = False,
    device: torch.device | None = None,
) -> QuantizeResult:
    """Write `model` (a diffusers UNet/transformer of `family`) to `out` in `fmt`. The GGUF K-quants are computed on
    `device`, one tensor at a time (default: where each tensor is)."""
    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format '{fmt}'; one of: {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix.lower() != suffix_for(fmt):
        raise QuantizeError(f"{out}: a {fmt} file must end in {suffix_for(fmt)}")
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise QuantizeError(f"{out.parent}: no such directory")
    started = time.perf_counter()
    # In the model's own dtype: each tensor is widened to float32 only while it is converted, so a 20 B bf16
    # transformer never needs a second 80 GB float32 copy on the host.
    state = layouts.to_community({k: v.detach() for k, v in model.state_dict().items()}, family, model.config)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt.startswith("fp8"):
            quantized, kept = _write_fp8(state, tmp, scaled=fmt == "fp8-scaled")
        else:
            quantized, kept = _write_gguf(state, family, fmt.removeprefix("gguf-").upper(), tmp, device)
        if force:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if the file appeared meanwhile: never overwritten without --force
            tmp.unlink()
    except FileExistsError:
        raise QuantizeError(f"{out} exists; pass --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return QuantizeResult(out, out.stat().st_size, time.perf_counter() - started, quantized, kept)


def writer_device(device: str) -> torch.device:
    """The device `easel quantize --device` names, checked before minutes of loading; QuantizeError where there is no
    such device."""
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise QuantizeError(f"--device {device}: {e}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise QuantizeError(f"--device {device}: no CUDA device here")
    if target.type not in ("cpu", "cuda"):
        raise QuantizeError(f"--device {device}: use cpu or cuda")
    return target


def _fp8_eligible(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.numel() > QUANTIZATION_THRESHOLD


def _converted(
    state: dict[str, torch.Tensor], convert: Callable[[str, torch.Tensor], T], *, device: torch.device | None = CPU
) -> Iterator[tuple[str, T]]:
    """(key, convert(key, tensor as float32 on `device`, None: where it is)) in `state`'s order, converted on several
    threads: numpy's and torch's kernels release the GIL, and the gguf package's block quantisers are single-threaded
    numpy (about 100 M values/s each), so a 12 B transformer takes minutes on one core."""

    def one(item: tuple[str, torch.Tensor]) -> T:
        return convert(item[0], item[1].to(device or item[1].device, torch.float32))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from zip(state, pool.map(one, state.items()), strict=True)


def _write_fp8(state: dict[str, torch.Tensor], path: Path, *, scaled: bool) -> tuple[int, int]:
    """FP8 e4m3fn matrices, the rest bf16. `scaled`: each matrix divided by max|W| / 448 first, that scale stored as
    `<layer>.scale_weight` beside it and ComfyUI's `scaled_fp8` marker in the file (its "fp8_scaled" layout): small
    weights keep their precision instead of falling into FP8's subnormal range."""
    from safetensors.torch import save_file

    def convert(key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _fp8_eligible(tensor):
            return tensor.to(torch.bfloat16).contiguous(), None
        scale = tensor.abs().amax() / FP8_MAX if scaled and key.endswith(".weight") else None
        if scale is not None and scale > 0:
            tensor = tensor / scale
        else:
            scale = None
        return tensor.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous(), scale

    out: dict[str, torch.Tensor] = {}
    quantized = 0
    for key, (tensor, scale) in _converted(state, convert):
        out[key] = tensor
        quantized += tensor.dtype == torch.float8_e4m3fn
        if scale is not None:
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(()).to(torch.float32)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker: scaled, e4m3fn
    save_file(out, str(path), metadata={"format": "pt", "easel.format": "fp8-scaled" if scaled else "fp8"})
    return quantized, len(state) - quantized


def _write_gguf(
    state: dict[str, torch.Tensor], family: str, qname: str, path: Path, device: torch.device | None
) -> tuple[int, int]:
    try:
        import gguf
        from gguf.quants import quantize
    except ImportError as e:
        raise QuantizeError("GGUF files need the gguf package: pip install 'easel[gguf]'") from e
    from pipelines import gguf_kquants

    qtype = gguf.GGMLQuantizationType[qname]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    k_quant = qname in gguf_kquants.TYPE_SIZES
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[family])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = f"MOSTLY_{qname}_S" if k_quant and qname != "Q6_K" else f"MOSTLY_{qname}"  # no plain Q4_K/Q5_K
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))

    def convert(_key: str, tensor: torch.Tensor) -> tuple[Any, Any]:  # (array, raw_dtype or None)
        if tensor.dim() == 1 or tensor.numel() <= QUANTIZATION_THRESHOLD:
            return tensor.cpu().numpy(), None
        if tensor.dim() != 2 or tensor.shape[-1] % block:
            return tensor.cpu().numpy().astype("float16"), None
        if k_quant:
            return gguf_kquants.quantize(tensor, qname).cpu().numpy(), qtype
        return quantize(tensor.cpu().numpy(), qtype), qtype

    quantized = 0
    # The K-quants are torch code: on `device`, or where each tensor is (a model on the GPU is converted there).
    for key, (data, raw_dtype) in _converted(state, convert, device=device if k_quant else CPU):
        writer.add_tensor(key, data, raw_dtype=raw_dtype)
        quantized += raw_dtype is not None
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized, len(state) - quantized


def source_denoiser(spec, demo_root: Path, configs_dir: Path | None) -> torch.nn.Module:
    """The denoiser of a registered model on the CPU, in the dtype its checkpoint stores (every value kept, and a bf16
    20 B transformer takes 40 GB of host memory, not 80), loaded from wherever the model entry points. An FP8
    `denoiser:` file comes back dequantized, its per-tensor scales applied."""
    import diffusers

    from pipelines import checkpoints, demo, quantized, single_file

    class_name, subfolder = quantized.DENOISER_CLASSES[spec.family]
    if spec.denoiser:
        path = Path(spec.denoiser)
        if path.suffix.lower() == ".gguf":
            raise QuantizeError(f"{spec.denoiser}: already GGUF-quantized; quantize from the unquantized model")
        base = _base_folder(spec, demo_root, configs_dir)
        return quantized.load_denoiser(spec.family, path, base, stored_dtype([path]), dequantize=True)
    if spec.is_single_file:
        spec = checkpoints.resolve_single_file(spec, configs_dir)
        pipe = single_file.load_pipeline(spec, spec.source, stored_dtype([Path(spec.source)]))
        return getattr(pipe, subfolder)
    folder = demo.ensure_demo_model(spec.demo_kind, demo_root) if spec.is_demo else Path(spec.source)
    dtype = stored_dtype(sorted((folder / subfolder).glob("*.safetensors")))
    return getattr(diffusers, class_name).from_pretrained(
        str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=dtype
    )


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The float dtype of the first non-FP8 floating tensor in these safetensors files (float32 when there is none,
    or the files are not safetensors)."""
    from safetensors import safe_open

    for path in files:
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = _FLOAT_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def _base_folder(spec, demo_root: Path, configs_dir: Path | None) -> Path:
    from pipelines import checkpoints, demo

    if spec.is_demo:
        return demo.ensure_demo_model(spec.demo_kind, demo_root)
    if spec.is_single_file:
        return Path(checkpoints.resolve_single_file(spec, configs_dir).config)
    return Path(spec.source)
