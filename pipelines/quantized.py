"""Components from their own files: a model entry's `denoiser:` (UNet/transformer), `text_encoder:` and
`text_encoder_2:`, with everything else from its `source`.

Formats: `.safetensors` in bf16/fp16/fp32 or FP8 (e4m3fn, e5m2; with or without per-tensor scales,
`<layer>.scale_weight` as ComfyUI's scaled files or `<layer>.weight_scale`), and `.gguf` (every quantisation type
diffusers' GGUF support dequantizes). Denoiser keys may be the community's (ldm, BFL, Qwen-Image) or diffusers'
(`pipelines.layouts`).

FP8 weights stay FP8 in memory and each layer is cast to the compute dtype only while it runs (diffusers' layerwise
casting), so an FP8 file costs half the memory of bf16 on any device; on a card with FP8 compute (and torchao) they
take the fast path's FP8 tier instead (FP8 matmuls). GGUF weights stay quantized and diffusers'
GGUFLinear dequantizes them per call.

Every problem is a CheckpointError naming the file and what is wrong: another family's file, an unknown GGUF
quantisation type, a truncated or corrupt file, tensors that do not match the base model's architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipelines import bnb_files, layouts
from pipelines.checkpoints import CheckpointError
from pipelines.registry import ModelSpec

log = logging.getLogger("easel.quantized")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SUFFIXES = (".safetensors", ".gguf")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-tensor weight scales, by the tools that write them
_DROPPED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales for FP8 compute: not used here
_DROPPED_KEYS = ("scaled_fp8",)  # ComfyUI's marker tensor of scaled FP8 files
# ComfyUI's mixed-precision files mark each quantized layer with `<layer>.comfy_quant`, UTF-8 JSON as uint8 naming
# its format; the FP8 ones are the FP8-with-a-per-tensor-scale layout above, the others (nvfp4, mxfp8, int8...) are not
# readable here.
_COMFY_QUANT = ".comfy_quant"
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
DENOISER_CLASSES = {
    "sd15": ("UNet2DConditionModel", "unet"),
    "sdxl": ("UNet2DConditionModel", "unet"),
    "flux": ("FluxTransformer2DModel", "transformer"),
    "qwen-image": ("QwenImageTransformer2DModel", "transformer"),
    "qwen-image-edit": ("QwenImageTransformer2DModel", "transformer"),
}
TEXT_ENCODER_FIELDS = ("text_encoder", "text_encoder_2")


def file_fields(spec: ModelSpec) -> dict[str, str]:
    """Pipeline component -> file, for the components this model takes from their own files."""
    fields = {"denoiser": spec.denoiser, "text_encoder": spec.text_encoder, "text_encoder_2": spec.text_encoder_2}
    out = {name: path for name, path in fields.items() if path}
    if "denoiser" in out:
        out[DENOISER_CLASSES[spec.family][1]] = out.pop("denoiser")
    return out


# --- reading -------------------------------------------------------------------------------------------------------


def read_tensors(path: str | Path, select: Callable[[list[str]], list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (those `select` picks from its keys, default all) or a .gguf file (all;
    GGUF quantized ones as diffusers' GGUFParameter)."""
    path = _existing_file(path)
    if path.suffix.lower() == ".gguf":
        return _read_gguf(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            return {k: f.get_tensor(k) for k in (keys if select is None else select(keys))}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise CheckpointError(f"{path}: unsupported file type '{path.suffix}' (use .safetensors or .gguf)")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return path


def _gguf_reader(path: Path):
    """A GGUFReader on the file, after checking that diffusers can dequantize every tensor type in it."""
    try:
        import gguf
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES
    except ImportError as e:
        raise CheckpointError(f"{path}: GGUF files need the gguf package: pip install 'easel[gguf]'") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated or foreign bytes
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {_why(e)}") from e
    supported = {*SUPPORTED_GGUF_QUANT_TYPES, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    unknown = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in supported})
    if unknown:
        names = ", ".join(sorted(t.name for t in supported))
        raise CheckpointError(
            f"{path}: GGUF quantisation type {', '.join(unknown)} is not supported (supported: {names})"
        )
    return reader


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _read_gguf(path: Path) -> dict[str, torch.Tensor]:
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    _gguf_reader(path)  # the checks first, with messages naming the problem
    try:
        return load_gguf_checkpoint(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {_why(e)}") from e


def split_scales(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights, and per-tensor scales keyed by the weight they scale (`<layer>.weight`); bitsandbytes 4-bit
    weights decoded to their stored dtype (pipelines.bnb_files)."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    if bnb_files.quant_types(state):
        state = bnb_files.dequantized(dict(state))
    for key, tensor in state.items():
        if key in _DROPPED_KEYS or key.endswith(_DROPPED_SUFFIXES):
            continue
        if key.endswith(_COMFY_QUANT):
            check_comfy_quant(key, tensor)
            continue
        suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            check_per_tensor_scale(key, tuple(tensor.shape))
            scales[key.removesuffix(suffix) + ".weight"] = float(tensor.float().item())
        else:
            weights[key] = tensor
    return weights, scales


def check_per_tensor_scale(key: str, shape: tuple[int, ...]) -> None:
    if math.prod(shape) != 1:
        raise ValueError(f"{key}: only per-tensor scales (one value) are supported, got shape {shape}")


def check_comfy_quant(key: str, marker: torch.Tensor) -> None:
    """A ComfyUI `<layer>.comfy_quant` marker: FP8 passes, any other format is a ValueError naming it."""
    try:
        fmt = json.loads(bytes(marker.to(torch.uint8).flatten().tolist())).get("format")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{key}: an unreadable ComfyUI quantisation marker ({e})") from e
    if fmt not in _FP8_FORMATS:
        raise ValueError(
            f"{key.removesuffix(_COMFY_QUANT)}: ComfyUI's '{fmt}' quantisation is not supported (FP8 with per-tensor "
            f"scales is: {', '.join(_FP8_FORMATS)}; GGUF files for the rest)"
        )


def _convert_scales(scales: dict[str, float], state: Mapping[str, torch.Tensor], convert) -> dict[str, float]:
    """Carry the scales through a key conversion: the converters only rename, split and concatenate along dim 0, so
    running them on one row of scale values per tensor says which scale each converted tensor has."""
    if not scales:
        return {}
    rows = {k: torch.full((max(1, v.shape[0]) if v.dim() else 1,), scales.get(k, 1.0)) for k, v in state.items()}
    out: dict[str, float] = {}
    for key, values in convert(rows).items():
        if not torch.all(values == values[0]):
            raise ValueError(f"{key}: parts with different FP8 scales cannot be one tensor")
        if float(values[0]) != 1.0:
            out[key] = float(values[0])
    return out


def check_tensors(
    path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    """Same names and shapes as the model built from the base's config, else an error saying what differs."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = []
    for key, tensor in state.items():
        if key in expected:
            shape = tuple(getattr(tensor, "quant_shape", tensor.shape))
            if shape != tuple(expected[key].shape):
                wrong.append(f"{key} is {list(shape)}, the base's {what} has {list(expected[key].shape)}")
    if wrong:
        raise CheckpointError(
            f"{path}: its tensors do not match the base model's {what} ({len(wrong)} of another shape, e.g. "
            f"{wrong[0]}): a file of another size or variant of the architecture"
        )
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{path}: its tensors do not match the base model's {what} ({'; '.join(detail)})")


# --- denoiser -----------------------------------------------------------------------------------------------------


def load_denoiser(
    family: str,
    path: str | Path,
    config_dir: str | Path,
    dtype: torch.dtype,
    *,
    fp8_compute: tuple[bool, str] | None = None,
    fuse_qkv: bool = False,
    dequantize: bool = False,
) -> torch.nn.Module:
    """The denoiser of `family` from one file, its architecture from `<config_dir>/<unet|transformer>/config.json`.

    An FP8 file: with `fp8_compute` on (`optimize.fp8_compute_tier`: a card with FP8 compute and torchao), its
    weights times their scales in `dtype`, then the FP8 compute tier (`optimize.quantize_fp8`, after fusing the QKV
    projections when `fuse_qkv`); otherwise FP8 storage computed in `dtype` layer by layer. The tier runs here, on
    the host, so placement counts the FP8 bytes and the card never holds the bf16 weights. `dequantize`: an FP8 file's
    weights times their scales as a plain `dtype` model (what `easel quantize` re-quantizes from).
    A bitsandbytes 4-bit file (NF4/FP4, Forge's flux1-dev-bnb-nf4): decoded to `dtype`, its format kept in
    `_easel_4bit_file`; placement decides whether it goes back into 4-bit layers (`optimize.requantize_4bit_file`)."""
    import diffusers
    from accelerate import init_empty_weights

    path = Path(path)
    class_name, subfolder = DENOISER_CLASSES[family]
    cls = getattr(diffusers, class_name)
    try:
        config = cls.load_config(str(config_dir), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no {subfolder} config in the base {config_dir}: {e}") from e

    def denoiser_part(keys: list[str]) -> list[str]:
        kept = [k for k in keys if k not in _DROPPED_KEYS]
        wanted = layouts.denoiser_keys(kept)
        if len(wanted) < len(kept):
            log.info("%s: an all-in-one checkpoint: its denoiser's %d tensors are read, the text encoders and VAE "
                     "come from the model's source", path.name, len(wanted))  # fmt: skip
        return wanted

    raw = read_tensors(path, denoiser_part)
    try:
        weights, scales = split_scales(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    try:
        prefix = layouts.common_prefix(weights)
        stripped = {k.removeprefix(prefix): v for k, v in weights.items()}
        state = layouts.to_diffusers(stripped, family, config)
        scales = _convert_scales(
            {k.removeprefix(prefix): v for k, v in scales.items()},
            stripped,
            lambda s: layouts.to_diffusers(s, family, config),
        )
    except layouts.LayoutError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its tensors do not match the base model's {subfolder} (converting its keys failed on "
            f"{type(e).__name__}: {e}): a file of another variant of the architecture"
        ) from e
    with init_empty_weights():
        model = cls.from_config(config)
    expected = model.state_dict()
    check_tensors(path, state, expected, subfolder)
    if any(hasattr(t, "quant_type") for t in state.values()):
        return _load_gguf_model(cls, model, state, config_dir, subfolder, dtype)
    four_bit = bnb_files.quant_types(raw)
    if four_bit:
        log.info("%s: bitsandbytes %s weights, decoded to %s", path.name, "/".join(sorted(four_bit)).upper(),
                 str(dtype).removeprefix("torch."))  # fmt: skip
    fp8 = next((t.dtype for t in state.values() if t.dtype in FP8_DTYPES), None)
    compute, why = fp8_compute if fp8_compute is not None else (False, "")
    if fp8 is not None and (compute or dequantize):  # the real weights, scales applied
        state = {k: (t.float() * scales[k]).to(dtype) if k in scales else t.to(dtype) for k, t in state.items()}
    else:
        state = {k: t if t.dtype in FP8_DTYPES else t.to(dtype) for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if four_bit and not dequantize:
        model._easel_4bit_file = FourBitFile(min(four_bit), any(k.endswith(".nested_absmax") for k in raw))  # noqa: SLF001
    if fp8 is None or dequantize:
        return model
    stored, computed = str(fp8).removeprefix("torch."), str(dtype).removeprefix("torch.")
    if compute:
        try:
            _fp8_compute_tier(model, fuse_qkv)
        except Exception as e:  # a tier that does not fit this model must not stop it from serving
            log.warning("%s: the FP8 compute tier failed (%s: %s); loading it for layerwise casting instead",
                        path.name, type(e).__name__, e)  # fmt: skip
            return load_denoiser(family, path, config_dir, dtype, fp8_compute=(False, "the FP8 compute tier failed"))
        log.info("%s: FP8 (%s) weights, FP8 compute tier from %s weights (torchao): %s", path.name, stored, computed,
                 why)  # fmt: skip
        return model
    store_fp8(model, fp8, dtype, scales)
    log.info("%s: FP8 (%s) weights, computed in %s layer by layer%s", path.name, stored, computed,
             f": {why}" if why else "")  # fmt: skip
    return model


def _fp8_compute_tier(model: torch.nn.Module, fuse_qkv: bool) -> None:
    """The FP8 tier of the fast path on a freshly loaded denoiser: fused QKV projections first (fused after it, the
    projections would be concatenated FP8 tensors), then torchao's FP8 weights and activations."""
    from pipelines import optimize

    if fuse_qkv and hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections()
    layers = optimize.quantize_fp8(model)
    model._easel_fp8 = optimize.FP8_COMPUTE  # noqa: SLF001  (from_pipe leaves it alone; the fast path skips fusing)
    log.debug("%d linear layers in FP8", layers)


def _load_gguf_model(cls, meta_model, state, config_dir, subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from pipelines.families import dtype_kwargs

    # diffusers runs quantized weights in Linear layers only: any other quantized tensor (a convolution in some
    # community UNet files) is dequantized once here.
    linear = {f"{name}.weight" for name, m in meta_model.named_modules() if isinstance(m, torch.nn.Linear)}
    state = {
        k: (dequantize_gguf_tensor(v).to(dtype) if hasattr(v, "quant_type") and k not in linear else v)
        for k, v in state.items()
    }
    return cls.from_single_file(
        state,
        config=str(config_dir),
        subfolder=subfolder,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        local_files_only=True,
        **dtype_kwargs(dtype),
    )


@dataclasses.dataclass(frozen=True)
class FourBitFile:
    """The bitsandbytes format a denoiser file stored its weights in (the model holds them decoded)."""

    quant_type: str  # nf4 | fp4
    nested: bool  # double-quantized block scales


def to_bnb_4bit(model: torch.nn.Module, file: FourBitFile, compute: torch.dtype, work: torch.device) -> int:
    """The model's Linear layers (but those its class keeps in float32, as diffusers' bitsandbytes quantizer does)
    as bitsandbytes 4-bit layers of the file's type, block size (64: bitsandbytes' and the files') and double
    quantisation, which gives each block of a decoded file back its codes. Each layer is quantized on `work` (the
    card, much faster) and returned to the host for placement. Returns how many changed."""
    import bitsandbytes as bnb

    kept = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    changed = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or any(key in full for key in kept):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute, compress_statistics=file.nested,
                                      quant_type=file.quant_type, device="meta")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=file.nested,
                                             quant_type=file.quant_type)  # fmt: skip
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute), requires_grad=False)
            setattr(module, child_name, layer.to(work).to("cpu"))  # quantized on `work`, kept on the host
            changed += 1
    model._easel_fp8 = f"bnb-{file.quant_type}"  # noqa: SLF001  (from_pipe must leave its dtype alone)
    return changed


def is_gguf(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "quant_type") for p in model.parameters())


