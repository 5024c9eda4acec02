"""ControlNet preprocessors (the sd-webui-controlnet extension's "modules").

Interface shared by the ControlNet pipeline code and the /controlnet/detect and /controlnet/module_list routes.
Names, alias names (the extension's UI labels, e.g. `depth` / `depth_midas`), slider defaults and ranges, sorting and
output sizes are the extension's (scripts/supported_preprocessor.py, scripts/preprocessor/*, the legacy table in
scripts/preprocessor/legacy/preprocessor_compiled.py). Weight-free preprocessors are the extension's own cv2
operations (pipelines.controlnet_image_ops); depth ones run a transformers depth model from
`<models dir>/ControlNet/annotators/<alias name>/` (pipelines.controlnet_depth). Every other module of the
extension is known by name and refused with the reason (its annotator model is not one this server can load).

This module imports neither torch nor transformers (the depth code does, on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines import controlnet_image_ops as ops


class PreprocessorError(ValueError):
    """A preprocessor that does not exist or cannot run here; the message names it (answered as a 4xx)."""

    def __init__(self, module: str, reason: str) -> None:
        super().__init__(f"ControlNet preprocessor {module!r}: {reason}")
        self.module = module
        self.reason = reason


@dataclass(frozen=True)
class PreprocessorParams:
    """The unit fields a preprocessor reads, with the extension's meaning: a value outside the slider's range (the
    API's -1, or None) means the module's default."""

    resolution: int = 512
    threshold_a: float | None = None
    threshold_b: float | None = None


@dataclass(frozen=True)
class Slider:
    """The extension's PreprocessorParameter."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = True

    def api_json(self) -> dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def bound(self, value: float | None) -> float:
        """ControlNetUnit.bound_check_params: a value outside [min, max] becomes the default."""
        if value is None or not (self.minimum <= value <= self.maximum):
            return self.value
        return value


HIDDEN = Slider(visible=False)
RESOLUTION = Slider("Resolution", 64, 2048, 8, 512)


class Kind(str, Enum):
    FREE = "free"  # a pure image operation
    DEPTH = "depth"  # a transformers depth-estimation model from the annotators folder
    REFERENCE = "reference"  # reference-only: attention hooks in the UNet, not a map
    IMAGE_PROMPT = "image_prompt"  # CLIP vision / face embeddings for IP-Adapter, Revision, InstantID: not a map
    UNSUPPORTED = "unsupported"  # an annotator model this server cannot load


Op = Callable[[np.ndarray, int, float, float], np.ndarray]


@dataclass(frozen=True)
class Module:
    """One preprocessor: `name` is the extension's key (module_list), `label` its alias (module_list?alias_names)."""

    name: str
    kind: Kind
    label: str = ""
    priority: int = 0
    resolution: Slider = RESOLUTION
    slider_1: Slider = HIDDEN
    slider_2: Slider = HIDDEN
    op: Op | None = None
    metric_depth: bool = False  # depth_zoe: metric depth, clipped and inverted
    model_free: bool = False  # the extension's meaning: needs no ControlNet model (the reference modules)
    reason: str = ""  # why a module that is not FREE/DEPTH cannot run here
    extra_aliases: tuple[str, ...] = field(default=())

    @property
    def alias(self) -> str:
        return self.label or self.name

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.slider_1, self.slider_2) if s.visible]


def _s(label: str, minimum: float, maximum: float, value: float, step: float = 0.01) -> Slider:
    return Slider(label, minimum, maximum, step, value)


