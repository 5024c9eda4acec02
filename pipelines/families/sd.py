"""Stable Diffusion 1.5 and SDXL: UNet, discrete-time schedulers, classic CFG with a negative prompt.

Prompts follow A1111's syntax: `(word:1.3)` emphasis, BREAK and prompts past 77 tokens are encoded in 75-token
chunks by `pipelines.prompt_embeds` and passed as embeddings; `<lora:name:w>` tags activate LoRAs (`pipelines.lora`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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

from pipelines import single_file
from pipelines.families import (
    batch_init_images,
    batch_prompts,
    batch_seeds,
    call_view,
    derive,
    dtype_kwargs,
    loop_kwargs,
    mask_arg,
    split_outputs,
    to_pil,
)
from pipelines.families.base import (
    BatchItem,
    FamilyAdapter,
    LoadedModel,
    StepCallback,
    UnsupportedTask,
    start_hires,
)
from pipelines.hires import LATENT_UPSCALE_MODES, crop_box
from pipelines.lora import lora_scope
from pipelines.optimize import place
from pipelines.prompt_embeds import CacheScope, encode_sd15, encode_sdxl
from pipelines.prompts import extract_loras, request_loras
from pipelines.registry import ModelSpec
from pipelines.request import GenerationRequest, Task

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
        if spec.is_single_file:  # an A1111/ldm .safetensors file + a local config folder (SD1.5/SD2/SDXL/refiner)
            pipe = single_file.load_pipeline(spec, path, dtype)
        else:
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
        if loaded.spec.variant == "sdxl-refiner":
            # The refiner only refines: its base pipeline is img2img (no CLIP-L, aesthetic-score conditioning).
            if task == Task.TXT2IMG:
                raise UnsupportedTask("an SDXL refiner checkpoint cannot make images from text; use img2img")
            if task == Task.IMG2IMG:
                return loaded.base
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
        return split_outputs(list(self._call(loaded, items, scheduler, on_step)), items)

    def _call(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
        output_type: str = "pt",
        init_latents: torch.Tensor | None = None,
    ) -> Any:
        """One pipeline call: PIL images, or the final latents (`output_type="latent"`, for a latent hires pass).
        `init_latents` replaces the init images of an img2img call (diffusers treats 4-channel input as latents)."""
        req = items[0].request
        pipe = call_view(self.pipeline_for(loaded, req.task), scheduler, req.steps, loaded.execution_device)
        prompts, negatives = batch_prompts(items)
        prompts = [extract_loras(p)[0] for p in prompts]
        negatives = [extract_loras(n)[0] for n in negatives]
        seeds = batch_seeds(items)
        kwargs: dict[str, Any] = dict(
            guidance_scale=req.guidance,
            **loop_kwargs(req, seeds, on_step, output_type),
        )
        if req.task == Task.TXT2IMG:
            kwargs.update(width=req.width, height=req.height)
        elif req.task == Task.IMG2IMG:
            # img2img takes its size from the (already resized) init images.
            image = init_latents if init_latents is not None else batch_init_images(items)
            kwargs.update(image=image, strength=req.strength)
        elif req.task == Task.INPAINT:
            kwargs.update(
                image=batch_init_images(items),
                mask_image=mask_arg(req),
                strength=req.strength,
                width=req.width,
                height=req.height,
            )
        with lora_scope(loaded, items):  # the text encoders may carry LoRA weights too: encode inside
            # SDXL: all-empty negatives become zeros (force_zeros_for_empty_prompt); the batcher never mixes empty
            # and non-empty negative prompts in one call.
            encode = encode_sdxl if loaded.spec.family == "sdxl" else encode_sd15
            cache = CacheScope(loaded.text_cache, request_loras(req))  # LoRAs change what the encoders give
            kwargs.update(encode(pipe, prompts, negatives, cache=cache))
            images = pipe(**kwargs).images
        return images if output_type == "latent" else to_pil(images)

    @staticmethod
    def _decode(loaded: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
        vae = loaded.base.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return to_pil(loaded.base.image_processor.postprocess(image, output_type="pt"))

    def run_hires(
        self,
        loaded: LoadedModel,
        req: GenerationRequest,
        seeds: list[int],
        make_scheduler: Callable[[], Any],
        on_step: StepCallback,
    ) -> list[Image.Image]:
        """The Latent modes as A1111: interpolate the first pass's latents, crop to the target, denoise again."""
        assert req.hires is not None
        if not req.hires.is_latent:
            return super().run_hires(loaded, req, seeds, make_scheduler, on_step)
        plan, second, progress = start_hires(req, self.size_multiple, on_step)
        first = dataclasses.replace(req, hires=None)
        latents = self._call(loaded, [BatchItem(first, seeds)], make_scheduler(), progress.first, "latent")
        if progress.stopped:  # an interrupted A1111 job returns the first pass as it is
            return self._decode(loaded, latents)
        mode, antialias = LATENT_UPSCALE_MODES[req.hires.upscaler]
        f = self.size_multiple
        size = (plan.upscale_to[1] // f, plan.upscale_to[0] // f)
        latents = torch.nn.functional.interpolate(
            latents, size=size, mode=mode, antialias=antialias and mode in ("bilinear", "bicubic")
        )
        left, top, right, bottom = (v // f for v in crop_box(plan.upscale_to, plan.final))
        latents = latents[:, :, top:bottom, left:right]
        images = self._call(
            loaded,
            [BatchItem(second, seeds)],
            make_scheduler(),
            progress.second,
            init_latents=latents,
        )
        return list(images)
