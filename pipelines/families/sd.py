"""Stable Diffusion 1.5 and SDXL: UNet, discrete-time schedulers, classic CFG with a negative prompt.

Prompts follow A1111's syntax: `(word:1.3)` emphasis, BREAK and prompts past 77 tokens are encoded in 75-token
chunks by `pipelines.prompt_embeds` and passed as embeddings; `<lora:name:w>` tags activate LoRAs (`pipelines.lora`);
`AND` composable prompts are combined in the UNet call (`pipelines.composable`).
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

from pipelines import controlnet, ip_adapter, single_file
from pipelines.composable import ComposedUNet, encode_composed, install, merged, placeholder_kwargs
from pipelines.control_units import controlnet_units, ip_adapter_units
from pipelines.families import (
    batch_init_images,
    batch_prompts,
    batch_seeds,
    call_view,
    derive,
    dtype_kwargs,
    loop_kwargs,
    mask_arg,
    schedule_steps,
    split_outputs,
    step_callback,
    to_pil,
)
from pipelines.families.base import (
    BatchItem,
    FamilyAdapter,
    HiresProgress,
    LoadedModel,
    StepCallback,
    UnsupportedTask,
    first_pass,
    start_hires,
)
from pipelines.hires import LATENT_UPSCALE_MODES, crop_box
from pipelines.lora import lora_scope
from pipelines.optimize import place
from pipelines.prompt_embeds import CacheScope, encode_sd15, encode_sdxl
from pipelines.prompt_schedules import schedules, text_at_step
from pipelines.prompts import extract_loras, is_composable, request_loras, split_and
from pipelines.registry import ModelSpec
from pipelines.request import GenerationRequest, Task
from pipelines.tiling import tiling_scope
from pipelines.variation import batch_noise, wants_variation

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


# The loop's conditioning tensors a step callback may replace, and the `encode_*` keys they come from as
# (negative, positive): with CFG the loop holds them concatenated [negative, positive].
CONDITIONING_INPUTS = {"sd15": ("prompt_embeds",), "sdxl": ("prompt_embeds", "add_text_embeds")}
_LOOP_TENSORS = {
    "prompt_embeds": ("negative_prompt_embeds", "prompt_embeds"),
    "add_text_embeds": ("negative_pooled_prompt_embeds", "pooled_prompt_embeds"),
}


def scheduled_conditioning(
    encode_texts: Callable[[list[str], list[str]], dict[str, torch.Tensor]],
    scheduled: list[list[tuple[int, str]]],
    n: int,
    steps: int,
) -> tuple[list[dict[str, torch.Tensor]], Callable[[DiffusionPipeline, int, dict], None]]:
    """A1111 prompt editing for one call: the encoder arguments of every sampling step (0..steps), and the step
    callback hook that swaps them in. `scheduled` holds each prompt's then each negative prompt's schedule
    (pipelines.prompt_schedules); `n` is the number of images. The distinct step texts are encoded in one go, so
    every step's embeddings have the same number of chunks."""
    step_texts = [tuple(text_at_step(s, k) for s in scheduled) for k in range(steps + 1)]
    configs = list(dict.fromkeys(step_texts))
    encoded = encode_texts([t for c in configs for t in c[:n]], [t for c in configs for t in c[n:]])
    per_config = [{key: value[j * n : (j + 1) * n] for key, value in encoded.items()} for j in range(len(configs))]
    per_step = [per_config[configs.index(t)] for t in step_texts]

    def switch(pipe: DiffusionPipeline, step: int, callback_kwargs: dict) -> None:
        conds = per_step[min(step, len(per_step) - 1)]
        for name, (negative, positive) in _LOOP_TENSORS.items():
            if name not in callback_kwargs or positive not in conds:
                continue
            cfg = pipe.do_classifier_free_guidance
            callback_kwargs[name] = torch.cat([conds[negative], conds[positive]]) if cfg else conds[positive]

    return per_step, switch


