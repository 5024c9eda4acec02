"""Qwen-Image and Qwen-Image-Edit: MMDiT on Qwen2.5-VL text embeddings, flow matching, true CFG.

`req.guidance` is Qwen's `true_cfg_scale`. Qwen runs CFG only when a negative prompt is given, so with guidance > 1
and an empty negative prompt we pass " ", as the official examples do; guidance <= 1 runs without CFG (one pass).

A1111 prompt syntax is reduced to its text (`prompts.strip_attention`): no per-token weights, BREAK is a space,
`<lora:name:w>` tags are removed and activate LoRAs (`pipelines.lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
)
from PIL import Image
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

from pipelines import controlnet
from pipelines.families import (
    batch_init_images,
    batch_prompts,
    batch_seeds,
    call_view,
    derive,
    dtype_kwargs,
    first_init_image,
    loop_kwargs,
    mask_arg,
    packed_variation_latents,
    split_outputs,
    to_pil,
)
from pipelines.families.base import BatchItem, FamilyAdapter, LoadedModel, StepCallback
from pipelines.lora import lora_scope
from pipelines.optimize import place
from pipelines.prompts import extract_loras, strip_attention
from pipelines.registry import ModelSpec
from pipelines.request import GenerationRequest, Task


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor.

    transformers' Qwen2VLProcessor requires a video processor, and video processors need torchvision. The edit
    pipelines only pass images, so on a machine without torchvision we load the same `processor/` folder through
    this subclass (image processor + tokenizer), and the demo builder uses it to write that folder.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_edit_processor(path: str | Path) -> Qwen2VLProcessor:
    """The `processor/` of an edit checkpoint: the stock class where torchvision allows, else the image-only one."""
    folder = Path(path) / "processor"
    if is_torchvision_available():
        try:
            return Qwen2VLProcessor.from_pretrained(folder)
        except (OSError, ValueError, TypeError, ImportError):  # e.g. no usable video processor config
            pass
    return ImageOnlyQwen2VLProcessor.from_pretrained(folder)


def _plain(prompt: str) -> str:
    """The text Qwen's VL encoder sees: LoRA tags removed, A1111 weights and BREAK stripped."""
    return strip_attention(extract_loras(prompt)[0])


def _negative(negative_prompt: str, guidance: float) -> str | None:
    return _plain(negative_prompt) or (" " if guidance > 1 else None)


def _qwen_kwargs(req: GenerationRequest) -> dict[str, Any]:
    negative = _negative(req.negative_prompt, req.guidance)
    return dict(prompt=_plain(req.prompt), negative_prompt=negative, true_cfg_scale=req.guidance)


class _QwenBase(FamilyAdapter):
    size_multiple = 16  # VAE factor 8 x 2x2 patches
    flow_matching = True
    base_class: type[DiffusionPipeline] = QwenImagePipeline

    def load(
        self,
        spec: ModelSpec,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        components: dict[str, torch.nn.Module] | None = None,
    ) -> LoadedModel:
        kwargs = {**self._load_kwargs(path), **(components or {})}
        pipe = self.base_class.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
        place(pipe, spec, device)  # the device, or CPU offload hooks (models.yaml performance.offload)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)

    def _load_kwargs(self, path: str) -> dict[str, Any]:
        return {}


class QwenImageAdapter(_QwenBase):
    families = ("qwen-image",)
    tasks = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    base_class = QwenImagePipeline
    _derived = {Task.IMG2IMG: QwenImageImg2ImgPipeline, Task.INPAINT: QwenImageInpaintPipeline}

    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        self.check_task(task)
        if task == Task.TXT2IMG:
            return loaded.base
        return derive(loaded, task, self._derived[task])

    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        req = items[0].request
        cached = self.pipeline_for(loaded, req.task)
        if req.control_units:  # the ControlNet pipeline (the engine refuses IP-Adapter units here)
            cached = controlnet.control_pipeline(loaded, req.task)
        pipe = call_view(cached, scheduler, req.steps, loaded.execution_device)
        prompts, negatives = batch_prompts(items)
        negative = [_negative(n, req.guidance) for n in negatives]
        kwargs: dict[str, Any] = dict(
            prompt=[_plain(p) for p in prompts],
            negative_prompt=None if req.guidance <= 1 else negative,
            true_cfg_scale=req.guidance,
            width=req.width,
            height=req.height,
            **loop_kwargs(req, batch_seeds(items), on_step),
        )
        latents = packed_variation_latents(pipe, items, req.width, req.height, video=True)
        if latents is not None:
            kwargs.update(latents=latents)
        if req.task == Task.IMG2IMG:
            kwargs.update(image=batch_init_images(items), strength=req.strength)
        elif req.task == Task.INPAINT:
            kwargs.update(image=batch_init_images(items), mask_image=mask_arg(req), strength=req.strength)
        if req.control_units:
            controlnet.attach(pipe, loaded, items, kwargs)
        with lora_scope(loaded, items):
            return split_outputs(to_pil(pipe(**kwargs).images), items)


class QwenImageEditAdapter(_QwenBase):
    """Instruction editing. The input image conditions every task (through the VL encoder and as reference latents).

    EDIT: the prompt is the instruction, the image is re-generated from noise. INPAINT: the edit-inpaint pipeline,
    only the masked region changes. IMG2IMG: the same edit-inpaint pipeline with an all-white mask, i.e. an edit
    that starts from the noised input at `strength` (A1111's denoising strength). No TXT2IMG: there is no image.
    The edit-inpaint pipeline always denoises at ~1 MP (the input's aspect ratio, whatever width/height say), so
    INPAINT/IMG2IMG cost a 1 MP generation and their results are resized to the requested size.
    """

    families = ("qwen-image-edit",)
    tasks = frozenset({Task.EDIT, Task.IMG2IMG, Task.INPAINT})
    base_class = QwenImageEditPipeline

    def _load_kwargs(self, path: str) -> dict[str, Any]:
        return {"processor": load_edit_processor(path)}

    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        self.check_task(task)
        if task == Task.EDIT:
            return loaded.base
        # IMG2IMG and INPAINT share one derived pipeline (weights and processor shared with the base).
        pipe = derive(loaded, Task.INPAINT, QwenImageEditInpaintPipeline)
        loaded.derived.setdefault(task, pipe)
        return pipe

    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        # The prompt template has one image slot, so requests are never batched together here (batching.py).
        if len(items) != 1:
            raise ValueError("Qwen-Image-Edit runs one request per pipeline call")
        req, seeds = items[0].request, items[0].seeds
        pipe = call_view(self.pipeline_for(loaded, req.task), scheduler, req.steps, loaded.execution_device)
        kwargs = _qwen_kwargs(req)
        kwargs.update(
            image=first_init_image(req),  # the prompt template has one image slot
            width=req.width,
            height=req.height,
            num_images_per_prompt=len(seeds),
            **loop_kwargs(req, seeds, on_step),
        )
        if req.task == Task.INPAINT:
            kwargs.update(mask_image=mask_arg(req), strength=req.strength)
        elif req.task == Task.IMG2IMG:
            kwargs.update(mask_image=Image.new("L", (req.width, req.height), 255), strength=req.strength)
        size = (req.width, req.height)
        with lora_scope(loaded, items):
            images = to_pil(pipe(**kwargs).images)
        # The edit-inpaint pipeline ignores width/height and works at ~1 MP with the input's aspect ratio.
        return [[im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]]
