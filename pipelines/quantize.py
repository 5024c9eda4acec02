"""`easel quantize`: a registered model's denoiser written as one file in the community layout (ldm keys for SD1.x/SDXL
UNets, BFL keys for FLUX.1, Qwen-Image's own), FP8 `.safetensors` or `.gguf`, so it loads here through a model
entry's `denoiser:` and in ComfyUI/Forge.

GGUF follows ComfyUI-GGUF's converter: 1-D tensors and tensors of at most 1024 values stay F32, tensors whose rows are
not a whole number of quantisation blocks (and convolutions, which diffusers runs unquantized) F16, the rest in the
chosen type, with `general.architecture` set to the family's name there (sd1, sdxl, flux, qwen_image). FP8 writes the
matrices and convolutions in float8_e4m3fn (no scales: the layout of flux1-dev-fp8 and qwen_image_fp8_e4m3fn) and the
rest in bf16.

The file is written under a temporary name beside the target and renamed into place, so a reader never sees half a
file; an existing file is kept unless `force`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import layouts

FORMATS = ("fp8", "gguf-q8_0", "gguf-q5_0", "gguf-q4_0")
GGUF_ARCH = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux", "qwen-image": "qwen_image", "qwen-image-edit": "qwen_image"}
QUANTIZATION_THRESHOLD = 1024  # values; smaller tensors are not worth a quantisation block's overhead
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


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
    return ".safetensors" if fmt == "fp8" else ".gguf"


def write_denoiser(
    model: torch.nn.Module, family: str, fmt: str, out: str | Path, *, force: bool = False
) -> QuantizeResult:
    """Write `model` (a diffusers UNet/transformer of `family`) to `out` in `fmt`."""
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
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    state = layouts.to_community(state, family, model.config)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "fp8":
            quantized, kept = _write_fp8(state, tmp)
        else:
            quantized, kept = _write_gguf(state, family, fmt.removeprefix("gguf-").upper(), tmp)
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


def _fp8_eligible(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.numel() > QUANTIZATION_THRESHOLD


def _write_fp8(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    quantized = 0
    for key, tensor in state.items():
        if _fp8_eligible(tensor):
            out[key] = tensor.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
            quantized += 1
        else:
            out[key] = tensor.to(torch.bfloat16).contiguous()
    save_file(out, str(path), metadata={"format": "pt", "easel.format": "fp8"})
    return quantized, len(out) - quantized


def _write_gguf(state: dict[str, torch.Tensor], family: str, qname: str, path: Path) -> tuple[int, int]:
    try:
        import gguf
        from gguf.quants import quantize
    except ImportError as e:
        raise QuantizeError("GGUF files need the gguf package: pip install 'easel[gguf]'") from e
    qtype = gguf.GGMLQuantizationType[qname]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[family])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qname}"))
    quantized = 0
    for key, tensor in state.items():
        data = tensor.numpy()
        if tensor.dim() == 1 or tensor.numel() <= QUANTIZATION_THRESHOLD:
            writer.add_tensor(key, data.astype("float32"))
        elif tensor.dim() != 2 or tensor.shape[-1] % block:
            writer.add_tensor(key, data.astype("float16"))
        else:
            writer.add_tensor(key, quantize(data, qtype), raw_dtype=qtype)
            quantized += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized, len(state) - quantized


def source_denoiser(spec, demo_root: Path, configs_dir: Path | None) -> torch.nn.Module:
    """The denoiser of a registered model in float32 on the CPU, loaded from wherever the model entry points."""
    import diffusers

    from pipelines import checkpoints, demo, quantized, single_file

    class_name, subfolder = quantized.DENOISER_CLASSES[spec.family]
    if spec.denoiser:
        if Path(spec.denoiser).suffix.lower() == ".gguf":
            raise QuantizeError(f"{spec.denoiser}: already GGUF-quantized; quantize from the unquantized model")
        return quantized.load_denoiser(spec.family, spec.denoiser, _base_folder(spec, demo_root, configs_dir),
                                       torch.float32).to(torch.float32)  # fmt: skip
    if spec.is_single_file:
        spec = checkpoints.resolve_single_file(spec, configs_dir)
        pipe = single_file.load_pipeline(spec, spec.source, torch.float32)
        return getattr(pipe, subfolder)
    folder = demo.ensure_demo_model(spec.demo_kind, demo_root) if spec.is_demo else Path(spec.source)
    return getattr(diffusers, class_name).from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)


def _base_folder(spec, demo_root: Path, configs_dir: Path | None) -> Path:
    from pipelines import checkpoints, demo

    if spec.is_demo:
        return demo.ensure_demo_model(spec.demo_kind, demo_root)
    if spec.is_single_file:
        return Path(checkpoints.resolve_single_file(spec, configs_dir).config)
    return Path(spec.source)