_TILE_VARIATION = _s("Variation", 3.0, 32.0, 8.0, 1.0)
_FIDELITY = _s("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5)
_NOISE_AUG = _s("Noise Augmentation", 0.0, 1.0, 0.0)
_GAMMA = _s("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
_NO_RES = Slider(visible=False)  # new-style modules that hide the resolution slider (the extension's default one)

# Why each kind of unsupported module is refused (the message names the module as well).
_NEEDS_ANNOTATOR = "it needs the extension's own annotator model, which this server cannot load"
_NEEDS_HOOKS = "reference-only control works through UNet attention hooks, which this server does not implement"
_IMAGE_PROMPT = "it makes image-prompt embeddings (IP-Adapter / CLIP vision), not a control map"


def _free(name: str, op: Op, label: str = "", priority: int = 0, **kw: Any) -> Module:
    return Module(name, Kind.FREE, label, priority, op=op, **kw)


def _depth(name: str, label: str = "", priority: int = 0, metric: bool = False) -> Module:
    return Module(name, Kind.DEPTH, label, priority, metric_depth=metric)


def _refused(name: str, label: str = "", priority: int = 0, kind: Kind = Kind.UNSUPPORTED, **kw: Any) -> Module:
    reason = {Kind.REFERENCE: _NEEDS_HOOKS, Kind.IMAGE_PROMPT: _IMAGE_PROMPT}.get(kind, _NEEDS_ANNOTATOR)
    return Module(name, kind, label, priority, reason=reason, **kw)


MODULES: tuple[Module, ...] = (
    # Weight-free (the new-style ones keep their own resolution slider; legacy ones always show the default one).
    _free("none", lambda img, res, a, b: ops.hwc3(img), priority=10, resolution=_NO_RES),
    _free(
        "canny",
        ops.canny,
        priority=100,
        slider_1=_s("Low Threshold", 1, 255, 100, 1),
        slider_2=_s("High Threshold", 1, 255, 200, 1),
    ),
    _free("invert", ops.invert, "invert (from white bg & black line)", 20, resolution=_NO_RES),
    _free("blur_gaussian", ops.blur_gaussian, slider_1=_s("Sigma", 0.01, 64.0, 9.0)),
    _free("scribble_xdog", ops.scribble_xdog, slider_1=_s("XDoG Threshold", 1, 64, 32)),
    # always 512 (the extension's hidden slider means to fix it there; its 0-1 range would let 0 through)
    _free("shuffle", ops.shuffle, resolution=Slider(minimum=512, maximum=512, value=512, visible=False)),
    _free(
        "threshold",
        ops.threshold,
        slider_1=_s("Binarization Threshold", 0, 255, 127),
        extra_aliases=("binary",),  # the extension's name before 1.1
    ),
    _free("tile_resample", ops.tile_resample, priority=100, slider_1=_s("Down Sampling Rate", 1.0, 8.0, 1.0)),
    _free("tile_colorfix", ops.identity, slider_1=_TILE_VARIATION),
    _free("tile_colorfix+sharp", ops.identity, slider_1=_TILE_VARIATION, slider_2=_s("Sharpness", 0.0, 2.0, 1.0)),
    _free("color", ops.color, "t2ia_color_grid"),
    _free("lineart_standard", ops.lineart_standard, "lineart_standard (from white bg & black line)", 100),
    _free("recolor_luminance", ops.recolor_luminance, priority=100, slider_1=_GAMMA),
    _free("recolor_intensity", ops.recolor_intensity, slider_1=_GAMMA),
    # transformers depth estimation, when the model is in the annotators folder.
    _depth("depth", "depth_midas", 100),
    _depth("depth_anything"),
    _depth("depth_anything_v2"),
    _depth("depth_zoe", metric=True),
    # Known to the extension, refused here by name.
    _refused("reference_only", priority=100, kind=Kind.REFERENCE, model_free=True, slider_1=_FIDELITY),
    _refused("reference_adain", kind=Kind.REFERENCE, model_free=True, slider_1=_FIDELITY),
    _refused("reference_adain+attn", kind=Kind.REFERENCE, model_free=True, slider_1=_FIDELITY),
    _refused("ip-adapter-auto", priority=1000, kind=Kind.IMAGE_PROMPT, resolution=_NO_RES),
    _refused("ip-adapter_clip_sd15", "ip-adapter_clip_h", 100, Kind.IMAGE_PROMPT),
    _refused("ip-adapter_clip_sdxl", "ip-adapter_clip_g", kind=Kind.IMAGE_PROMPT),
    _refused("ip-adapter_clip_sdxl_plus_vith", kind=Kind.IMAGE_PROMPT),
    _refused("ip-adapter_face_id", kind=Kind.IMAGE_PROMPT),
    _refused("ip-adapter_face_id_plus", kind=Kind.IMAGE_PROMPT),
    _refused("ip-adapter_pulid", kind=Kind.IMAGE_PROMPT, resolution=_NO_RES),
    _refused("instant_id_face_embedding", kind=Kind.IMAGE_PROMPT),
    _refused("clip_vision", "t2ia_style_clipvision", kind=Kind.IMAGE_PROMPT),
    _refused("revision_clipvision", priority=100, kind=Kind.IMAGE_PROMPT, model_free=True, slider_1=_NOISE_AUG),
    _refused("revision_ignore_prompt", kind=Kind.IMAGE_PROMPT, model_free=True, slider_1=_NOISE_AUG),
    _refused("hed", "softedge_hed"),
    _refused("hed_safe", "softedge_hedsafe"),
    _refused("pidinet", "softedge_pidinet", 100),
    _refused("pidinet_safe", "softedge_pidisafe"),
    _refused("softedge_teed", slider_1=_s("Safe Steps", 0, 10, 2, 1)),
    _refused(
        "softedge_anyline", resolution=_s("Resolution", 64, 2048, 1280, 8), slider_1=_s("Safe Steps", 0, 10, 2, 1)
    ),
    _refused("scribble_hed", extra_aliases=("fake_scribble",)),
    _refused("pidinet_scribble", "scribble_pidinet", 100),
    _refused("pidinet_sketch", "t2ia_sketch_pidi"),
    _refused("lineart", "lineart_realistic"),
    _refused("lineart_coarse"),
    _refused("lineart_anime"),
    _refused("lineart_anime_denoise"),
    _refused("normal_bae", priority=100),
    _refused("normal_map", "normal_midas", slider_1=_s("Normal Background Threshold", 0.0, 1.0, 0.4)),
    _refused("normal_dsine", slider_1=_s("Fov", 0, 360, 60, 0.1), slider_2=_s("Iterations", 1, 20, 5, 1)),
    _refused(
        "depth_leres", slider_1=_s("Remove Near %", 0, 100, 0, 0.1), slider_2=_s("Remove Background %", 0, 100, 0, 0.1)
    ),
    _refused(
        "depth_leres++",
        slider_1=_s("Remove Near %", 0, 100, 0, 0.1),
        slider_2=_s("Remove Background %", 0, 100, 0, 0.1),
    ),
    _refused("depth_hand_refiner"),
    _refused("openpose"),
    _refused("openpose_face"),
    _refused("openpose_faceonly"),
    _refused("openpose_full", priority=100),
    _refused("openpose_hand"),
    _refused("dw_openpose_full"),
    _refused("animal_openpose"),
    _refused("densepose", "densepose (pruple bg & purple torso)"),
    _refused("densepose_parula", "densepose_parula (black bg & blue torso)"),
    _refused("instant_id_face_keypoints"),
    _refused(
        "mediapipe_face", slider_1=_s("Max Faces", 1, 10, 1, 1), slider_2=_s("Min Face Confidence", 0.01, 1.0, 0.5)
    ),
    _refused(
        "mlsd",
        priority=100,
        slider_1=_s("MLSD Value Threshold", 0.01, 2.0, 0.1),
        slider_2=_s("MLSD Distance Threshold", 0.01, 20.0, 0.1),
    ),
    _refused("segmentation", "seg_ufade20k"),
    _refused("oneformer_ade20k", "seg_ofade20k", 100),
    _refused("oneformer_coco", "seg_ofcoco"),
    _refused("anime_face_segment", "seg_anime_face"),
    _refused("mobile_sam"),
    _refused("inpaint", "inpaint_global_harmonious", resolution=_NO_RES),
    _refused("inpaint_only", priority=100, resolution=_NO_RES),
    _refused("inpaint_only+lama", resolution=_NO_RES),
)

BY_NAME: dict[str, Module] = {m.name: m for m in MODULES}
_LOOKUP: dict[str, Module] = {  # the extension looks a label up before a name
    **{a: m for m in MODULES for a in m.extra_aliases},
    **BY_NAME,
    **{m.alias: m for m in MODULES},
}
assert len(BY_NAME) == len(MODULES)

# Where model-backed preprocessors look for their models, under the A1111 models directory.
ANNOTATORS_SUBDIR = Path("ControlNet") / "annotators"


def annotator_folder(module: str, models_dir: Path) -> Path:
    """`<models_dir>/ControlNet/annotators/<alias name>` (e.g. .../annotators/depth_midas)."""
    return models_dir / ANNOTATORS_SUBDIR / module_spec(module).alias


def module_spec(module: str) -> Module:
    """The module named by its key or alias (the extension's lookup: label first, then name); PreprocessorError if
    no such module exists."""
    key = (module or "none").strip().lower()
    found = _LOOKUP.get(key)
    if found is None:
        raise PreprocessorError(module, "unknown preprocessor (GET /controlnet/module_list lists those available)")
    return found


def canonical_module(module: str) -> str:
    """The module's canonical name (the extension's key, e.g. `depth` for `depth_midas`), resolving the alias
    names; raises PreprocessorError if unknown."""
    return module_spec(module).name


def _runnable(m: Module, models_dir: Path | None) -> bool:
    if m.kind is Kind.FREE:
        return True
    if m.kind is Kind.DEPTH and models_dir is not None:
        from pipelines.controlnet_depth import folder_ready

        return folder_ready(models_dir / ANNOTATORS_SUBDIR / m.alias)
    return False


def _sorted(modules: list[Module]) -> list[Module]:
    """get_sorted_preprocessors: `none` first, then by priority and label, descending."""
    rest = sorted((m for m in modules if m.name != "none"), key=lambda m: str(m.priority).zfill(8) + m.alias,
                  reverse=True)  # fmt: skip
    return [m for m in modules if m.name == "none"] + rest


def available_modules(models_dir: Path | None = None) -> list[str]:
    """Canonical names of the preprocessors that can run here (weight-free ones and those whose model is present),
    in the extension's module_list order."""
    return [m.name for m in _sorted([m for m in MODULES if _runnable(m, models_dir)])]


def module_list(models_dir: Path | None = None, alias_names: bool = False) -> dict[str, Any]:
    """GET /controlnet/module_list's answer for the modules that can run here."""
    runnable = _sorted([m for m in MODULES if _runnable(m, models_dir)])
    names = [m.alias if alias_names else m.name for m in runnable]
    detail = {
        n: {"model_free": m.model_free, "sliders": [s.api_json() for s in m.sliders()]}
        for n, m in zip(names, runnable, strict=True)
    }
    return {"module_list": names, "module_detail": detail}


def check_runnable(module: str, models_dir: Path | None = None) -> Module:
    """The module if it can run here; otherwise PreprocessorError naming it and saying why."""
    m = module_spec(module)
    if m.kind is Kind.FREE:
        return m
    if m.kind is Kind.DEPTH:
        if models_dir is None or not _runnable(m, models_dir):
            where = f"<models dir>/{ANNOTATORS_SUBDIR.as_posix()}/{m.alias}/"
            raise PreprocessorError(
                module,
                f"its depth model is not installed: put a transformers depth-estimation model (config.json, "
                f"preprocessor_config.json, *.safetensors) in {where}",
            )
        return m
    raise PreprocessorError(module, f"not supported by this server: {m.reason}")


def needs_model(module: str) -> bool:
    """Whether the module runs a model (torch); weight-free ones are cheap image operations."""
    return module_spec(module).kind is not Kind.FREE


@dataclass(frozen=True)
class Resolved:
    """Bound-checked values (ControlNetUnit.bound_check_params)."""

    resolution: int
    a: float
    b: float


def resolve_params(module: str, params: PreprocessorParams) -> Resolved:
    m = module_spec(module)
    return Resolved(
        int(m.resolution.bound(params.resolution)),
        m.slider_1.bound(params.threshold_a),
        m.slider_2.bound(params.threshold_b),
    )


def output_size(module: str, image_size: tuple[int, int], params: PreprocessorParams = PreprocessorParams()
                ) -> tuple[int, int]:  # fmt: skip
    """(width, height) of the map `run_preprocessor` makes from an image of `image_size`, without making it (to
    refuse work above a pixel limit first)."""
    m = module_spec(module)
    p = resolve_params(module, params)
    w, h = image_size
    if m.name in ("none", "invert", "tile_colorfix", "tile_colorfix+sharp", "recolor_luminance", "recolor_intensity"):
        return w, h
    if m.name == "tile_resample":
        return (w, h) if p.a < 1.1 else ops.downsampled_size(w, h, p.a)
    if m.name == "color":
        return (round(w / h * p.resolution), p.resolution) if h < w else (p.resolution, round(h / w * p.resolution))
    th, tw = ops.resized_size(h, w, p.resolution)
    return tw, th


def to_array(image: Image.Image) -> np.ndarray:
    """The uint8 array the extension makes of a decoded image (grey, RGB or RGBA)."""
    if image.mode not in ("L", "RGB", "RGBA"):
        transparent = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    return np.asarray(image, dtype=np.uint8)


def run_preprocessor(
    module: str,
    image: Image.Image,
    params: PreprocessorParams = PreprocessorParams(),
    models_dir: Path | None = None,
) -> Image.Image:
    """The detected map for `image` as the extension makes it (RGB). Its size is the extension's: modules that work
    at the processor resolution answer with the short side at `params.resolution` (the caller resizes the map to
    the generation size); invert, tile_colorfix, recolor and `none` keep the input's size; tile_resample divides it
    by the down-sampling rate. Depth modules load their model (torch) on first use."""
    m = check_runnable(module, models_dir)
    if m.name == "none":
        return image.convert("RGB")
    p = resolve_params(module, params)
    pixels = to_array(image)
    if m.kind is Kind.DEPTH:
        from pipelines.controlnet_depth import estimate

        assert models_dir is not None  # check_runnable
        result = estimate(models_dir / ANNOTATORS_SUBDIR / m.alias, pixels, p.resolution, m.metric_depth)
    else:
        assert m.op is not None
        result = m.op(pixels, p.resolution, p.a, p.b)
    return Image.fromarray(ops.hwc3(result), "RGB")


# Pixel perfect -----------------------------------------------------------------------------------------------------

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}


def resize_mode_name(value: str | int) -> str:
    """external_code.resize_mode_from_value: an index (3, A1111's latent upscale, is Just Resize) or a name, old
    spellings included; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"resize_mode {value!r}: expected one of {RESIZE_MODES} or 0-2")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"resize_mode {value}: expected one of {RESIZE_MODES} or 0-2")
        return RESIZE_MODES[value] if value < len(RESIZE_MODES) else "Just Resize"
    name = _RESIZE_MODE_ALIASES.get(value, value)
    if name not in RESIZE_MODES:
        raise ValueError(f"resize_mode {value!r}: expected one of {RESIZE_MODES}")
    return name


def pixel_perfect_resolution(image_size: tuple[int, int], target_size: tuple[int, int], resize_mode: str | int) -> int:
    """external_code.pixel_perfect_resolution: the processor resolution at which the map needs no resampling for a
    (width, height) target: the larger scale for crop / just-resize, the smaller for Resize and Fill."""
    raw_w, raw_h = image_size
    target_w, target_h = target_size
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if resize_mode_name(resize_mode) == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))
