"""What every family adapter provides. One file per family implements it (sd.py, flux.py, qwen.py)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.control_units import first_pass_units, second_pass_units
from pipelines.hires import HiresPlan, crop_box, plan_hires
from pipelines.registry import ModelSpec
from pipelines.request import MIN_DENOISING_STRENGTH, GenerationRequest, Task
from pipelines.text_cache import TextEmbeddingCache

if TYPE_CHECKING:
    from pipelines.embeddings import TextualInversions
    from pipelines.lora import LoraManager
    from pipelines.previews import PreviewMaker

# Called after every denoising step with (step_index_done, total_steps). Returning True asks the pipeline to stop
# (interrupt/skip/cancel): the adapter sets `pipe._interrupt = True`, diffusers skips the remaining steps and the
# partially denoised latents are still decoded (A1111's interrupt behaviour).
StepCallback = Callable[[int, int], bool]


class StepReporter:
    """The engine's step callback with live previews: `previews` makes them (pipelines.previews.PreviewMaker) at the
    steps `wants_preview(step, total)` says. Any plain StepCallback works where no previews are wanted."""

    def __init__(self, on_step: StepCallback, previews: PreviewMaker | None, wants_preview: Callable[[int, int], bool]):
        self._on_step = on_step
        self.previews = previews
        self.wants_preview = wants_preview

    def __call__(self, step: int, total: int) -> bool:
        return self._on_step(step, total)


@dataclass
class BatchItem:
    """One request's share of a pipeline call: its (prepared) request, the seeds of its images and their variation
    subseeds (A1111: subseed + i for image i; None: derived from the request's resolved seed and subseed)."""

    request: GenerationRequest
    seeds: list[int]
    subseeds: list[int] | None = None

    def image_subseeds(self) -> list[int]:
        if self.subseeds is not None:
            return self.subseeds
        req = self.request
        return [max(req.subseed, 0) + s - max(req.seed, 0) for s in self.seeds]


class UnsupportedTask(ValueError):
    """The model's family cannot run this task (e.g. instruction edit on SD)."""


@dataclass
class LoadedModel:
    """A base pipeline in memory plus the task pipelines derived from it with `from_pipe` (weights shared)."""

    spec: ModelSpec
    base: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    derived: dict[Task, DiffusionPipeline] = field(default_factory=dict)
    optimizations: list[str] = field(default_factory=list)  # CUDA fast-path steps applied at load time
    loras: LoraManager | None = None  # LoRA adapters of `base` (and `derived`); None: no Lora directory configured
    text_cache: TextEmbeddingCache = field(default_factory=TextEmbeddingCache)  # encoder outputs of recent prompts
    embeddings: TextualInversions | None = None  # textual-inversion embeddings folder (SD1.5/SDXL prompts)
    # ControlNet weights used with this model (by source), and the ControlNet pipelines derived from `base`
    # (pipelines.controlnet); dropped with the model, and counted in its memory.
    controlnets: dict[str, torch.nn.Module] = field(default_factory=dict)
    control_derived: dict[Task, DiffusionPipeline] = field(default_factory=dict)
    ip_adapters: dict[str, Any] = field(default_factory=dict)  # IP-Adapter weights by source (pipelines.ip_adapter)

    @property
    def execution_device(self) -> torch.device | None:
        """Where the pipeline computes, when that is fixed (None with CPU-offload hooks, which move modules)."""
        offload = self.spec.performance.offload
        if offload == "auto":  # what pipelines.placement chose at load
            offload = getattr(self.base, "_easel_offload", "resident")
        return self.device if offload in ("none", "resident") else None

    def approx_bytes(self) -> int:
        return sum(self.device_bytes().values())

    def device_resident_bytes(self) -> int:
        """Bytes this model keeps on its device: all of them when resident, else those there right now (offload
        hooks move the rest in and out)."""
        if self.execution_device is not None:
            return self.approx_bytes()
        return sum(n for d, n in self.device_bytes().items() if d != "cpu")

    def device_bytes(self) -> dict[str, int]:
        """Bytes of weights this model holds on each device ("cuda:0", "cpu", ...), where they are right now."""
        out: dict[str, int] = {}
        for comp in [*self.base.components.values(), *self.controlnets.values()]:
            if isinstance(comp, torch.nn.Module):
                for t in (*comp.parameters(), *comp.buffers()):
                    key = str(t.device)
                    out[key] = out.get(key, 0) + t.numel() * t.element_size()
        return out


class FamilyAdapter(abc.ABC):
    """Loads and runs one model family. Stateless: all state lives in `LoadedModel`."""

    families: tuple[str, ...] = ()
    size_multiple: int = 8
    tasks: frozenset[Task] = frozenset({Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT})
    flow_matching: bool = False  # FLUX/Qwen use flow-matching schedulers; SD uses discrete-time ones

    @abc.abstractmethod
    def load(
        self,
        spec: ModelSpec,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        components: dict[str, torch.nn.Module] | None = None,
    ) -> LoadedModel:
        """Load the base (txt2img) pipeline from a local diffusers folder with `from_pretrained`. `components`:
        modules loaded from their own files (pipelines.quantized), used instead of the source's."""

    @abc.abstractmethod
    def pipeline_for(self, loaded: LoadedModel, task: Task) -> DiffusionPipeline:
        """The pipeline for `task`, derived from the base with `from_pipe` once and cached in `loaded.derived`."""

    @abc.abstractmethod
    def run_batch(
        self,
        loaded: LoadedModel,
        items: list[BatchItem],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[list[Image.Image]]:
        """ONE pipeline call making the images of every item; returns each item's images, in order.

        Items share everything but prompts, negative prompts, seeds and init images (the engine batches only
        compatible requests, see `pipelines.batching`); shared parameters are read from `items[0].request`.
        Image j of an item comes from its own generator seeded `item.seeds[j]`, so it matches a call with that
        seed alone. `scheduler` is a fresh scheduler for this call only (never assigned to the shared pipelines).
        Input images are already prepared (resized to width x height, mask binarised/blurred).
        """

    def run(
        self,
        loaded: LoadedModel,
        req: GenerationRequest,
        seeds: list[int],
        scheduler: Any,
        on_step: StepCallback,
    ) -> list[Image.Image]:
        """One request alone: `len(seeds)` images, image i from its own generator seeded `seeds[i]`."""
        return self.run_batch(loaded, [BatchItem(req, seeds)], scheduler, on_step)[0]

    def run_hires(
        self,
        loaded: LoadedModel,
        req: GenerationRequest,
        seeds: list[int],
        make_scheduler: Callable[[], Any],
        on_step: StepCallback,
    ) -> list[Image.Image]:
        """A1111 hires fix: txt2img at the first-pass size, upscale, then img2img at the target size with the hires
        denoising strength. This generic path upscales pixels (Lanczos/Nearest); adapters that can keep latents
        (SD/SDXL) override it for the Latent modes. An interrupt during the first pass skips the second, as A1111."""
        assert req.hires is not None
        plan, second, progress = start_hires(req, self.size_multiple, on_step)
        first = self.run(loaded, first_pass(req), seeds, make_scheduler(), progress.first)
        if progress.stopped:
            return first
        resample = Image.Resampling.NEAREST if req.hires.upscaler == "Nearest" else Image.Resampling.LANCZOS
        box = crop_box(plan.upscale_to, plan.final)
        second = dataclasses.replace(
            second, init_images=[im.resize(plan.upscale_to, resample).crop(box) for im in first]
        )
        return self.run(loaded, second, seeds, make_scheduler(), progress.second)

    def run_refined(
        self,
        loaded: LoadedModel,
        refiner: LoadedModel,
        item: BatchItem,
        scheduler: Any,
        refiner_scheduler: Any,
        on_step: StepCallback,
    ) -> list[Image.Image]:
        """A1111's refiner: the base model up to `refiner_switch_at`, then the refiner model (SDXL only)."""
        raise UnsupportedTask(f"model family {'/'.join(self.families)} has no refiner support")

    def check_task(self, task: Task) -> None:
        if task not in self.tasks:
            raise UnsupportedTask(f"model family {'/'.join(self.families)} does not support task '{task.value}'")


class HiresProgress:
    """One progress across both hires passes; the second pass's real step count is known once it runs."""

    def __init__(self, on_step: StepCallback, first_steps: int, second_estimate: int):
        self.on_step = on_step
        self.first_total = first_steps
        self.second_estimate = second_estimate
        self.stopped = False  # an interrupt during the first pass skips the second

    def first(self, step: int, total: int) -> bool:
        self.first_total = total
        self.stopped = self.on_step(step, total + self.second_estimate)
        return self.stopped

    def second(self, step: int, total: int) -> bool:
        return self.on_step(self.first_total + step, self.first_total + total)


def start_hires(
    req: GenerationRequest, multiple: int, on_step: StepCallback
) -> tuple[HiresPlan, GenerationRequest, HiresProgress]:
    """The sizes, the second pass as an img2img request (no init images yet) and the shared progress."""
    assert req.hires is not None
    plan = plan_hires(req.width, req.height, req.hires, multiple)
    steps = req.hires.second_pass_steps or req.steps
    second = dataclasses.replace(
        req,
        task=Task.IMG2IMG,
        width=plan.final[0],
        height=plan.final[1],
        steps=steps,
        strength=max(req.hires.denoising_strength, MIN_DENOISING_STRENGTH),  # 0 leaves no step to run
        hires=None,
        prompt_schedule_base_steps=req.steps,
        control_units=second_pass_units(req.control_units, *plan.final),
    )
    estimate = max(1, int(steps * req.hires.denoising_strength))
    return plan, second, HiresProgress(on_step, req.steps, estimate)


def first_pass(req: GenerationRequest) -> GenerationRequest:
    """A hires job's first pass: the request without hires, with the ControlNet units that control it."""
    return dataclasses.replace(req, hires=None, control_units=first_pass_units(req.control_units))


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: image i is reproducible whatever its batch position or device."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