def dequantized_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes the GGUF model's weights would hold dequantized to `dtype` (the others as they are)."""
    size = torch.finfo(dtype).bits // 8
    return sum(
        math.prod(t.quant_shape) * size if hasattr(t, "quant_type") else t.numel() * t.element_size()
        for t in (*model.parameters(), *model.buffers())
    )


def dequantize_gguf(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same denoiser with every GGUF weight dequantized once to `dtype`: a plain model of its class (plain
    Linear layers), which fuses, compiles and places like a bf16 checkpoint."""
    from accelerate import init_empty_weights
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    with init_empty_weights():
        plain = type(model).from_config(config)
    state = {
        k: dequantize_gguf_tensor(v).to(dtype) if hasattr(v, "quant_type") else v.to(dtype) if v.is_floating_point()
        else v
        for k, v in model.state_dict().items()
    }  # fmt: skip
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval().requires_grad_(False)


def store_fp8(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype, scales: Mapping[str, float]) -> None:
    """FP8 storage, `compute` while each layer runs (diffusers' layerwise casting). Layers it skips (norms,
    embeddings) and tensors it does not cover are kept in the compute dtype."""
    from diffusers.hooks import apply_layerwise_casting

    modules = dict(model.named_modules())
    for key, scale in scales.items():
        _scale_weight(modules[key.removesuffix(".weight")], scale)
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    skip = tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or DEFAULT_SKIP_MODULES_PATTERN)
    # transformers' fp32-only modules (T5's `wo`, whose caller reads the weight's dtype before the layer runs).
    skip += tuple(rf"(^|\.){name}$" for name in getattr(model, "_keep_in_fp32_modules", None) or ())
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern=skip)
    hooked = {name for name, m in model.named_modules() if getattr(m, "_diffusers_hook", None) is not None}
    for name, module in model.named_modules():
        if name in hooked:
            # PEFT makes a LoRA's layers in the dtype of the layer it wraps, FP8 here, where they cannot run and the
            # LoRA's weights would be rounded to FP8; its rule for quantized layers takes `compute_dtype` instead.
            module.compute_dtype = compute
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dtype in FP8_DTYPES:
                setattr(module, pname, torch.nn.Parameter(param.to(compute), requires_grad=False))
    model._easel_fp8 = storage  # noqa: SLF001  (marks a model whose dtype must not be changed by from_pipe)
    from diffusers import ModelMixin

    if not isinstance(model, ModelMixin):
        # transformers' `dtype` is the first parameter's, FP8 here, and pipelines make their prompt embeddings and
        # latents in it; diffusers' own models already answer the compute dtype under layerwise casting.
        _report_dtype(model, compute)


_DTYPE_CLASSES: dict[tuple[type, torch.dtype], type] = {}


def _report_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    key = (type(model), dtype)
    if key not in _DTYPE_CLASSES:
        base = type(model)
        _DTYPE_CLASSES[key] = type(base.__name__, (base,), {"dtype": property(lambda self: dtype),
                                                            "__module__": base.__module__})  # fmt: skip
    model.__class__ = _DTYPE_CLASSES[key]


def _scale_weight(module: torch.nn.Module, scale: float) -> None:
    """The layer computes with weight x scale (a per-tensor scaled FP8 weight), without storing the product."""
    if isinstance(module, torch.nn.Linear):

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.weight * scale, self.bias)

    elif isinstance(module, torch.nn.Conv2d | torch.nn.Conv1d):

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight * scale, self.bias)

    else:
        raise ValueError(f"a per-tensor scale on a {type(module).__name__} layer is not supported")
    module.forward = types.MethodType(forward, module)


# --- text encoders ------------------------------------------------------------------------------------------------


def load_text_encoder(name: str, path: str | Path, config_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """A text encoder (transformers class and config from the base folder's model_index.json) from one file."""
    import transformers
    from accelerate import init_empty_weights

    path = Path(path)
    folder = Path(config_dir)
    try:
        library, class_name = json.loads((folder / "model_index.json").read_text())[name]
        config = transformers.AutoConfig.from_pretrained(str(folder / name), local_files_only=True)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the base {folder} has no {name} config: {e}") from e
    cls = getattr(transformers, class_name)
    raw = read_tensors(path)
    if any(hasattr(t, "quant_type") for t in raw.values()):
        raise CheckpointError(f"{path}: GGUF text encoders are not supported; use a .safetensors file")
    try:
        weights, scales = split_scales(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    with init_empty_weights():
        model = cls(config)
    expected = model.state_dict()
    rename = _checkpoint_key_renamer(model, expected)
    weights = {rename(k): t for k, t in weights.items()}
    scales = {rename(k): v for k, v in scales.items()}
    tied = {k for k in expected if k not in weights and k.endswith("embed_tokens.weight")}  # T5 ties to `shared`
    # An encoder's LM head only makes logits the pipeline never reads (it takes hidden states): files made for
    # text encoding (ComfyUI's Qwen2.5-VL) leave it out, and it shares the token embeddings' storage instead.
    headless = "lm_head.weight" in expected and "lm_head.weight" not in weights
    absent = tied | ({"lm_head.weight"} if headless else set())
    # Extra tensors are common in text encoder files and harmless (CLIP-L files with CLIPModel's text_projection and
    # logit_scale, old position_ids buffers): ignored, named in the log. Missing ones and other shapes are errors.
    unused = sorted(k for k in weights if k not in expected)
    if unused:
        log.info("%s: %d tensors the %s does not use, ignored (e.g. %s)", path.name, len(unused), name,
                 ", ".join(unused[:3]))  # fmt: skip
        weights = {k: t for k, t in weights.items() if k in expected}
    check_tensors(path, weights, {k: v for k, v in expected.items() if k not in absent}, name)
    fp8 = next((t.dtype for t in weights.values() if t.dtype in FP8_DTYPES), None)
    state = {k: t if t.dtype in FP8_DTYPES else t.to(dtype) for k, t in weights.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    if headless:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval().requires_grad_(False)
    if fp8 is not None:
        store_fp8(model, fp8, dtype, scales)
    return model


def _checkpoint_key_renamer(model: torch.nn.Module, expected: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    """Key names as saved -> the loaded model's, renamed as transformers' from_pretrained renames them (its checkpoint
    conversion mapping and base-model prefix): CLIP text encoder files say `text_model.*` for what transformers 5
    names without the prefix; Qwen2.5-VL's say `model.layers.*` and `visual.*` (ComfyUI's files too) for
    `model.language_model.layers.*` and `model.visual.*`. Renames only: a model whose files need tensors split or
    fused is not covered (its keys then fail the check, naming them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads files with their own names
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix, meta = getattr(model, "base_model_prefix", None) or None, dict(expected)

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], prefix, meta)[0]

    return rename


# --- the pipeline's components --------------------------------------------------------------------------------------


def load_components(
    spec: ModelSpec, config_dir: str | Path, dtype: torch.dtype, fp8_compute: tuple[bool, str] | None = None
) -> dict[str, torch.nn.Module]:
    """The components a model entry takes from its own files, and with `quantization: nf4` its denoiser (and text
    encoders) quantized while loading; ready to pass to `from_pretrained`. `fp8_compute`: whether an FP8 denoiser
    file takes the FP8 compute tier, and why (`optimize.fp8_compute_tier` for the device)."""
    out: dict[str, torch.nn.Module] = {}
    for component, file in file_fields(spec).items():
        if component in TEXT_ENCODER_FIELDS:
            out[component] = load_text_encoder(component, file, config_dir, dtype)
        else:
            out[component] = load_denoiser(spec.family, file, config_dir, dtype, fp8_compute=fp8_compute,
                                           fuse_qkv=spec.performance.fuse_qkv)  # fmt: skip
    if spec.performance.quantization == "nf4":
        out.update(_nf4_components(spec, Path(config_dir), dtype, exclude=set(out)))
    return out


def _nf4_components(spec: ModelSpec, folder: Path, dtype: torch.dtype, exclude: set[str]) -> dict[str, torch.nn.Module]:
    """bitsandbytes NF4 while loading (CUDA only: `optimize.nf4_problem` is checked before), from the base folder's
    weights; a single-file source has none there."""
    import diffusers
    import transformers

    class_name, subfolder = DENOISER_CLASSES[spec.family]
    names = [subfolder] + (list(TEXT_ENCODER_FIELDS) if spec.performance.quantize_text_encoders else [])
    out: dict[str, torch.nn.Module] = {}
    for name in names:
        if name in exclude or not (folder / name).is_dir():
            continue
        if not any((folder / name).glob("*.safetensors")):
            raise CheckpointError(f"{folder / name}: no weights to quantize to nf4 (nf4 needs a diffusers folder)")
        if name == subfolder:
            config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_compute_dtype=dtype)  # fmt: skip
            cls = getattr(diffusers, class_name)
        else:
            config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=dtype)  # fmt: skip
            cls = getattr(transformers, json.loads((folder / "model_index.json").read_text())[name][1])
        out[name] = cls.from_pretrained(str(folder), subfolder=name, quantization_config=config,
                                        torch_dtype=dtype, local_files_only=True)  # fmt: skip
    return out


def check_file(spec: ModelSpec) -> None:
    """The start-up check of a model's component files: readable, the right kind. Cheap (headers, key names);
    raises CheckpointError naming the file."""
    for component, file in file_fields(spec).items():
        path = Path(file)
        keys = _keys(path)
        _check_quantization(path, keys)
        if component in TEXT_ENCODER_FIELDS:
            continue
        not_weights = (*_SCALE_SUFFIXES, *_DROPPED_SUFFIXES, _COMFY_QUANT)
        weights = layouts.denoiser_keys(
            k for k in keys if not k.endswith(not_weights) and k not in _DROPPED_KEYS and not bnb_files.is_aux(k)
        )
        prefix = layouts.common_prefix(weights)
        try:
            kind, _ = layouts.detect_layout({k.removeprefix(prefix) for k in weights})
        except layouts.LayoutError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if kind != layouts.kind_of(spec.family):
            raise CheckpointError(
                f"{path}: it holds {layouts.KIND_LABELS[kind]}, but the model's family is {spec.family}"
            )


def _check_quantization(path: Path, keys: list[str]) -> None:
    """At start-up, what `split_scales` would refuse at load: another ComfyUI quantisation than FP8, scales per row,
    bitsandbytes 8-bit."""
    try:
        bnb_files.check_quant_types(keys)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    markers = [k for k in keys if k.endswith(_COMFY_QUANT)]
    scales = [k for k in keys if k.endswith(_SCALE_SUFFIXES)]
    if path.suffix.lower() != ".safetensors" or not (markers or scales):
        return
    with safe_open(str(path), framework="pt") as f:
        try:
            for key in markers:
                check_comfy_quant(key, f.get_tensor(key))
            for key in scales:
                check_per_tensor_scale(key, tuple(f.get_slice(key).get_shape()))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e


def _keys(path: Path) -> list[str]:
    path = _existing_file(path)
    if path.suffix.lower() == ".gguf":
        return [t.name for t in _gguf_reader(path).tensors]
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


@contextlib.contextmanager
def keep_storage_dtype(pipe) -> Iterator[None]:
    """Around `from_pipe(base, dtype=...)`, which casts every module to one dtype: FP8-stored and GGUF-quantized
    modules keep theirs (casting them would undo the saving, or fail)."""
    pinned = []
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and (
            getattr(component, "_easel_fp8", None) is not None or getattr(component, "is_quantized", False)
        ):
            component.to = types.MethodType(lambda self, *a, **k: self, component)
            pinned.append(component)
    try:
        yield
    finally:
        for component in pinned:
            del component.to
