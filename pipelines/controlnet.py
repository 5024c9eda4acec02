"""ControlNet: diffusers' ControlNet pipelines (SD1.5, SDXL, FLUX.1, Qwen-Image), with the sd-webui-controlnet
extension's arithmetic.

The ControlNet pipelines are derived from the base pipeline with `from_pipe` (denoiser, VAE, text encoders shared)
and cached on the `LoadedModel`, as are the ControlNet weights (counted in its memory, so in the cache's budget).
Each call gets its own multi-ControlNet of per-unit wrappers. On SD1.5/SDXL (`UnitControlNet`) they apply what the
extension does in its UNet hook (scripts/hook.py) rather than diffusers' own variants of it:
- weight: every residual times `weight`;
- control mode "My prompt is more important": soft injection, residual i of 13 times 0.825**(12-i);
- "ControlNet is more important": soft injection, and the control reaches only the conditional half of the CFG
  batch (the extension's cfg_injection; diffusers' guess_mode is the same idea for all units at once);
- guidance_start / guidance_end: off at steps where step/total is outside the window (A1111's rule, which differs
  from diffusers' control_guidance_start/end at the window's edges).
FLUX and Qwen-Image (`UnitTransformerControlNet`) get the weight and the window (the extension defines nothing more
for them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
    MultiControlNetModel,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageMultiControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from safetensors import safe_open

from pipelines.cache import load_lock
from pipelines.control_units import (
    ControlMode,
    ControlUnit,
    controlnet_units,
    guidance_stopped,
    soft_injection_scales,
)
from pipelines.controlnet_file_check import LABELS, ControlNetFileError, describe_mismatch
from pipelines.errors import InvalidRequest, ModelLoadError
from pipelines.families import dtype_kwargs
from pipelines.families.base import BatchItem, LoadedModel
from pipelines.quantized import keep_storage_dtype
from pipelines.request import GenerationRequest, Task

log = logging.getLogger("easel.controlnet")

FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")
CFG_FAMILIES = ("sd15", "sdxl")  # where the control modes mean something: classic CFG with an unconditional half
_CLASSES: dict[str, dict[Task, type[DiffusionPipeline]]] = {
    "sd15": {
        Task.TXT2IMG: StableDiffusionControlNetPipeline,
        Task.IMG2IMG: StableDiffusionControlNetImg2ImgPipeline,
        Task.INPAINT: StableDiffusionControlNetInpaintPipeline,
    },
    "sdxl": {
        Task.TXT2IMG: StableDiffusionXLControlNetPipeline,
        Task.IMG2IMG: StableDiffusionXLControlNetImg2ImgPipeline,
        Task.INPAINT: StableDiffusionXLControlNetInpaintPipeline,
    },
    "flux": {
        Task.TXT2IMG: FluxControlNetPipeline,
        Task.IMG2IMG: FluxControlNetImg2ImgPipeline,
        Task.INPAINT: FluxControlNetInpaintPipeline,
    },
    # diffusers' Qwen-Image ControlNet inpainting pipeline is for inpainting ControlNets (the control image is the
    # picture), not a ControlNet over an inpainting call: txt2img only.
    "qwen-image": {Task.TXT2IMG: QwenImageControlNetPipeline},
}
TASKS = {family: frozenset(tasks) for family, tasks in _CLASSES.items()}
# Units one call may carry: diffusers' Qwen-Image multi-ControlNet runs a single (union) ControlNet.
MAX_UNITS = {"qwen-image": 1}
_MULTI = {
    "sd15": MultiControlNetModel,
    "sdxl": MultiControlNetModel,
    "flux": FluxMultiControlNetModel,
    "qwen-image": QwenImageMultiControlNetModel,
}
_TRANSFORMER_CONTROLNETS: dict[str, tuple[str, type[torch.nn.Module]]] = {
    "FluxControlNetModel": ("flux", FluxControlNetModel),
    "QwenImageControlNetModel": ("qwen-image", QwenImageControlNetModel),
}
AnyControlNet = ControlNetModel | FluxControlNetModel | QwenImageControlNetModel
# The config folder (under configs_dir) a single-file ControlNet of each family reads (`easel prefetch-configs`
# fetches them: pipelines.prefetch.CONTROLNET_CONFIG_REPOS).
SINGLE_FILE_CONFIGS = {"sd15": "controlnet-sd15", "sdxl": "controlnet-sdxl"}


def unit_field(index: int, name: str) -> str:
    """The A1111 field a unit's problem is reported under."""
    return f"alwayson_scripts.controlnet.args.{index}.{name}"