def variation_latents(pipe: DiffusionPipeline, items: list[BatchItem], width: int, height: int) -> torch.Tensor | None:
    """The initial noise of a txt2img call with A1111 variation seeds (pipelines.variation), or None when no item
    asks for any (the pipeline then draws each image's noise from its own generator, as before). The batcher keeps
    variation and plain requests apart (pipelines.batching), so a call is all one or the other."""
    req = items[0].request
    if not wants_variation(req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h):
        return None
    f = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // f, width // f)  # what the txt2img pipeline draws
    noise = torch.cat(
        [
            batch_noise(
                shape,
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
    return noise.to(pipe._execution_device, pipe.unet.dtype)


class StableDiffusionAdapter(FamilyAdapter):
    families = ("sd15", "sdxl")
    size_multiple = 8
    tasks = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    flow_matching = False

    def load(
        self,
        spec: ModelSpec,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        components: dict[str, torch.nn.Module] | None = None,
    ) -> LoadedModel:
        components = components or {}
        if spec.is_single_file:  # an A1111/ldm .safetensors file + a local config folder (SD1.5/SD2/SDXL/refiner)
            pipe = single_file.load_pipeline(spec, path, dtype, components)
        else:
            cls = _CLASSES[spec.family][Task.TXT2IMG]
            kwargs: dict[str, Any] = {}
            if spec.family == "sd15":
                # The server never runs the NSFW checker (A1111 doesn't either); don't even load its weights.
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(path, **dtype_kwargs(dtype), **kwargs, **components)
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
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """One pipeline call: PIL images, or the final latents (`output_type="latent"`, for a latent hires pass).
        `init_latents` replaces the init images of an img2img call (diffusers treats 4-channel input as latents)."""
        req = items[0].request
        cached = self.pipeline_for(loaded, req.task)
        if controlnet_units(req.control_units):  # the task's ControlNet pipeline, sharing the base's weights
            cached = controlnet.control_pipeline(loaded, req.task)
        pipe = call_view(cached, scheduler, req.steps, loaded.execution_device)
        prompts, negatives = batch_prompts(items)
        prompts = [extract_loras(p)[0] for p in prompts]
        # A1111 `AND` / a weighted prompt: each image's parts (the batcher keeps such requests apart from plain ones).
        composed = [merged(split_and(p)) for p in prompts] if any(is_composable(p) for p in prompts) else None
        prompts = [split_and(p)[0].text for p in prompts]  # a plain prompt loses a ":1" suffix, as in A1111
        negatives = [extract_loras(n)[0] for n in negatives]
        seeds = batch_seeds(items)
        kwargs: dict[str, Any] = dict(
            guidance_scale=req.guidance,
            **loop_kwargs(req, seeds, on_step, output_type),
            **(extra or {}),
        )
        if req.task == Task.TXT2IMG:
            kwargs.update(width=req.width, height=req.height)
            latents = variation_latents(pipe, items, req.width, req.height)
            if latents is not None:
                kwargs.update(latents=latents)
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
        if controlnet_units(req.control_units):
            controlnet.attach(pipe, loaded, items, kwargs)
        ip_scope = ip_adapter.scope(pipe, loaded, ip_adapter_units(req.control_units), kwargs)
        # The text encoders may carry LoRA weights too: encode inside. Tiling is on for this call only.
        with lora_scope(loaded, items), tiling_scope(pipe, req.tiling), ip_scope:
            # SDXL: all-empty negatives become zeros (force_zeros_for_empty_prompt); the batcher never mixes empty
            # and non-empty negative prompts in one call.
            encode = encode_sdxl if loaded.spec.family == "sdxl" else encode_sd15
            cache = CacheScope(loaded.text_cache, request_loras(req))  # LoRAs change what the encoders give

            layer = {"clip_skip": req.clip_skip} if loaded.spec.family == "sd15" else {}

            def encode_texts(ps: list[str], ns: list[str]) -> dict[str, torch.Tensor]:
                return encode(pipe, ps, ns, cache=cache, embeddings=loaded.embeddings, **layer)

            if composed is not None:  # A1111 `AND`: the UNet of this call combines the parts (pipelines.composable)
                steps = encode_composed(
                    encode_texts, composed, negatives, req.steps, schedule_steps(req), req.prompt_schedule_base_steps
                )
                unet = ComposedUNet(pipe.unet, [[p.weight for p in parts] for parts in composed], steps)
                install(pipe, unet)  # on this call's view only
                kwargs.update(placeholder_kwargs(steps[0]))
                kwargs.update(
                    callback_on_step_end=step_callback(
                        on_step, schedule_steps(req), lambda _pipe, step, _kwargs: unet.set_step(step)
                    )
                )
            elif (scheduled := schedules(prompts + negatives, req.steps, req.prompt_schedule_base_steps)) is None:
                kwargs.update(encode_texts(prompts, negatives))
            else:  # prompt editing / alternation: the conditioning changes between steps
                per_step, switch = scheduled_conditioning(encode_texts, scheduled, len(prompts), schedule_steps(req))
                kwargs.update(per_step[0])
                kwargs.update(
                    callback_on_step_end=step_callback(on_step, schedule_steps(req), switch),
                    callback_on_step_end_tensor_inputs=["latents", *CONDITIONING_INPUTS[loaded.spec.family]],
                )
            images = pipe(**kwargs).images
        return images if output_type == "latent" else to_pil(images)

    def run_refined(
        self,
        loaded: LoadedModel,
        refiner: LoadedModel,
        item: BatchItem,
        scheduler: Any,
        refiner_scheduler: Any,
        on_step: StepCallback,
    ) -> list[Image.Image]:
        """The base denoises up to `refiner_switch_at` of the schedule (`denoising_end`) and hands its latents to the
        refiner, which denoises the rest (`denoising_start`, no new noise): A1111's switch of model mid-sampling."""
        req = item.request
        switch = req.refiner_switch_at
        first_steps = max(1, round(req.steps * switch))
        progress = HiresProgress(on_step, first_steps, max(1, req.steps - first_steps))
        latents = self._call(loaded, [item], scheduler, progress.first, "latent", extra={"denoising_end": switch})
        if progress.stopped:  # interrupted: the base's latents as they are, as A1111 returns an interrupted job
            return self._decode(loaded, latents)
        second = dataclasses.replace(req, task=Task.IMG2IMG, strength=1.0, model=refiner.spec.id, refiner=None)
        images = self._call(
            refiner,
            [BatchItem(second, item.seeds, item.subseeds)],
            refiner_scheduler,
            progress.second,
            init_latents=latents,
            extra={"denoising_start": switch},
        )
        return list(images)

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
        first = first_pass(req)
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
