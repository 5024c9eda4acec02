"""FLUX.1: rectified-flow transformer with distilled guidance (FLUX.1-dev style).

`req.guidance` is FLUX's distilled guidance (`guidance_scale`, an embedding input, one transformer pass per step).
The negative prompt is ignored: FLUX.1-dev/schnell were not trained for CFG, and diffusers' optional "true CFG"
(`true_cfg_scale` > 1 with a negative prompt) doubles the cost for little gain on these models.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
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

_DERIVED: dict[Task, type[DiffusionPipeline]] = {Task.IMG2IMG: FluxImg2ImgPipeline, Task.INPAINT: FluxInpaintPipeline}


class FluxAdapter(FamilyAdapter):
    families = ("flux",)
    size_multiple = 16  # VAE factor 8 x 2x2 latent packing
    tasks = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    flow_matching = True

    def load(self, spec: ModelSpec, path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        pipe = FluxPipeline.from_pretrained(path, **dtype_kwargs(dtype))
        place(pipe, spec, device)  # the device, or CPU offload hooks (models.yaml performance.offload)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)

    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        self.check_task(task)
        if task == Task.TXT2IMG:
            return loaded.base
        return derive(loaded, task, _DERIVED[task])

    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        req = items[0].request
        pipe = call_view(self.pipeline_for(loaded, req.task), scheduler, req.steps)
        prompts, _ = batch_prompts(items)
        kwargs: dict[str, Any] = dict(
            prompt=prompts,
            width=req.width,
            height=req.height,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            generator=generators(batch_seeds(items)),
            callback_on_step_end=step_callback(on_step, req.steps),
            output_type="pil",
        )
        if req.task == Task.IMG2IMG:
            kwargs.update(image=batch_init_images(items), strength=req.strength)
        elif req.task == Task.INPAINT:
            kwargs.update(image=batch_init_images(items), mask_image=mask_arg(req), strength=req.strength)
        return split_outputs(list(pipe(**kwargs).images), items)