# Loading ------------------------------------------------------------------------------------------------------------


def single_file_family(path: Path) -> str:
    """FLUX, SDXL or SD1.5, from a single file's tensor names (SDXL ControlNets carry the added time/text
    embedding; FLUX ones single transformer blocks)."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    flux_markers = ("single_transformer_blocks", "controlnet_single_blocks", "double_blocks", "controlnet_x_embedder")
    if any(k.startswith(flux_markers) for k in keys):
        return "flux"
    return "sdxl" if any("label_emb" in k or "add_embedding" in k for k in keys) else "sd15"


def controlnet_family(model: torch.nn.Module) -> str:
    for family, cls in _TRANSFORMER_CONTROLNETS.values():
        if isinstance(model, cls):
            return family
    return "sdxl" if model.config.get("addition_embed_type") == "text_time" else "sd15"


def _folder_class(path: Path) -> type[Any]:
    """The ControlNet class a diffusers folder's config names (FLUX's, Qwen-Image's or the UNet one)."""
    try:
        name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    return _TRANSFORMER_CONTROLNETS[name][1] if name in _TRANSFORMER_CONTROLNETS else ControlNetModel


def load_controlnet(
    source: str, family: str, dtype: torch.dtype, demo_root: Path, configs_dir: Path | None
) -> AnyControlNet:
    """A ControlNet from a diffusers folder, a single `.safetensors` file (local config) or the demo."""
    if source.startswith("demo:"):
        from pipelines import demo  # here: demo imports the family adapters, which import this module

        path = demo.ensure_demo_controlnet(source.removeprefix("demo:"), demo_root)
        return _folder_class(path).from_pretrained(path, **dtype_kwargs(dtype))
    path = Path(source)
    if path.is_dir():
        return _folder_class(path).from_pretrained(path, **dtype_kwargs(dtype))
    file_family = single_file_family(path)
    if file_family == "flux":
        raise InvalidRequest(
            "alwayson_scripts.controlnet", f"{path.name} is a transformer (FLUX / Qwen-Image) ControlNet: use its "
            "diffusers folder (single files are read for SD1.5 and SDXL ControlNets)"
        )  # fmt: skip
    config = configs_dir / SINGLE_FILE_CONFIGS[file_family] if configs_dir is not None else None
    if config is None or not (config / "config.json").is_file():
        raise InvalidRequest(
            "alwayson_scripts.controlnet",
            f"ControlNet {path.name} needs the local config folder {SINGLE_FILE_CONFIGS[file_family]} under "
            "configs_dir (run `easel prefetch-configs` where there is internet)",
        )
    try:
        return ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True,
                                                **dtype_kwargs(dtype))  # fmt: skip
    except Exception as e:
        try:
            reason = describe_mismatch(path, config, LABELS[file_family])
        except Exception:  # the diagnosis failed too (an unreadable file): the load's own error says more
            reason = None
        if reason is None:
            raise
        raise ControlNetFileError(reason) from e


