"""Background removal: generated images -> RGBA, for `background: transparent`.

The model is models.yaml's `background_removal:` (`pipelines.registry.BackgroundRemovalSpec`): a local transformers
folder with a semantic-segmentation model (per-pixel class logits) and its image processor. Alpha is
1 - P(background) per pixel, resized to the image with bilinear interpolation, so edges stay soft. The model is loaded
on first use (the worker thread) and kept; it is small next to a diffusion pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import ModelLoadError
from pipelines.registry import BackgroundRemovalSpec

log = logging.getLogger("easel.engine")


class BackgroundRemover:
    def __init__(self, spec: BackgroundRemovalSpec, device: torch.device):
        self.spec = spec
        self.device = device if spec.device == "auto" else torch.device(spec.device)
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None  # (image processor, model)

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

                started = time.perf_counter()
                try:
                    processor = AutoImageProcessor.from_pretrained(self.spec.source, local_files_only=True)
                    model = AutoModelForSemanticSegmentation.from_pretrained(
                        self.spec.source, local_files_only=True, use_safetensors=True
                    )
                except (OSError, ValueError) as e:
                    raise ModelLoadError(f"background_removal model {self.spec.source}: {e}") from None
                labels = model.config.num_labels
                if self.spec.background_label >= labels:
                    raise ModelLoadError(
                        f"background_removal: background_label {self.spec.background_label} but the model has "
                        f"{labels} labels"
                    )
                model.to(self.device).eval()
                self._loaded = (processor, model)
                log.info(
                    "loaded the background-removal model %s (%s, %d labels) in %.1f s",
                    self.spec.source,
                    type(model).__name__,
                    labels,
                    time.perf_counter() - started,
                )
            return self._loaded

    def alpha(self, images: list[Image.Image]) -> list[Image.Image]:
        """One L-mode alpha mask per image, the image's size: 255 where the model sees foreground."""
        processor, model = self._load()
        rgb = [im.convert("RGB") for im in images]
        inputs = processor(images=rgb, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, model.dtype)
        with torch.inference_mode():
            logits = model(pixel_values=pixels).logits.float()
            background = logits.softmax(dim=1)[:, self.spec.background_label : self.spec.background_label + 1]
            masks = []
            for i, im in enumerate(rgb):  # images of one job share a size; resizing one by one also allows others
                up = torch.nn.functional.interpolate(
                    background[i : i + 1], size=(im.height, im.width), mode="bilinear", align_corners=False
                )
                alpha = ((1.0 - up[0, 0]).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
                masks.append(Image.fromarray(np.ascontiguousarray(alpha)))
        return masks

    def apply(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images as RGBA, their alpha from the model (colours unchanged)."""
        out = []
        for im, alpha in zip(images, self.alpha(images), strict=True):
            rgba = im.convert("RGB").convert("RGBA")
            rgba.putalpha(alpha)
            out.append(rgba)
        return out
