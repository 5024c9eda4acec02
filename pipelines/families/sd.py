"""Stable Diffusion 1.5 and SDXL: UNet, discrete-time schedulers, classic CFG with a negative prompt."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from pipelines.families import (
    batch_init_images,
    batch_prompts,
    batch_seeds,
    call_view,
    derive,
    dtype_kwargs,
    mask_arg,
    split_outputs,
    step_callback,
)
from pipelines.families.base import BatchItem, FamilyAdapter, LoadedModel, StepCallback, generators
from pipelines.optimize import place
from pipelines.registry import ModelSpec
from pipelines.request import Task

_CLASSES: dict[str, dict[Task, type[DiffusionPipeline]]] = {
    "sd15": {
        Task.TXT2IMG: StableDiffusionPipeline,
        Task.IMG2IMG: StableDiffusionImg2ImgPipeline,
        Task.INPAINT: StableDiffusionInpaintPipeline,
    },
    "sdxl": {
        Task.TXT2IMG: StableDiffusionXLPipeline,
        Task.IMG2IMG: StableDiffusionXLImg2ImgPipeline,
        Task.INPAINT: StableDiffusionXLInpaintPipeline,
    },
}


class StableDiffusionAdapter(FamilyAdapter):
    families = ("sd15", "sdxl")
    size_multiple = 8
    tasks = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    flow_matching = False

    def load(self, spec: ModelSpec, path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        cls = _CLASSES[spec.family][Task.TXT2IMG]
        kwargs: dict[str, Any] = {}
        if spec.family == "sd15":
            # The server never runs the NSFW checker (A1111 doesn't either); don't even load its weights.
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
        place(pipe, spec, device)  # the device, or CPU offload hooks (models.yaml performance.offload)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)

    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        self.check_task(task)
        if task == Task.TXT2IMG:
            return loaded.base
        return derive(loaded, task, _CLASSES[loaded.spec.family][task])

    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        req = items[0].request
        pipe = call_view(self.pipeline_for(loaded, req.task), scheduler, req.steps)
        prompts, negatives = batch_prompts(items)
        seeds = batch_seeds(items)
        kwargs: dict[str, Any] = dict(
            prompt=prompts,
            # None rather than "": SDXL then uses zeros for the unconditional embedding (force_zeros_for_empty_prompt).
            # The batcher never mixes empty and non-empty negative prompts in one call.
            negative_prompt=negatives if any(negatives) else None,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            generator=generators(seeds),
            callback_on_step_end=step_callback(on_step, req.steps),
            output_type="pil",
        )
        if req.task == Task.TXT2IMG:
            kwargs.update(width=req.width, height=req.height)
        elif req.task == Task.IMG2IMG:
            # img2img takes its size from the (already resized) init images.
            kwargs.update(image=batch_init_images(items), strength=req.strength)
        elif req.task == Task.INPAINT:
            kwargs.update(
                image=batch_init_images(items),
                mask_image=mask_arg(req),
                strength=req.strength,
                width=req.width,
                height=req.height,
            )
        return split_outputs(list(pipe(**kwargs).images), items)