def ensure_loaded(
    loaded: LoadedModel, units: list[ControlUnit], demo_root: Path, configs_dir: Path | None
) -> list[torch.nn.Module]:
    """The ControlNet of each unit, loaded onto the model's device once and kept with it."""
    family = loaded.spec.family
    models = []
    for index, unit in enumerate(units):
        if unit.is_ip_adapter:  # pipelines.ip_adapter loads those
            continue
        model = loaded.controlnets.get(unit.source)
        if model is None:
            try:
                with load_lock():
                    model = load_controlnet(unit.source, family, loaded.dtype, demo_root, configs_dir)
            except InvalidRequest:
                raise
            except Exception as e:  # a broken file: say which, as a failed model load, never a traceback
                log.exception("loading ControlNet %s failed", unit.model)
                detail = str(e) if isinstance(e, ControlNetFileError) else f"{type(e).__name__}: {e}"
                raise ModelLoadError(f"ControlNet '{unit.model}' failed to load: {detail}") from e
            if controlnet_family(model) != family:  # refused before it takes any device memory
                raise InvalidRequest(
                    unit_field(index, "model"),
                    f"ControlNet '{unit.model}' is for {controlnet_family(model)} models, not for '{loaded.spec.id}' "
                    f"({family})",
                )
            # The model's device (with CPU offload of the base, the accelerator: the ControlNet stays there).
            model.to(loaded.device)
            model.eval()
            log.info("loaded ControlNet %s for %s", unit.model, loaded.spec.id)
            loaded.controlnets[unit.source] = model
        models.append(model)
    return models


# The extension's arithmetic ---------------------------------------------------------------------------------------


class UnitControlNet(torch.nn.Module):
    """One unit of one pipeline call: runs its ControlNet and shapes the residuals as the extension does.

    `n_images`: the images of the call (the CFG batch is [unconditional..., conditional...] when it is twice that);
    `total_steps`: the number of steps the pipeline really runs, read when the first step comes."""

    def __init__(self, model: ControlNetModel, unit: ControlUnit, n_images: int, total_steps: Callable[[], int]):
        super().__init__()
        self.inner = model
        self.unit = unit
        self.n_images = n_images
        self.total_steps = total_steps
        self.step = 0
        self.zeros: Any = None  # the residuals of an off step, once their shapes are known

    @property
    def config(self) -> Any:
        return self.inner.config

    def forward(self, *args: Any, conditioning_scale: float = 1.0, **kwargs: Any) -> Any:
        step, self.step = self.step, self.step + 1
        unit = self.unit
        if guidance_stopped(step, self.total_steps(), unit.guidance_start, unit.guidance_end):
            factor = 0.0
        else:
            factor = unit.weight * conditioning_scale
        if factor == 0.0 and self.zeros is not None:
            return self.zeros  # an off step costs no ControlNet pass (the batch does not change within a call)
        kwargs["return_dict"] = False
        down, mid = self.inner(*args, conditioning_scale=1.0, **kwargs)
        if factor == 0.0:
            self.zeros = ([torch.zeros_like(d) for d in down], torch.zeros_like(mid))
            return self.zeros
        residuals = [*down, mid]
        if unit.control_mode == ControlMode.BALANCED:
            scales = [factor] * len(residuals)
        else:
            scales = [factor * s for s in soft_injection_scales(len(residuals))]
        out = [r * s for r, s in zip(residuals, scales, strict=True)]
        if unit.control_mode == ControlMode.CONTROL and out[0].shape[0] == 2 * self.n_images:
            # cfg_injection: the unconditional half gets no control, so CFG pushes towards it.
            mark = torch.cat([torch.zeros(self.n_images), torch.ones(self.n_images)]).to(out[0].device, out[0].dtype)
            out = [r * mark.view(-1, 1, 1, 1) for r in out]
        return out[:-1], out[-1]


class UnitTransformerControlNet(torch.nn.Module):
    """One unit of one FLUX / Qwen-Image call: its ControlNet's block samples times `weight`, none outside the
    guidance window. (These models have no unconditional half in the ControlNet's batch, and the extension defines
    no soft injection for them: only Balanced runs here.)"""

    def __init__(self, model: torch.nn.Module, unit: ControlUnit, total_steps: Callable[[], int]):
        super().__init__()
        self.inner = model
        self.unit = unit
        self.total_steps = total_steps
        self.step = 0
        self.zeros: Any = None  # the block samples of an off step, once their shapes are known

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def input_hint_block(self) -> Any:
        return getattr(self.inner, "input_hint_block", None)

    def forward(self, *args: Any, conditioning_scale: float = 1.0, **kwargs: Any) -> Any:
        step, self.step = self.step, self.step + 1
        unit = self.unit
        stopped = guidance_stopped(step, self.total_steps(), unit.guidance_start, unit.guidance_end)
        factor = 0.0 if stopped else unit.weight * conditioning_scale
        if factor == 0.0 and self.zeros is not None:
            return self.zeros  # an off step costs no ControlNet pass
        kwargs["return_dict"] = False
        out = _scaled(self.inner(*args, conditioning_scale=1.0, **kwargs), factor)
        if factor == 0.0:
            self.zeros = out
        return out


