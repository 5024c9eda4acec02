"""The CUDA fast path: placement (device or CPU offload), attention backend, channels_last, fused QKV,
torch.compile with warm-up at load time, and VAE tiling/slicing per call above a size threshold.

Everything here is chosen per model from `ModelSpec.performance` and skipped on CPU, where the stock diffusers path
is what runs (the demo models and the tests). `plan_optimizations` is pure so the choice itself is testable anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline

from pipelines.registry import ModelSpec, PerformanceSpec

log = logging.getLogger("easel.optimize")

UNET_FAMILIES = frozenset({"sd15", "sdxl"})


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module | None:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def plan_optimizations(spec: ModelSpec, device: torch.device, *, force: bool = False) -> list[str]:
    """The steps `apply_optimizations` takes for this model on this device, in order. Empty on CPU unless forced
    (tests force the device-independent ones to prove the code paths run)."""
    perf: PerformanceSpec = spec.performance
    if device.type != "cuda" and not force:
        return []
    steps: list[str] = []
    if perf.attention == "xformers":
        steps.append("xformers" if xformers_available() else "sdpa")  # asked for but missing: keep SDPA
    else:
        steps.append("sdpa")
    if perf.channels_last and spec.family in UNET_FAMILIES:
        steps.append("channels_last")
    if perf.fuse_qkv:
        steps.append("fuse_qkv")
    if perf.compile != "off" and device.type == "cuda":
        steps.append(f"compile_{perf.compile}")
    return steps


def place(pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device) -> None:
    """Move the pipeline to its device, or install CPU offload hooks for cards too small to hold it."""
    offload = spec.performance.offload
    if device.type == "cuda" and offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif device.type == "cuda" and offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def apply_optimizations(
    pipe: DiffusionPipeline,
    spec: ModelSpec,
    device: torch.device,
    *,
    warm_up: Callable[[], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Apply the planned steps to a loaded base pipeline (derived pipelines share its modules). Returns what ran."""
    applied: list[str] = []
    model = denoiser(pipe)
    for step in plan_optimizations(spec, device, force=force):
        try:
            if step == "xformers":
                pipe.enable_xformers_memory_efficient_attention()
            elif step == "sdpa":
                pass  # diffusers' default attention processors already call F.scaled_dot_product_attention
            elif step == "channels_last" and model is not None:
                model.to(memory_format=torch.channels_last)
            elif step == "fuse_qkv" and model is not None and hasattr(model, "fuse_qkv_projections"):
                model.fuse_qkv_projections()
            elif step == "compile_regional" and model is not None:
                # Compiles the repeated transformer blocks once and reuses the code for each: most of the speed of
                # a full compile at a fraction of the warm-up.
                model.compile_repeated_blocks(fullgraph=True, mode=spec.performance.compile_mode)
            elif step == "compile_full" and model is not None:
                model.compile(fullgraph=True, mode=spec.performance.compile_mode)
            else:
                continue
            applied.append(step)
        except Exception as e:  # an optimisation that does not fit this model must not stop it from serving
            log.warning("model %s: %s not applied: %s: %s", spec.id, step, type(e).__name__, e)
    if any(s.startswith("compile") for s in applied) and warm_up is not None:
        warm_up()  # pay the compilation at load time, not on the first user request
        applied.append("warm_up")
    if applied:
        log.info("model %s on %s: %s", spec.id, device, ", ".join(applied))
    return applied


def prepare_call(
    pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device, width: int, height: int, n: int
) -> None:
    """Per call, on CUDA: tiled VAE decode for large images, sliced decode for large batches. The worker runs one
    call at a time per device, so toggling the shared VAE here cannot affect a concurrent call."""
    vae = getattr(pipe, "vae", None)
    if device.type != "cuda" or vae is None:
        return
    perf = spec.performance
    tiling = perf.vae_tiling_above_pixels is not None and width * height > perf.vae_tiling_above_pixels
    slicing = perf.vae_slicing_above_images is not None and n > perf.vae_slicing_above_images
    for flag, enable, disable in (
        (tiling, "enable_tiling", "disable_tiling"),
        (slicing, "enable_slicing", "disable_slicing"),
    ):
        method = getattr(vae, enable if flag else disable, None)
        if method is not None:
            method()
