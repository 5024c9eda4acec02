"""Family adapters: `adapter_for(family)` plus the helpers every adapter's `run` shares.

The adapter modules are imported lazily by `adapter_for`, so importing this package stays cheap and the adapters can
import the helpers below without an import cycle.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers import utils as _diffusers_utils
from PIL import Image

from pipelines.families.base import BatchItem, FamilyAdapter, LoadedModel, StepCallback, generators
from pipelines.request import GenerationRequest, Task
from pipelines.variation import batch_noise, wants_variation

log = logging.getLogger("easel.engine")

# family -> (module, class); imported on first use.
_ADAPTER_CLASSES: dict[str, tuple[str, str]] = {
    "sd15": ("pipelines.families.sd", "StableDiffusionAdapter"),
    "sdxl": ("pipelines.families.sd", "StableDiffusionAdapter"),
    "flux": ("pipelines.families.flux", "FluxAdapter"),
    "qwen-image": ("pipelines.families.qwen", "QwenImageAdapter"),
    "qwen-image-edit": ("pipelines.families.qwen", "QwenImageEditAdapter"),
}
_ADAPTERS: dict[tuple[str, str], FamilyAdapter] = {}
# diffusers renamed `torch_dtype` to `dtype` (the old name now warns); older releases only know `torch_dtype`.
_DTYPE_KW = "dtype" if hasattr(_diffusers_utils, "_resolve_dtype") else "torch_dtype"


def adapter_for(family: str) -> FamilyAdapter:
    """The (stateless, shared) adapter of a registry family. Raises KeyError for an unknown family."""
    try:
        key = _ADAPTER_CLASSES[family]
    except KeyError:
        raise KeyError(f"unknown model family '{family}'") from None
    if key not in _ADAPTERS:
        _ADAPTERS[key] = getattr(importlib.import_module(key[0]), key[1])()
    return _ADAPTERS[key]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype argument of `from_pretrained`/`from_pipe` under the name this diffusers understands."""
    return {_DTYPE_KW: dtype}