def _scaled(samples: Any, factor: float) -> Any:
    """Block samples (tensors in lists / tuples, or None) times `factor`, the structure kept."""
    if samples is None:
        return None
    if isinstance(samples, torch.Tensor):
        return samples * factor
    return type(samples)(_scaled(s, factor) for s in samples)


# Pipelines ------------------------------------------------------------------------------------------------------------


def control_pipeline(loaded: LoadedModel, task: Task) -> DiffusionPipeline:
    """The family's ControlNet pipeline for `task`, derived from the base once (`from_pipe`: weights shared). Its
    `controlnet` is an empty placeholder: each call's view gets that call's units."""
    pipe = loaded.control_derived.get(task)
    if pipe is None:
        cls = _CLASSES[loaded.spec.family][task]
        # One parameter of the model's dtype: diffusers reads the placeholder's dtype while deriving.
        placeholder = _MULTI[loaded.spec.family]([torch.nn.Linear(1, 1, dtype=loaded.dtype)])
        with keep_storage_dtype(loaded.base):  # FP8-stored and GGUF denoisers: from_pipe would cast them
            pipe = cls.from_pipe(loaded.base, controlnet=placeholder, **dtype_kwargs(loaded.dtype))
        pipe.set_progress_bar_config(disable=True)
        loaded.control_derived[task] = pipe
    return pipe


def control_images(items: list[BatchItem], index: int) -> torch.Tensor:
    """ControlNet unit `index`'s control image for every image of the call (requests of a call may bring different
    ones), as one (N, 3, H, W) batch in [0, 1]: the one form every ControlNet pipeline takes per unit."""
    pixels = [
        np.asarray(controlnet_units(it.request.control_units)[index].image.convert("RGB"))
        for it in items
        for _ in it.seeds
    ]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)


def attach(view: DiffusionPipeline, loaded: LoadedModel, items: list[BatchItem], kwargs: dict[str, Any]) -> None:
    """Give a per-call view of a ControlNet pipeline the call's units, and add their arguments to `kwargs`."""
    req: GenerationRequest = items[0].request
    units = controlnet_units(req.control_units)
    models = [loaded.controlnets[u.source] for u in units]
    n_images = sum(len(it.seeds) for it in items)

    def total_steps() -> int:
        return int(getattr(view, "_num_timesteps", 0) or req.steps)

    images = [control_images(items, i) for i in range(len(models))]
    n = len(models)
    kwargs.update(controlnet_conditioning_scale=[1.0] * n, control_guidance_start=[0.0] * n,
                  control_guidance_end=[1.0] * n)  # fmt: skip
    family = loaded.spec.family
    if family in ("flux", "qwen-image"):
        view.controlnet = _MULTI[family](
            [UnitTransformerControlNet(m, u, total_steps) for m, u in zip(models, units, strict=True)]
        )
        kwargs["control_image"] = images
        if family == "flux":
            kwargs["control_mode"] = [None] * n  # no union ControlNet modes
        if req.task == Task.TXT2IMG and "latents" not in kwargs:
            # The pipelines VAE-encode control images with the images' generators before they draw the noise: the
            # noise is drawn first here, so each image starts from its seed's noise exactly as without ControlNet.
            drawn = view.prepare_latents(
                n_images, view.transformer.config.in_channels // 4, req.height, req.width,
                view.transformer.dtype, view._execution_device, kwargs["generator"],
            )  # fmt: skip
            kwargs["latents"] = drawn[0] if isinstance(drawn, tuple) else drawn  # FLUX adds the latent ids
        return
    view.controlnet = MultiControlNetModel(
        [UnitControlNet(m, u, n_images, total_steps) for m, u in zip(models, units, strict=True)]
    )
    kwargs["guess_mode"] = False
    if req.task == Task.TXT2IMG:
        kwargs["image"] = images
    else:
        kwargs["control_image"] = images
