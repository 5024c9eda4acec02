"""ControlNet preprocessors (pipelines.controlnet_preprocessors): the extension's names, aliases, slider defaults,
output sizes and pixels, refusals by name, and a depth map from a tiny random-weight transformers model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines import controlnet_preprocessors as cp
from pipelines.controlnet_preprocessors import PreprocessorError, PreprocessorParams

REPO = Path(__file__).resolve().parents[2]
SQUARE = (16, 16, 47, 47)  # inclusive corners of the black square in `square_image`


def square_image(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle(SQUARE, fill="black")
    return img


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def write_tiny_depth_models(models_dir: Path) -> None:
    """Random-weight DPT (as depth_midas) and Depth Anything models where the preprocessors look for them."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

    root = models_dir / "ControlNet" / "annotators"
    torch.manual_seed(0)
    dpt = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
    )
    DPTForDepthEstimation(dpt).save_pretrained(root / "depth_midas")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(root / "depth_midas")
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    anything = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 8],
        fusion_hidden_size=8,
        head_hidden_size=8,
        patch_size=14,
        reassemble_factors=[2, 1],
    )
    DepthAnythingForDepthEstimation(anything).save_pretrained(root / "depth_anything")
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(
        root / "depth_anything"
    )


@pytest.fixture(scope="module")
def depth_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("a1111-models")
    write_tiny_depth_models(models_dir)
    return models_dir


# Names, aliases, sliders --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("depth_midas", "depth"),
        ("t2ia_color_grid", "color"),
        ("invert (from white bg & black line)", "invert"),
        ("lineart_standard (from white bg & black line)", "lineart_standard"),
        ("binary", "threshold"),
        ("scribble_pidinet", "pidinet_scribble"),
        ("softedge_hed", "hed"),
        ("Canny", "canny"),
        ("", "none"),
    ],
)
def test_alias_names_resolve_to_the_extension_key(alias: str, name: str) -> None:
    assert cp.canonical_module(alias) == name


def test_unknown_module_is_refused_by_name() -> None:
    with pytest.raises(PreprocessorError, match="'no_such_module'") as info:
        cp.run_preprocessor("no_such_module", square_image())
    assert info.value.module == "no_such_module"
    with pytest.raises(PreprocessorError, match="'nope'"):
        cp.canonical_module("nope")


def test_minus_one_and_out_of_range_values_take_the_slider_defaults() -> None:
    # ControlNetUnit.bound_check_params: -1 (the API default) or anything outside [min, max] -> the default
    assert cp.resolve_params("canny", PreprocessorParams(-1, -1, -1)) == cp.Resolved(512, 100, 200)
    assert cp.resolve_params("canny", PreprocessorParams(640, 50, 400)) == cp.Resolved(640, 50, 200)
    assert cp.resolve_params("tile_resample", PreprocessorParams(32, None, None)) == cp.Resolved(512, 1.0, 0.5)
    assert cp.resolve_params("threshold", PreprocessorParams(512, 200, -1)).a == 200


def test_module_list_has_the_extensions_shape_order_and_sliders() -> None:
    listing = cp.module_list(alias_names=False)
    names = listing["module_list"]
    assert names[0] == "none"
    assert names[1:3] == ["tile_resample", "recolor_luminance"]  # priority 100, labels descending
    assert set(listing["module_detail"]) == set(names)
    assert listing["module_detail"]["canny"] == {
        "model_free": False,
        "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
        ],
    }
    assert listing["module_detail"]["invert"]["sliders"] == []  # the extension hides its resolution slider
    aliased = cp.module_list(alias_names=True)
    assert "invert (from white bg & black line)" in aliased["module_list"]
    assert "t2ia_color_grid" in aliased["module_detail"]
    assert "invert" not in aliased["module_list"]


