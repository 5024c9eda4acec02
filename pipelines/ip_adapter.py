"""IP-Adapter units (image prompts) on SD1.5 / SDXL, through diffusers' IP-Adapter layers.

An IP-Adapter is a `.safetensors` file in the ControlNet folder (as the A1111 extension keeps them) with its CLIP
image encoder in a local transformers folder (`<models>/clip_vision/clip_h` or `clip_g`, chosen by the unit's
module, as the extension's `ip-adapter_clip_*` preprocessors choose theirs); the demo models bring a tiny one each.
The adapter is put into the shared UNet for one pipeline call and taken out after it, the UNet's own attention
processors restored exactly (the CUDA fast path may have fused them), so other requests never see it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from pipelines.cache import load_lock
from pipelines.control_units import ControlUnit
from pipelines.errors import InvalidRequest, ModelLoadError
from pipelines.families import dtype_kwargs
from pipelines.families.base import LoadedModel
from pipelines.quantized import keep_storage_dtype

log = logging.getLogger("easel.ip_adapter")

FAMILIES = ("sd15", "sdxl")
ADAPTER_FILE = "ip-adapter.safetensors"  # in a demo IP-Adapter folder, next to its `image_encoder/`


@dataclass
class IPAdapterWeights:
    """An adapter's state dict ({"image_proj": ..., "ip_adapter": ...}, on the model's device) and its encoder."""

    state_dict: dict[str, dict[str, torch.Tensor]]
    encoder: CLIPVisionModelWithProjection


def split_state_dict(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A single-file IP-Adapter's "image_proj.*" / "ip_adapter.*" tensors as diffusers groups them."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in out:
            out[group][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise ValueError("not an IP-Adapter file (no image_proj.* and ip_adapter.* tensors)")
    return out


def _paths(source: str, encoder: str, demo_root: Path) -> tuple[Path, Path]:
    if source.startswith("demo-ip:"):
        from pipelines import demo  # here: demo imports the family adapters

        folder = demo.ensure_demo_ip_adapter(source.removeprefix("demo-ip:"), demo_root)
        return folder / ADAPTER_FILE, folder / "image_encoder"
    return Path(source), Path(encoder)


def ensure_loaded(loaded: LoadedModel, units: list[ControlUnit], demo_root: Path) -> None:
    """Each IP-Adapter unit's weights and encoder, loaded once and kept with the model (counted in its memory)."""
    for unit in units:
        key = f"ip:{unit.source}"
        if key in loaded.ip_adapters:
            continue
        adapter_path, encoder_path = _paths(unit.source, unit.image_encoder or "", demo_root)
        try:
            with load_lock():
                flat = load_file(str(adapter_path), device=str(loaded.device))
                encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_path, **dtype_kwargs(loaded.dtype))
        except Exception as e:
            log.exception("loading IP-Adapter %s failed", unit.model)
            raise ModelLoadError(f"IP-Adapter '{unit.model}' failed to load: {type(e).__name__}: {e}") from e
        try:
            state_dict = split_state_dict({k: v.to(loaded.dtype) for k, v in flat.items()})
        except ValueError as e:
            raise InvalidRequest("alwayson_scripts.controlnet", f"'{unit.model}': {e}") from None
        encoder.to(loaded.device).eval()
        loaded.ip_adapters[key] = IPAdapterWeights(state_dict, encoder)
        loaded.controlnets[f"{key}:encoder"] = encoder  # its weights count in the model's memory


@contextlib.contextmanager
def scope(
    view: DiffusionPipeline, loaded: LoadedModel, units: list[ControlUnit], kwargs: dict[str, Any]
) -> Iterator[None]:
    """The call's IP-Adapters in the UNet (scale = unit weight) and their images in `kwargs`; out again after."""
    if not units:
        yield
        return
    weights = [loaded.ip_adapters[f"ip:{u.source}"] for u in units]
    encoder = weights[0].encoder
    if any(w.encoder.config.projection_dim != encoder.config.projection_dim for w in weights):
        raise InvalidRequest("alwayson_scripts.controlnet", "IP-Adapter units of one request must share an encoder")
    unet = view.unet
    saved = dict(unet.attn_processors)
    view.image_encoder = encoder
    size = encoder.config.image_size
    view.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
    try:
        # Not under accelerate's init_empty_weights (low_cpu_mem_usage), which patches torch for every thread while
        # it runs (pipelines.cache._LOAD_LOCK): the adapter layers are small, built and filled directly.
        # diffusers ends this with the whole UNet cast to its own dtype, which a GGUF-quantized UNet refuses (and an
        # FP8-stored one must not get): the UNet is pinned and only the new layers are placed.
        with keep_storage_dtype(view):
            unet._load_ip_adapter_weights([w.state_dict for w in weights], low_cpu_mem_usage=False)
        _place_adapter_layers(unet, loaded.dtype)
        view.set_ip_adapter_scale([u.weight for u in units])
        kwargs["ip_adapter_image"] = [u.image for u in units]
        yield
    finally:
        unet.set_attn_processor(saved)
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None


def _place_adapter_layers(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """The image projection and the IP attention processors just added, on the UNet's device in the model's dtype."""
    unet.encoder_hid_proj.to(device=unet.device, dtype=dtype)
    for processor in unet.attn_processors.values():
        if isinstance(processor, torch.nn.Module):
            processor.to(device=unet.device, dtype=dtype)