def derive(loaded: LoadedModel, task: Task, cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    """`cls.from_pipe(loaded.base)` once per task, cached in `loaded.derived` (weights shared, never reloaded)."""
    if task not in loaded.derived:
        # The dtype matters: without it from_pipe casts every shared module to float32, in place. FP8-stored and
        # GGUF-quantized modules keep their own.
        from pipelines.quantized import keep_storage_dtype

        with keep_storage_dtype(loaded.base):
            pipe = cls.from_pipe(loaded.base, **dtype_kwargs(loaded.dtype))
        pipe.set_progress_bar_config(disable=True)
        loaded.derived[task] = pipe
    return loaded.derived[task]


_PINNED_DEVICE_CLASSES: dict[tuple[type, str], type] = {}


def _pin_execution_device(view: DiffusionPipeline, device: torch.device) -> None:
    """Give the view a fixed `_execution_device`. diffusers works it out on every read by walking every module of
    every component for offload hooks, a few ms of Python per read on a full-size model, read several times per call
    (on a GPU that is time the device idles). Only for pipelines without offload hooks, whose device is known."""
    key = (type(view), str(device))
    pinned = _PINNED_DEVICE_CLASSES.get(key)
    if pinned is None:
        base = type(view)
        pinned = type(base.__name__, (base,), {"_execution_device": device, "__module__": base.__module__})
        _PINNED_DEVICE_CLASSES[key] = pinned
    view.__class__ = pinned


def call_view(
    pipe: DiffusionPipeline, scheduler: Any | None, steps: int, device: torch.device | None = None
) -> DiffusionPipeline:
    """A per-call shallow copy of a cached pipeline that runs with its own scheduler.

    `device`: the pipeline's device when it has no CPU-offload hooks (`LoadedModel.execution_device`), pinned on the
    view. Components (weights) are shared; attributes the call sets (`scheduler`, `_interrupt`, `_guidance_scale`, ...)
    land on the copy only, so nothing leaks into the cached pipeline or other requests. Cheaper than `from_pipe`,
    which re-runs `__init__` and casts every shared module to one dtype. Schedulers are stateful (timesteps, step
    index), so even without a requested one the call gets a fresh instance of the model's own.
    """
    if scheduler is None:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if steps == 1 and scheduler.config.get("shift_terminal"):
        # Stretching a single sigma to the terminal value divides by zero (NaN latents): Qwen-Image's config has
        # shift_terminal, and one step is a legal request.
        scheduler = type(scheduler).from_config(scheduler.config, shift_terminal=None)
    view = copy.copy(pipe)
    view.scheduler = scheduler
    if device is not None:
        _pin_execution_device(view, device)
    return view


def step_callback(
    on_step: StepCallback,
    default_total: int,
    conditioning: Callable[[DiffusionPipeline, int, dict], None] | None = None,
) -> Callable[[DiffusionPipeline, int, Any, dict], dict]:
    """`callback_on_step_end` reporting (steps done, total) and setting `_interrupt` when `on_step` returns True.
    `conditioning(pipe, next_step, callback_kwargs)` may replace the tensors the next step reads (A1111 prompt
    editing: `prompt_embeds`, listed in the call's `callback_on_step_end_tensor_inputs`).

    The total is the number of timesteps the pipeline really runs (`_num_timesteps`: fewer than `steps` for
    img2img/inpaint with strength < 1, one more for PNDM's PLMS warm-up step).
    """

    previews = getattr(on_step, "previews", None)  # a StepReporter's (pipelines.families.base)

    def callback(pipe: DiffusionPipeline, i: int, t: Any, callback_kwargs: dict) -> dict:
        nonlocal previews
        total = getattr(pipe, "_num_timesteps", None) or default_total
        if previews is not None:
            try:
                if on_step.wants_preview(i + 1, total) and "latents" in callback_kwargs:
                    previews.capture(i + 1, callback_kwargs["latents"])
                else:
                    previews.poll()
            except Exception as e:  # a preview must never cost the image (e.g. latents of an unexpected layout)
                log.warning("live previews off for this call: %s: %s", type(e).__name__, e)
                previews = None
        if conditioning is not None:
            conditioning(pipe, i + 1, callback_kwargs)
        if on_step(i + 1, total):
            pipe._interrupt = True
        return callback_kwargs

    return callback


def packed_variation_latents(pipe: DiffusionPipeline, items: list[BatchItem], width: int, height: int, video: bool):
    """FLUX / Qwen-Image txt2img with A1111 variation seeds: each image's noise (pipelines.variation) in the shape
    the pipeline draws it ((C, h, w), Qwen's with a frame axis), packed into 2x2 patches as the pipeline packs its
    own; None when the call has no variation (the pipeline draws the noise itself)."""
    req = items[0].request
    if req.task != Task.TXT2IMG or not wants_variation(
        req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h
    ):
        return None
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels // 4
    h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
    noise = torch.cat(
        [
            batch_noise(
                (c, h, w),
                it.seeds,
                it.image_subseeds(),
                it.request.subseed_strength,
                it.request.seed_resize_from_w,
                it.request.seed_resize_from_h,
                f,
            )
            for it in items
        ]
    )
    if video:
        noise = noise[:, None]
    return pipe._pack_latents(noise, noise.shape[0], c, h, w).to(pipe._execution_device, pipe.transformer.dtype)


def init_image_arg(req: GenerationRequest, n: int) -> Image.Image | list[Image.Image]:
    """The `image` argument for `n` images: the single init image, or A1111's cycling over several."""
    if not req.init_images:
        raise ValueError(f"task '{req.task.value}' needs an init image")
    if len(req.init_images) == 1:
        return req.init_images[0]
    return [req.init_images[i % len(req.init_images)] for i in range(n)]


def first_init_image(req: GenerationRequest) -> Image.Image:
    image = init_image_arg(req, 1)
    return image[0] if isinstance(image, list) else image


def mask_arg(req: GenerationRequest) -> Image.Image:
    if req.mask is None:
        raise ValueError("task 'inpaint' needs a mask")
    return req.mask


def batch_prompts(items: list[BatchItem]) -> tuple[list[str], list[str]]:
    """Prompt and negative prompt per image of the call (one entry per seed of every item)."""
    prompts = [it.request.prompt for it in items for _ in it.seeds]
    negatives = [it.request.negative_prompt for it in items for _ in it.seeds]
    return prompts, negatives


def batch_seeds(items: list[BatchItem]) -> list[int]:
    return [s for it in items for s in it.seeds]


def batch_init_images(items: list[BatchItem]) -> list[Image.Image]:
    """The init image of every image of the call (A1111 cycles over several init images within a request)."""
    out: list[Image.Image] = []
    for it in items:
        image = init_image_arg(it.request, len(it.seeds))
        out.extend(image if isinstance(image, list) else [image] * len(it.seeds))
    return out


def split_outputs(images: list[Image.Image], items: list[BatchItem]) -> list[list[Image.Image]]:
    """Hand each item back its own images, in call order."""
    out, start = [], 0
    for it in items:
        out.append(images[start : start + len(it.seeds)])
        start += len(it.seeds)
    return out


def to_pil(images: torch.Tensor | list[Image.Image]) -> list[Image.Image]:
    """A pipeline's `output_type="pt"` images (N, 3, H, W in [0, 1], on its device) as PIL images.

    The conversion to uint8 runs on the device and the batch crosses to the host in one copy, a quarter of the bytes
    of diffusers' own "pil" path (which copies float32 and converts on the CPU). The arithmetic is the same as
    diffusers' (float32, x255, round half to even), so the pixels are identical.
    """
    if not isinstance(images, torch.Tensor):
        return list(images)
    pixels = images.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def loop_kwargs(req: GenerationRequest, seeds: list[int], on_step: StepCallback, output_type: str = "pt") -> dict:
    """The pipeline arguments every family's call shares: steps, one generator per image, progress, output (tensors
    by default: `to_pil` turns them into images)."""
    steps = schedule_steps(req)
    return dict(
        num_inference_steps=steps,
        generator=generators(seeds),
        callback_on_step_end=step_callback(on_step, steps),
        output_type=output_type,
    )


def schedule_steps(req: GenerationRequest) -> int:
    """`num_inference_steps` for the pipeline. Image-to-image and inpainting denoise only the last `steps * strength`
    steps of the schedule; below one step diffusers has no timestep left and fails, so the schedule is lengthened
    until one denoising step remains (A1111 also always runs at least one)."""
    if req.task in (Task.IMG2IMG, Task.INPAINT) and 0 < req.strength < 1 and int(req.steps * req.strength) < 1:
        steps = math.ceil(1 / req.strength)
        while int(steps * req.strength) < 1:  # float rounding
            steps += 1
        return steps
    return req.steps