def test_model_backed_modules_without_their_model_are_refused_and_not_listed(tmp_path: Path) -> None:
    for models_dir in (None, tmp_path):
        listed = cp.available_modules(models_dir)
        assert "depth" not in listed and "depth_anything" not in listed and "openpose" not in listed
        with pytest.raises(PreprocessorError, match=r"'depth_midas'.*ControlNet/annotators/depth_midas"):
            cp.run_preprocessor("depth_midas", square_image(), models_dir=models_dir)
    for name, reason in [
        ("openpose", "annotator model"),
        ("reference_only", "attention hooks"),
        ("ip-adapter_clip_h", "image-prompt"),
    ]:
        with pytest.raises(PreprocessorError, match=reason) as info:
            cp.run_preprocessor(name, square_image())
        assert name in str(info.value)


def test_http_side_imports_no_torch_and_opencv_only_to_run_a_preprocessor() -> None:
    code = (
        "import sys, server.api.a1111.controlnet_modules, pipelines.controlnet_preprocessors as cp;"
        "cp.available_modules();"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported';"
        # OpenCV only when a preprocessor runs: a server (or the lent GPU box) starts without it.
        "assert 'cv2' not in sys.modules, 'cv2 imported';"
        "import numpy as np; cp.run_preprocessor('canny', __import__('PIL.Image').Image.new('RGB', (64, 64)));"
        "assert 'cv2' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# Pixels --------------------------------------------------------------------------------------------------------------


def test_canny_edges_of_a_square_lie_on_its_border() -> None:
    edges = pixels(cp.run_preprocessor("canny", square_image(), PreprocessorParams(64, 100, 200)))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) == {0, 255}
    mask = edges[:, :, 0] == 255
    ys, xs = np.nonzero(mask)
    left, top, right, bottom = SQUARE
    # every edge pixel is within a pixel of the square's outline ...
    near_x = (np.minimum(abs(xs - left), abs(xs - right)) <= 1) & (ys >= top - 1) & (ys <= bottom + 1)
    near_y = (np.minimum(abs(ys - top), abs(ys - bottom)) <= 1) & (xs >= left - 1) & (xs <= right + 1)
    assert (near_x | near_y).all()
    # ... and each side is traced along its length
    side = bottom - top + 1
    for column in (mask[top:bottom, left - 1 : left + 1], mask[top:bottom, right : right + 2]):
        assert column.any(axis=1).sum() >= side - 4
    for row in (mask[top - 1 : top + 1, left:right], mask[bottom : bottom + 2, left:right]):
        assert row.any(axis=0).sum() >= side - 4
    assert not mask[top + 4 : bottom - 4, left + 4 : right - 4].any()  # nothing inside


def test_canny_thresholds_matter() -> None:
    img = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)), "L").convert("RGB")
    soft = pixels(cp.run_preprocessor("canny", img, PreprocessorParams(64, 1, 2)))
    hard = pixels(cp.run_preprocessor("canny", img, PreprocessorParams(64, 200, 255)))
    assert soft.sum() > hard.sum()


def test_threshold_and_binary_are_two_valued() -> None:
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)), "L")
    out = pixels(cp.run_preprocessor("threshold", gradient, PreprocessorParams(64, 127)))
    assert set(np.unique(out)) == {0, 255}
    assert (out[:, :30] == 0).all() and (out[:, 34:] == 255).all()  # 127 falls between columns 31 and 32
    assert (pixels(cp.run_preprocessor("binary", gradient, PreprocessorParams(64, 127))) == out).all()


def test_invert_inverts_at_the_input_size() -> None:
    img = noise_image(40, 24)
    out = cp.run_preprocessor("invert (from white bg & black line)", img, PreprocessorParams(512))
    assert out.size == (40, 24)
    assert (pixels(out) == 255 - pixels(img)).all()


def test_blur_reduces_variance() -> None:
    img = noise_image(64, 64)
    out = pixels(cp.run_preprocessor("blur_gaussian", img, PreprocessorParams(64, 3.0)))
    assert out.shape == (64, 64, 3)
    assert out.var() < pixels(img).var() / 4


