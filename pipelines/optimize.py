"""The CUDA fast path: placement (device or CPU offload), attention backend, channels_last, fused QKV, FP8
linear layers, torch.compile (with CUDA graphs for the UNets) warmed up at load time for the configured shapes, and
VAE tiling/slicing per call above a size threshold.

Everything here is chosen per model from `ModelSpec.performance` and skipped on CPU, where the stock diffusers path
is what runs (the demo models and the tests). `plan_optimizations` is pure (the device's compute capability and the
installed packages are arguments), so the choice itself is testable anywhere. A step that does not fit a model is
logged and skipped; it never stops the model from serving.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator

import torch
from diffusers import DiffusionPipeline

from pipelines.registry import ModelSpec, PerformanceSpec

log = logging.getLogger("easel.optimize")

UNET_FAMILIES = frozenset({"sd15", "sdxl"})
FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: tensor cores with FP8 inputs
# `attention` -> diffusers' attention backend (`ModelMixin.set_attention_backend`); for the transformer families,
# whose attention goes through diffusers' dispatcher. The UNets call scaled_dot_product_attention directly.
DIFFUSERS_BACKENDS = {"flash": "flash", "flash3": "_flash_3", "sage": "sage", "cudnn": "_native_cudnn"}
# The package each option needs (diffusers checks versions itself when the backend is set).
ATTENTION_PACKAGES = {
    "xformers": "xformers",
    "flash": "flash_attn",
    "flash3": "flash_attn_interface",
    "sage": "sageattention",
}
# Shapes (resolution x batch) a compiled denoiser may specialise on before dynamo gives up and runs eagerly.
RECOMPILE_LIMIT = 64
FP8_COMPUTE = "fp8-compute"  # `_easel_fp8` of a denoiser that got the FP8 tier while loading


def installed_packages() -> frozenset[str]:
    """The optional fast-path packages importable here."""
    names = {*ATTENTION_PACKAGES.values(), "torchao", "bitsandbytes"}
    return frozenset(n for n in names if importlib.util.find_spec(n) is not None)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def capability_of(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module | None:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def attention_step(spec: ModelSpec, installed: frozenset[str]) -> tuple[str, str | None]:
    """The attention step for this model, and why it differs from what was asked (None when it does not)."""
    asked = spec.performance.attention
    if asked == "sdpa":
        return "sdpa", None
    package = ATTENTION_PACKAGES.get(asked)
    if package is not None and package not in installed:
        return "sdpa", f"attention '{asked}' needs the {package} package, which is not installed: using sdpa"
    if asked == "xformers":
        return "xformers", None
    if spec.family in UNET_FAMILIES:
        return "sdpa", f"attention '{asked}' applies to the FLUX/Qwen-Image transformers only: using sdpa"
    return f"attention_{asked}", None


def compile_choice(perf: PerformanceSpec, family: str) -> str:
    """off | regional | full, with auto resolved per family."""
    if perf.compile != "auto":
        return perf.compile
    return "full" if family in UNET_FAMILIES else "regional"


def compile_mode(perf: PerformanceSpec, family: str) -> str | None:
    """The torch.compile mode: as configured, else CUDA graphs ("reduce-overhead") where they are on."""
    if perf.compile_mode is not None:
        return perf.compile_mode
    graphs = perf.cuda_graphs if perf.cuda_graphs is not None else compile_choice(perf, family) == "full"
    return "reduce-overhead" if graphs else None


def fp8_compute_tier(
    spec: ModelSpec, capability: tuple[int, int] | None, installed: frozenset[str]
) -> tuple[bool, str]:
    """Whether the FP8 compute tier (torchao FP8 matmuls) applies to this model's denoiser, and why: `quantization`
    fp8, or auto on a transformer family, on a card with FP8 compute and torchao installed. The one decision for a
    bf16 denoiser (`quantization_step`) and for an FP8 `denoiser:` file (`pipelines.quantized.load_denoiser`)."""
    asked = spec.performance.quantization
    if asked in ("none", "int8", "nf4"):
        return False, f"quantization is {asked}"
    if asked == "auto" and spec.family in UNET_FAMILIES:
        return False, "quantization auto leaves the UNets out of FP8 compute (their small matmuls gain little)"
    if capability is None or capability < FP8_MIN_CAPABILITY:
        return False, "no FP8 compute on this device (needs compute capability 8.9+)"
    if "torchao" not in installed:
        return False, "FP8 compute needs torchao (the [cuda] extra)"
    return True, f"FP8 compute on this device (compute capability {capability[0]}.{capability[1]}, torchao)"


def quantization_step(
    spec: ModelSpec, capability: tuple[int, int] | None, installed: frozenset[str]
) -> tuple[bool, str | None]:
    """Whether the loaded denoiser goes to FP8 with the other fast path steps, and why not when it was asked for
    explicitly."""
    if spec.denoiser:  # its own file sets its format; an FP8 file gets the FP8 tier while loading (load_denoiser)
        return False, None
    on, why = fp8_compute_tier(spec, capability, installed)
    if on or spec.performance.quantization != "fp8":
        return on, None
    return False, f"{why}; storing the weights in FP8 and computing in the model's dtype layer by layer"


def plan_optimizations(
    spec: ModelSpec,
    device: torch.device,
    *,
    force: bool = False,
    capability: tuple[int, int] | None = None,
    installed: frozenset[str] | None = None,
) -> list[str]:
    """The steps `apply_optimizations` takes for this model on this device, in order. Empty on CPU unless forced
    (tests force the device-independent ones to prove the code paths run). `capability` and `installed` default to
    the device's and this environment's."""
    perf: PerformanceSpec = spec.performance
    if device.type != "cuda" and not force:
        return []
    installed = installed_packages() if installed is None else installed
    if capability is None and device.type == "cuda":
        capability = capability_of(device)
    steps = [attention_step(spec, installed)[0]]
    if perf.channels_last and spec.family in UNET_FAMILIES:
        steps.append("channels_last")
    if perf.fuse_qkv:
        steps.append("fuse_qkv")
    if quantization_step(spec, capability, installed)[0]:
        steps.append("fp8")  # after fusing (the fused projections are quantized too), before compiling
    choice = compile_choice(perf, spec.family)
    if choice != "off" and device.type == "cuda":
        steps.append(f"compile_{choice}")
    return steps


def place(pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device) -> None:
    """Move the pipeline to its device, or install CPU offload hooks for cards too small to hold it. `auto` (CUDA):
    chosen from the bytes the pipeline holds and the device's free memory (pipelines.placement); raises
    PlacementError when it cannot fit at all."""
    from pipelines import placement

    # Quantization at load first, on the host: the placement then counts the bytes the model really has, and the
    # device never holds the unquantized weights.
    offload = spec.performance.offload
    gguf = spec.performance.gguf
    if gguf == "auto" and offload in ("model", "sequential"):
        gguf = "keep"  # an offload chosen by hand is a memory budget: keep the smaller weights
    steps = quantize_at_load(pipe, spec, device, pipe.dtype)
    steps += dequantize_gguf_if_it_fits(pipe, gguf, spec.id, device)
    steps += requantize_4bit_file(pipe, gguf, spec.id, device)
    pipe._easel_load_steps = steps  # noqa: SLF001  (the engine reports them)
    if offload == "auto":
        if device.type == "cuda":
            placement.apply(pipe, placement.plan(pipe, spec.id, device, pipe.dtype), device)
        else:
            pipe.to(device)
            pipe._easel_offload = "resident"  # noqa: SLF001
        return
    if device.type == "cuda" and offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif device.type == "cuda" and offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def quantize_fp8(model: torch.nn.Module) -> int:
    """The model's linear layers to FP8 weights with per-row scales and dynamically scaled FP8 activations (torchao).
    Layers whose sizes FP8 matmuls cannot take (not multiples of 16) stay as they are. Returns how many changed."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    except ImportError:  # torchao < 0.9 names it as a function
        from torchao.quantization import float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight()

    def eligible(module: torch.nn.Module, _fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    count = sum(1 for name, m in model.named_modules() if eligible(m, name))
    quantize_(model, config, filter_fn=eligible)
    return count


class QuantizationUnavailable(ValueError):
    """`performance.quantization` asks for something this machine cannot do (the message says what is missing)."""


def nf4_problem(
    device: torch.device, installed: frozenset[str] | None = None, needs: str = "quantization nf4 needs"
) -> str | None:
    """Why bitsandbytes' 4-bit layers cannot run here (a sentence starting with `needs`), or None. Its 4-bit kernels
    are CUDA only."""
    installed = installed_packages() if installed is None else installed
    if device.type != "cuda":
        return f"{needs} a CUDA device (bitsandbytes 4-bit); this model runs on {device}"
    if "bitsandbytes" not in installed:
        return f"{needs} the bitsandbytes package: pip install 'easel[nf4]'"
    return None


def load_quantization(spec: ModelSpec, device: torch.device, capability: tuple[int, int] | None,
                      installed: frozenset[str]) -> str | None:  # fmt: skip
    """What `quantize_at_load` does for this model: fp8-compute (torchao, the FP8 tier: applied with the other fast
    path steps), fp8-storage (layerwise casting), int8 (torchao weight-only), nf4, or None. Raises
    QuantizationUnavailable where what was asked cannot run here."""
    asked = spec.performance.quantization
    if asked in ("none", "auto"):
        return None
    if asked == "nf4":
        problem = nf4_problem(device, installed)
        if problem:
            raise QuantizationUnavailable(problem)
        return "nf4"
    if asked == "int8":
        if "torchao" not in installed:
            raise QuantizationUnavailable("quantization int8 needs torchao: pip install torchao (or the [cuda] extra)")
        return "int8"
    if quantization_step(spec, capability, installed)[0]:
        return "fp8-compute"
    return "fp8-storage"  # no FP8 compute (or no torchao): FP8 in memory, the model's dtype while each layer runs


def quantize_at_load(pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list[str]:
    """`performance.quantization` on a loaded pipeline's denoiser (and text encoders with quantize_text_encoders).
    A denoiser that came from its own file (`denoiser:`, FP8 or GGUF already) is left as it is. Returns the steps."""
    installed = installed_packages()
    how = load_quantization(spec, device, capability_of(device), installed)
    if how in (None, "fp8-compute", "nf4"):  # fp8-compute: apply_optimizations; nf4: pipelines.quantized, at load
        return []
    from pipelines.quantized import store_fp8

    names = [] if spec.denoiser else [n for n in ("unet", "transformer") if getattr(pipe, n, None) is not None]
    if spec.performance.quantize_text_encoders:
        names += [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    done = []
    for name in names:
        module = getattr(pipe, name)
        if how == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: isinstance(m, torch.nn.Linear))
            module._easel_fp8 = "int8"  # noqa: SLF001  (from_pipe must leave its dtype alone)
        else:
            store_fp8(module, torch.float8_e4m3fn, dtype, {})
        done.append(f"{how}:{name}")
    if done:
        log.info("model %s: %s", spec.id, ", ".join(done))
    return done


def dequantize_gguf_if_it_fits(pipe: DiffusionPipeline, policy: str, model_id: str, device: torch.device) -> list[str]:
    """`performance.gguf` on a loaded pipeline (before placement): a GGUF denoiser dequantized once to the pipeline's
    dtype under `dequantize`, or under `auto` on CUDA when the dequantized pipeline still fits resident in the free
    memory. Returns the step taken (or nothing)."""
    from pipelines import placement, quantized

    model = denoiser(pipe)
    if model is None or policy == "keep" or not quantized.is_gguf(model):
        return []
    dtype = pipe.dtype
    if policy == "auto":
        if device.type != "cuda":
            return []
        fits, needed, free = placement.resident_with(pipe, quantized.dequantized_bytes(model, dtype), device, dtype)
        if not fits:
            log.info("model %s: GGUF denoiser kept quantized (dequantized per call): dequantized, the pipeline would "
                     "need %d bytes on the device, %d free", model_id, needed, free)  # fmt: skip
            return []
    started = time.perf_counter()
    plain = quantized.dequantize_gguf(model, dtype)
    pipe.register_modules(**{"unet" if getattr(pipe, "unet", None) is not None else "transformer": plain})
    log.info("model %s: GGUF denoiser dequantized once to %s in %.1f s (%s)", model_id,
             str(dtype).removeprefix("torch."), time.perf_counter() - started,
             "gguf: dequantize" if policy == "dequantize" else "it fits resident")  # fmt: skip
    return ["gguf-dequantized"]


def requantize_4bit_file(
    pipe: DiffusionPipeline, policy: str, model_id: str, device: torch.device, installed: frozenset[str] | None = None
) -> list[str]:
    """`performance.gguf` for a bitsandbytes 4-bit file's denoiser, which loads decoded (pipelines.quantized): back into
    bitsandbytes 4-bit layers under `keep`, or under `auto` when the decoded pipeline would not fit resident in the
    free memory; decoded under `dequantize`. 4-bit layers need CUDA and bitsandbytes: elsewhere it stays decoded,
    the reason logged. Returns the step taken (or nothing)."""
    from pipelines import placement, quantized

    model = denoiser(pipe)
    file = getattr(model, "_easel_4bit_file", None)
    if model is None or file is None:
        return []
    dtype = str(pipe.dtype).removeprefix("torch.")
    decoded = f"model {model_id}: 4-bit ({file.quant_type}) denoiser kept decoded in {dtype}"
    if policy == "dequantize":
        log.info("%s (gguf: dequantize)", decoded)
        return []
    problem = nf4_problem(device, installed, needs="4-bit layers need")
    if problem is not None:
        log.info("%s: %s", decoded, problem)
        return []
    if policy == "auto":
        fits, needed, free = placement.resident_with(pipe, placement.module_bytes(model), device, pipe.dtype)
        if fits:
            log.info("%s: it fits resident (%d bytes needed, %d free)", decoded, needed, free)
            return []
    started = time.perf_counter()
    work = device if torch.cuda.is_available() else torch.device("cpu")  # the card quantizes much faster
    layers = quantized.to_bnb_4bit(model, file, pipe.dtype, work)
    log.info("model %s: 4-bit (%s) denoiser in bitsandbytes 4-bit layers again (%d layers, %.1f s; %s)", model_id,
             file.quant_type, layers, time.perf_counter() - started,
             "gguf: keep" if policy == "keep" else "decoded, it would not fit resident")  # fmt: skip
    return [f"bnb-{file.quant_type}"]


def compile_denoiser(model: torch.nn.Module, spec: ModelSpec, regional: bool) -> None:
    perf = spec.performance
    mode = compile_mode(perf, spec.family)
    kwargs: dict = {"fullgraph": True, "mode": mode}
    if mode == "reduce-overhead":
        # One static graph per shape (CUDA graphs replay fixed shapes); each new resolution or batch size is a
        # recompile (logged by `watch_compiles`), so allow enough of them.
        kwargs["dynamic"] = False
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if regional:
        # Compiles the repeated transformer blocks once and reuses the code for each: most of the speed of a full
        # compile at a fraction of the warm-up.
        model.compile_repeated_blocks(**kwargs)
    else:
        model.compile(**kwargs)


def uncompile(model: torch.nn.Module) -> None:
    """Undo `Module.compile` on the model and its blocks: they run eagerly again."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def apply_optimizations(
    pipe: DiffusionPipeline,
    spec: ModelSpec,
    device: torch.device,
    *,
    warm_up: Callable[[], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Apply the planned steps to a loaded base pipeline (derived pipelines share its modules). Returns what ran."""
    from pipelines import quantized

    applied: list[str] = []
    model = denoiser(pipe)
    installed = installed_packages()
    if device.type == "cuda" or force:
        note = attention_step(spec, installed)[1]
        quant_note = quantization_step(spec, capability_of(device), installed)[1]
        for message in filter(None, (note, quant_note)):
            log.warning("model %s: %s", spec.id, message)
    for step in plan_optimizations(spec, device, force=force, installed=installed):
        try:
            if step == "xformers":
                pipe.enable_xformers_memory_efficient_attention()
            elif step == "sdpa":
                pass  # diffusers' default attention processors already call F.scaled_dot_product_attention
            elif step.startswith("attention_") and model is not None:
                model.set_attention_backend(DIFFUSERS_BACKENDS[step.removeprefix("attention_")])
            elif step == "channels_last" and model is not None:
                model.to(memory_format=torch.channels_last)
            elif step == "fuse_qkv" and model is not None and hasattr(model, "fuse_qkv_projections"):
                storage = getattr(model, "_easel_fp8", None)
                if storage != FP8_COMPUTE and (storage is not None or quantized.is_gguf(model)):
                    # FP8-stored, int8, GGUF or bitsandbytes weights: concatenating them is not a fused layer.
                    log.info("model %s: QKV projections not fused: its weights are stored quantized (%s)", spec.id,
                             storage or "gguf")  # fmt: skip
                    continue
                if storage is None:  # else fused while loading, before the FP8 tier
                    model.fuse_qkv_projections()
            elif step == "fp8" and model is not None:
                log.info("model %s: %d linear layers in FP8", spec.id, quantize_fp8(model))
            elif step in ("compile_regional", "compile_full") and model is not None:
                compile_denoiser(model, spec, regional=step == "compile_regional")
            else:
                continue
            applied.append(step)
        except Exception as e:  # an optimisation that does not fit this model must not stop it from serving
            log.warning("model %s: %s not applied: %s: %s", spec.id, step, type(e).__name__, e)
    if any(s.startswith("compile") for s in applied) and warm_up is not None and model is not None:
        started = time.perf_counter()
        try:
            warm_up()  # pay the compilation at load time, not on the first user request
            applied.append("warm_up")
            log.info("model %s: compiled and warmed up in %.1f s", spec.id, time.perf_counter() - started)
        except Exception as e:  # a compile that fails on real inputs: serve eagerly rather than not at all
            uncompile(model)
            applied = [s for s in applied if not s.startswith("compile")]
            log.warning("model %s: compiled warm-up failed (%s: %s); running uncompiled", spec.id, type(e).__name__, e)
    if applied:
        log.info("model %s on %s: %s", spec.id, device, ", ".join(applied))
    return applied


def warmup_shapes(spec: ModelSpec) -> list[tuple[int, int, int]]:
    """(width, height, batch size) of every warm-up call: the configured sizes (default: the model's default size)
    times the configured batch sizes."""
    perf = spec.performance
    sizes = perf.warmup_sizes or [(spec.defaults.width, spec.defaults.height)]
    return [(w, h, b) for w, h in sizes for b in perf.warmup_batch_sizes]


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every model, every shape)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def watch_compiles(model_id: str, compiled: bool, width: int, height: int, images: int) -> Iterator[None]:
    """Around a pipeline call of a compiled model: when the call compiled new graphs (a shape not warmed up), log
    what it cost, so the shape can be added to `performance.warmup_sizes`."""
    if not compiled:
        yield
        return
    before, started = graphs_compiled(), time.perf_counter()
    yield
    new = graphs_compiled() - before
    if new > 0:
        log.warning(
            "model %s: compiled %d new graph(s) for %dx%d with %d image(s); that call took %.1f s. Add the size to "
            "performance.warmup_sizes (and the batch to warmup_batch_sizes) to compile it at load time instead",
            model_id, new, width, height, images, time.perf_counter() - started,
        )  # fmt: skip


def prepare_call(
    pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device, width: int, height: int, n: int
) -> None:
    """Per call, on CUDA: tiled VAE decode for large images, sliced decode for large batches. The worker runs one
    call at a time per device, so toggling the shared VAE here cannot affect a concurrent call."""
    vae = getattr(pipe, "vae", None)
    if device.type != "cuda" or vae is None:
        return
    perf = spec.performance
    limits = [perf.vae_tiling_above_pixels, getattr(vae, "_easel_tiling_above", None)]  # configured, offload auto's
    limit = min((v for v in limits if v is not None), default=None)
    tiling = limit is not None and width * height > limit
    slicing = perf.vae_slicing_above_images is not None and n > perf.vae_slicing_above_images
    for flag, enable, disable in (
        (tiling, "enable_tiling", "disable_tiling"),
        (slicing, "enable_slicing", "disable_slicing"),
    ):
        method = getattr(vae, enable if flag else disable, None)
        if method is not None:
            method()
