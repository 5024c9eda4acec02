"""Depth-map preprocessors (depth_midas, depth_anything, depth_anything_v2, depth_zoe) through transformers' depth
estimation models, loaded from a local folder only (config.json, preprocessor_config.json, *.safetensors: what
`save_pretrained` writes, e.g. Intel/dpt-hybrid-midas, LiheYoung/depth-anything-large-hf,
depth-anything/Depth-Anything-V2-Large-hf, Intel/zoedepth-nyu-kitti). torch and transformers are imported on first
use, so the HTTP side can import the preprocessor table without them.

The map follows the extension's annotators: the input resized with padding to the processor resolution, the
prediction brought back to that size, normalised to 0-255 with near = bright (min-max for relative depth; ZoeDepth's
metric depth is clipped to its 2nd-85th percentiles and inverted, as the extension's zoe annotator does).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.controlnet_image_ops import Array, hwc3, resize_image_with_pad

REQUIRED_FILES = ("config.json", "preprocessor_config.json")

_lock = threading.Lock()
_loaded: dict[str, tuple[float, Any, Any]] = {}  # folder -> (config mtime, model, image processor); one at a time


def folder_ready(folder: Path) -> bool:
    """Whether `folder` holds a loadable depth model (configs and safetensors weights; pickled weights are not
    loaded)."""
    return (
        folder.is_dir()
        and all((folder / name).is_file() for name in REQUIRED_FILES)
        and any(folder.glob("*.safetensors"))
    )


def _load(folder: Path) -> tuple[Any, Any]:
    key = str(folder.resolve())
    mtime = (folder / "config.json").stat().st_mtime
    cached = _loaded.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1], cached[2]
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    _loaded.clear()  # one depth model resident: these are helpers, not the server's main models
    try:
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:  # a broken install: the server's fault, said plainly
        raise RuntimeError(f"the depth model in {folder} could not be loaded: {error}") from error
    model.eval()
    _loaded[key] = (mtime, model, processor)
    return model, processor


def unload() -> None:
    """Drop the resident depth model."""
    with _lock:
        _loaded.clear()


def estimate(folder: Path, image: Array, resolution: int, metric: bool) -> Array:
    """The H x W x 3 depth map of `image` at the processor resolution (short side = `resolution`)."""
    import torch

    padded, remove_pad = resize_image_with_pad(image, resolution)
    h, w = padded.shape[:2]
    with _lock:  # one inference at a time on the shared model (and no load racing another)
        model, processor = _load(folder)
        inputs = processor(images=padded, return_tensors="pt")
        with torch.inference_mode():
            predicted = model(**inputs).predicted_depth
    depth = torch.nn.functional.interpolate(
        predicted.float().reshape(1, 1, *predicted.shape[-2:]), size=(h, w), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    return hwc3(remove_pad(_normalise(depth, metric)))


def _normalise(depth: Array, metric: bool) -> Array:
    depth = depth.astype(np.float64)
    if metric:
        low, high = np.percentile(depth, 2), np.percentile(depth, 85)
        depth = 1.0 - (depth - low) / max(high - low, 1e-8)
    else:
        depth = (depth - depth.min()) / max(depth.max() - depth.min(), 1e-8)
    return (depth * 255.0).clip(0, 255).astype(np.uint8)