@pytest.mark.parametrize(("rate", "size"), [(1.0, (80, 48)), (2.0, (40, 24)), (4.0, (20, 12)), (-1, (80, 48))])
def test_tile_resample_downsizes_by_the_rate(rate: float, size: tuple[int, int]) -> None:
    out = cp.run_preprocessor("tile_resample", noise_image(80, 48), PreprocessorParams(512, rate))
    assert out.size == size == cp.output_size("tile_resample", (80, 48), PreprocessorParams(512, rate))


def test_tiny_inputs_do_not_break_any_module() -> None:
    for module in cp.available_modules():
        for params in (PreprocessorParams(64, 8.0, 2.0), PreprocessorParams(0, 0, 0), PreprocessorParams(1, 1, 1)):
            out = cp.run_preprocessor(module, Image.new("RGB", (1, 3), "gray"), params)
            assert out.size == cp.output_size(module, (1, 3), params), (module, params)


@pytest.mark.parametrize(
    "module", ["canny", "threshold", "blur_gaussian", "scribble_xdog", "lineart_standard", "t2ia_color_grid"]
)
def test_output_size_follows_processor_res(module: str) -> None:
    for res, expected in [(96, (128, 96)), (64, (85, 64))]:
        params = PreprocessorParams(res)
        out = cp.run_preprocessor(module, noise_image(64, 48), params)
        assert out.mode == "RGB"
        assert out.size == expected == cp.output_size(module, (64, 48), params), (module, res)


def test_color_grid_is_made_of_64_pixel_cells() -> None:
    out = pixels(cp.run_preprocessor("color", noise_image(128, 128), PreprocessorParams(128)))
    assert out.shape == (128, 128, 3)
    for y0 in (0, 64):
        for x0 in (0, 64):
            cell = out[y0 : y0 + 64, x0 : x0 + 64]
            assert (cell == cell[0, 0]).all()


def test_rgba_input_is_composited_over_white() -> None:
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert (pixels(cp.run_preprocessor("invert", clear)) == 0).all()


def test_scribble_xdog_draws_the_outline() -> None:
    out = pixels(cp.run_preprocessor("scribble_xdog", square_image(), PreprocessorParams(64, 32)))
    assert set(np.unique(out)) <= {0, 255} and out.max() == 255
    assert out[0:8, 0:8].max() == 0  # flat corners stay empty


# Depth through transformers -----------------------------------------------------------------------------------------


def test_tiny_local_depth_models_are_listed_and_make_a_grey_map(depth_models_dir: Path) -> None:
    listed = cp.available_modules(depth_models_dir)
    assert "depth" in listed and "depth_anything" in listed
    assert "depth_zoe" not in listed and "depth_anything_v2" not in listed  # no model for those
    assert "depth_midas" in cp.module_list(depth_models_dir, alias_names=True)["module_list"]
    img = Image.radial_gradient("L").convert("RGB").resize((80, 64))
    for module in ("depth_midas", "depth_anything"):
        params = PreprocessorParams(96)
        out = cp.run_preprocessor(module, img, params, depth_models_dir)
        assert out.size == (120, 96) == cp.output_size(module, img.size, params)
        a = pixels(out)
        assert (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all()  # one channel, repeated
        assert a.max() > a.min()


# Pixel perfect -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "target", "mode", "expected"),
    [
        ((1024, 512), (512, 512), "Crop and Resize", 512),
        ((1024, 512), (512, 512), "Just Resize", 512),
        ((1024, 512), (512, 512), "Resize and Fill", 256),
        ((1024, 512), (512, 512), 2, 256),
        ((1024, 512), (512, 512), "Envelope (Outer Fit)", 256),
        ((300, 200), (768, 512), "Inner Fit (Scale to Fit)", 512),
        ((300, 200), (512, 768), 1, 768),
        ((300, 200), (512, 768), "Resize and Fill", 341),
    ],
)
def test_pixel_perfect_resolution_matches_the_extension(image, target, mode, expected) -> None:
    assert cp.pixel_perfect_resolution(image, target, mode) == expected


def test_unknown_resize_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Stretch"):
        cp.resize_mode_name("Stretch")
