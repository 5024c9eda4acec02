"""FLUX.1: rectified-flow transformer with distilled guidance (FLUX.1-dev style).

`req.guidance` is FLUX's distilled guidance (`guidance_scale`, an embedding input, one transformer pass per step).
The negative prompt is ignored: FLUX.1-dev/schnell were not trained for CFG, and diffusers' optional "true CFG"
(`true_cfg_scale` > 1 with a negative prompt) doubles the cost for little gain on these models.

A1111 prompt syntax is reduced to its text (`prompts.strip_attention`): T5/CLIP get no per-token weights, BREAK is a
space, `<lora:name:w>` tags are removed and activate LoRAs (`pipelines.lora`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from PIL import Image

from pipelines import controlnet, single_file
from pipelines.families import (
    batch_init_images,
    batch_prompts,
    batch_seeds,
    call_view,
    derive,
    dtype_kwargs,
    loop_kwargs,
    mask_arg,
    packed_variation_latents,
    split_outputs,
    to_pil,
)
from pipelines.families.base import (
    BatchItem,
    FamilyAdapter,
    LoadedModel,
    StepCallback,
    UnsupportedTask,
)
from pipelines.lora import lora_scope
from pipelines.optimize import place
from pipelines.prompts import extract_loras, strip_attention
from pipelines.registry import ModelSpec
from pipelines.request import Task

_DERIVED: dict[Task, type[DiffusionPipeline]] = {Task.IMG2IMG: FluxImg2ImgPipeline, Task.INPAINT: FluxInpaintPipeline}


class FluxAdapter(FamilyAdapter):
    families = ("flux",)
    size_multiple = 16  # VAE factor 8 x 2x2 latent packing
    tasks = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    flow_matching = True

    def load(
        self,
        spec: ModelSpec,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        components: dict[str, torch.nn.Module] | None = None,
    ) -> LoadedModel:
        components = components or {}
        if spec.is_single_file:  # a BFL transformer .safetensors + VAE/text encoders from a local config folder
            pipe = single_file.load_pipeline(spec, path, dtype, components)
        else:
            pipe = FluxPipeline.from_pretrained(path, **dtype_kwargs(dtype), **components)
        place(pipe, spec, device)  # the device, or CPU offload hooks (models.yaml performance.offload)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)

    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        self.check_task(task)
        variant = loaded.spec.variant
        if variant == "flux-fill":
            # Fill's transformer takes the masked image and mask as extra input channels: inpainting is all it does.
            if task != Task.INPAINT:
                raise UnsupportedTask("a FLUX.1 Fill checkpoint only inpaints (it needs an image and a mask)")
            return loaded.base
        if task == Task.TXT2IMG:
            return loaded.base
        if variant == "flux-kontext" and task == Task.IMG2IMG:
            return derive(loaded, task, FluxKontextPipeline)  # instruction editing, not SDEdit-style noising
        return derive(loaded, task, _DERIVED[task])

    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        req = items[0].request
        cached = self.pipeline_for(loaded, req.task)
        if req.control_units:  # the task's ControlNet pipeline (the engine refuses IP-Adapter units here)
            cached = controlnet.control_pipeline(loaded, req.task)
        pipe = call_view(cached, scheduler, req.steps, loaded.execution_device)
        prompts, _ = batch_prompts(items)
        kwargs: dict[str, Any] = dict(
            prompt=[strip_attention(extract_loras(p)[0]) for p in prompts],
            width=req.width,
            height=req.height,
            guidance_scale=req.guidance,
            **loop_kwargs(req, batch_seeds(items), on_step),
        )
        latents = packed_variation_latents(pipe, items, req.width, req.height, video=False)
        if latents is not None:
            kwargs.update(latents=latents)
        if req.task == Task.IMG2IMG and loaded.spec.variant == "flux-kontext":
            # Kontext edits the image as given (no strength). Its defaults rescale the output to ~1 MP and the input
            # to a preferred resolution; the request's size (the init image is already resized to it) is kept instead.
            kwargs.update(image=batch_init_images(items), max_area=req.width * req.height, _auto_resize=False)
        elif req.task == Task.IMG2IMG:
            kwargs.update(image=batch_init_images(items), strength=req.strength)
        elif req.task == Task.INPAINT:
            kwargs.update(image=batch_init_images(items), mask_image=mask_arg(req), strength=req.strength)
        if req.control_units:
            controlnet.attach(pipe, loaded, items, kwargs)
        with lora_scope(loaded, items):
            return split_outputs(to_pil(pipe(**kwargs).images), items)
