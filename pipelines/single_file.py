"""Load a single `.safetensors` checkpoint (A1111/ldm or BFL layout) as a diffusers pipeline, fully offline.

diffusers' `from_single_file` converts the original key layout; everything the file does not hold (model configs,
tokenizers, scheduler config, and for FLUX the VAE and text encoders) comes from a *local* diffusers folder given as
`config=`: `easel prefetch-configs` fills one per variant on a machine with internet. `local_files_only=True`
everywhere, so a missing file is an error naming it, never a download.

- SD1.5 / SD2 / SDXL / SDXL refiner: the file holds UNet, VAE and text encoders (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`); `Pipeline.from_single_file`.
- FLUX.1 dev / schnell / Fill / Kontext: BFL files hold the transformer only (`double_blocks.*`, `single_blocks.*`,
  ...). It is converted here (diffusers' converter assumes the full 3072 width) and loaded with
  `FluxTransformer2DModel.from_single_file`; VAE and text encoders come from the config folder's weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection

from pipelines import flux_keys
from pipelines.checkpoints import UNET, VARIANTS, CheckpointError, check_suffix, detect_checkpoint, read_header
from pipelines.families import dtype_kwargs
from pipelines.registry import ModelSpec

log = logging.getLogger(__name__)

# The base pipeline of each variant. Kontext's transformer has FLUX.1-dev's architecture: it makes images from text
# with FluxPipeline, and its image editing pipeline is derived from that base (families.flux).
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-refiner": StableDiffusionXLImg2ImgPipeline,  # the refiner has no text-to-image mode
    "flux-dev": FluxPipeline,
    "flux-schnell": FluxPipeline,
    "flux-kontext": FluxPipeline,
    "flux-fill": FluxFillPipeline,  # inpainting only: its transformer takes the masked image and mask as input
}
_FLUX_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")
_FLUX_ROOTS += ("final_layer.",)
_FLUX_COMPONENTS = ("vae", "text_encoder", "text_encoder_2")


def load_pipeline(
    spec: ModelSpec, path: str | Path, dtype: torch.dtype, components: dict[str, torch.nn.Module] | None = None
) -> DiffusionPipeline:
    """The base pipeline of a single-file model, with `spec.config` as the local config folder. `components`: modules
    from their own files (a model entry's `denoiser:`...), used instead of the checkpoint's.

    Raises CheckpointError naming the file for anything that stops it from loading.
    """
    path = Path(path)
    check_suffix(path)
    variant = spec.variant or detect_checkpoint(path).variant
    if not spec.config:
        raise CheckpointError(f"{path}: no config folder (models.yaml `config:` or configs_dir) for this checkpoint")
    config = Path(spec.config)
    label = VARIANTS[variant].label
    try:
        if VARIANTS[variant].family == "flux":
            pipe = _load_flux(PIPELINES[variant], path, config, dtype, components or {})
        else:
            pipe = _load_sd(PIPELINES[variant], variant, path, config, dtype, components or {})
    except CheckpointError:
        raise
    except (SingleFileComponentError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load as {label} with the configs in {config}: {e}") from e
    _check_complete(pipe, path)
    return pipe


def _load_sd(
    cls: type[DiffusionPipeline],
    variant: str,
    path: Path,
    config: Path,
    dtype: torch.dtype,
    components: dict[str, torch.nn.Module],
) -> DiffusionPipeline:
    kwargs: dict[str, Any] = {"config": str(config), "local_files_only": True, **dtype_kwargs(dtype)}
    if variant in ("sd15", "sd2"):
        # The server never runs the NSFW checker (A1111 doesn't either): neither it nor its image processor is loaded.
        kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    if variant == "sdxl" and "text_encoder_2" not in components and _same_width_text_encoders(path):
        kwargs["text_encoder_2"] = _open_clip_text_encoder_2(path, config, dtype)
    return cls.from_single_file(str(path), **kwargs, **components)


def _same_width_text_encoders(path: Path) -> bool:
    # diffusers tells SDXL's CLIP-L (embedders.0) from OpenCLIP-G (embedders.1) by width when it loads text_encoder_2;
    # with equal widths (never in real SDXL, but in small test models) it would load CLIP-L's weights into it.
    shapes = read_header(path).shapes
    clip_l = shapes.get("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight")
    open_clip = shapes.get("conditioner.embedders.1.model.positional_embedding")
    return bool(clip_l and open_clip and clip_l[-1] == open_clip[-1])


def _open_clip_text_encoder_2(path: Path, config: Path, dtype: torch.dtype) -> torch.nn.Module:
    prefix = "conditioner.embedders.1.model."
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        state,
        subfolder="text_encoder_2",
        config=str(config),
        torch_dtype=dtype,
        local_files_only=True,
    )


def _load_flux(
    cls: type[DiffusionPipeline], path: Path, config: Path, dtype: torch.dtype, components: dict[str, torch.nn.Module]
) -> DiffusionPipeline:
    missing = [c for c in _FLUX_COMPONENTS if c not in components and not any((config / c).glob("*.safetensors"))]
    if missing:
        raise CheckpointError(
            f"{path}: FLUX.1 checkpoint files hold only the transformer; the {', '.join(missing)} weights come from "
            f"the config folder {config}, which has none. Run `easel prefetch-configs DIR --flux-encoders` (FLUX.1-"
            "schnell's Apache-2.0 VAE and text encoders, shared by every FLUX.1 variant) or set the model's "
            "`config:` to a full FLUX.1 diffusers folder"
        )
    components = dict(components)
    if "transformer" not in components:
        components["transformer"] = FluxTransformer2DModel.from_single_file(
            convert_flux_to_diffusers(_read_flux_transformer(path)),
            config=str(config),
            subfolder="transformer",
            local_files_only=True,
            **dtype_kwargs(dtype),
        )
    return cls.from_pretrained(
        str(config), local_files_only=True, use_safetensors=True, **dtype_kwargs(dtype), **components
    )


def _read_flux_transformer(path: Path) -> dict[str, torch.Tensor]:
    """The transformer tensors of a BFL file, without the `model.diffusion_model.` prefix some tools add."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix(UNET)
            if name.startswith(_FLUX_ROOTS):
                state[name] = f.get_tensor(key)
    return state


def convert_flux_to_diffusers(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL FLUX.1 transformer keys -> diffusers `FluxTransformer2DModel` keys, for any width (pipelines.flux_keys)."""
    out, unused = flux_keys.to_diffusers(bfl)
    if unused:
        log.warning("FLUX checkpoint: %d unused tensors (e.g. %s)", len(unused), next(iter(unused)))
    return out


def _check_complete(pipe: DiffusionPipeline, path: Path) -> None:
    """Refuse a pipeline with weights the file did not provide (diffusers leaves them on the meta device)."""
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        missing = [n for n, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
        if missing:
            raise CheckpointError(
                f"{path}: the file has no weights for {len(missing)} tensors of the {name} "
                f"(e.g. {', '.join(missing[:3])}); it does not match the configs in its config folder"
            )
