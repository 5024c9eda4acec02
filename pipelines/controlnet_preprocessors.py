"""ControlNet preprocessors (the sd-webui-controlnet extension's "modules").

Interface shared by the ControlNet pipeline code and the /controlnet/detect and /controlnet/module_list routes.
Weight-free preprocessors are pure image operations; model-backed ones (depth, normal, lineart, pose) load their
model from the local models directory only and are refused by name when it is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


class PreprocessorError(ValueError):
    """A preprocessor that does not exist or cannot run here; the message names it (answered as a 4xx)."""

    def __init__(self, module: str, reason: str) -> None:
        super().__init__(f"ControlNet preprocessor {module!r}: {reason}")
        self.module = module


@dataclass(frozen=True)
class PreprocessorParams:
    """The unit fields a preprocessor reads, with the extension's meaning (-1 / None: the module's default)."""

    resolution: int = 512
    threshold_a: float | None = None
    threshold_b: float | None = None


def canonical_module(module: str) -> str:
    """The module's canonical name, resolving the extension's alias names; raises PreprocessorError if unknown."""
    name = (module or "none").strip().lower()
    if name == "none":
        return name
    raise PreprocessorError(module, "unknown preprocessor")


def available_modules(models_dir: Path | None = None) -> list[str]:
    """Canonical names of the preprocessors that can run here (weight-free ones and those whose model is present)."""
    return ["none"]


def run_preprocessor(
    module: str,
    image: Image.Image,
    params: PreprocessorParams = PreprocessorParams(),
    models_dir: Path | None = None,
) -> Image.Image:
    """The detected map for `image` (RGB, the input's size unless the module defines otherwise)."""
    name = canonical_module(module)
    if name == "none":
        return image.convert("RGB")
    raise PreprocessorError(module, "unknown preprocessor")  # pragma: no cover - filled by the preprocessors work
