"""A1111-style image preparation around img2img / inpainting (pipelines/imageprep.py). Pillow + numpy only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.imageprep import (
    binarize_mask,
    blur_mask,
    expand_crop_region,
    flatten,
    get_crop_region,
    prepare_inpaint,
    resize_image,
)
from pipelines.request import InpaintOptions

RED = (255, 0, 0)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def square_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


# --- resize ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize(("src", "dst"), [((400, 300), (256, 256)), ((300, 500), (512, 384)), ((64, 64), (96, 32))])
def test_resize_modes_produce_the_target_size(mode, src, dst):
    assert resize_image(noise(*src), *dst, mode).size == dst


def test_just_resize_and_latent_mode_stretch():
    img = noise(400, 300)
    expected = img.resize((256, 256), Image.Resampling.LANCZOS)
    assert px(resize_image(img, 256, 256, 0)).tolist() == px(expected).tolist()
    assert px(resize_image(img, 256, 256, 3)).tolist() == px(expected).tolist()


def test_crop_and_resize_cuts_the_sides():
    img = Image.new("RGB", (400, 200), (0, 0, 255))
    img.paste(RED, (0, 0, 50, 200))  # a red band on the far left is cropped away when filling a square
    out = resize_image(img, 100, 100, 1)
    assert (px(out)[:, :] == (0, 0, 255)).all()


def test_resize_and_fill_stretches_the_edges_into_the_bands():
    img = Image.new("RGB", (100, 200), (0, 0, 255))
    img.paste(RED, (0, 0, 20, 200))  # red along the left edge: the left band repeats it
    out = px(resize_image(img, 200, 100, 2))
    assert out.shape == (100, 200, 3)
    assert (out[:, :80] == RED).all()  # the fitted picture is 50 wide at 75..125, its left 10 px red
    assert (out[:, 130:] == (0, 0, 255)).all()


def test_resize_keeps_mask_mode():
    assert resize_image(Image.new("L", (40, 20)), 30, 30, 2).mode == "L"


def test_flatten_puts_transparency_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = flatten(img)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == RED and out.getpixel((3, 3)) == (255, 255, 255)


# --- masks -----------------------------------------------------------------------------------------------------------


def test_rgba_mask_uses_the_thresholded_alpha():
    m = Image.new("RGBA", (4, 1), (0, 0, 0, 0))  # black paint everywhere: only alpha can carry the mask
    for x, a in enumerate((0, 128, 129, 255)):
        m.putpixel((x, 0), (0, 0, 0, a))
    out = binarize_mask(m)
    assert out.mode == "L" and list(out.getdata()) == [0, 0, 255, 255]  # A1111: > 128


def test_opaque_rgba_and_rgb_masks_use_luminance():
    m = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    m.putpixel((1, 0), (0, 0, 0, 255))
    assert list(binarize_mask(m).getdata()) == [255, 0]
    assert list(binarize_mask(Image.new("RGB", (1, 1), (255, 255, 255))).getdata()) == [255]
    assert list(binarize_mask(Image.new("L", (1, 1), 100)).getdata()) == [100]  # greys stay, as in A1111


def test_blur_matches_opencv_bit_for_bit():
    # golden values from cv2.GaussianBlur(mask, (2*int(2.5*s+0.5)+1, 1), s) as A1111 calls it
    step = Image.new("L", (24, 1), 0)
    step.paste(255, (12, 0, 24, 1))
    assert list(blur_mask(step, 2, 0).getdata()) == [
        0, 0, 0, 0, 0, 0, 0, 2, 9, 26, 57, 102, 153, 198, 229, 246, 253, 255, 255, 255, 255, 255, 255, 255,
    ]  # fmt: skip
    assert list(blur_mask(step, 4, 0).getdata()) == [
        0, 0, 1, 3, 7, 12, 21, 32, 48, 67, 90, 115, 140, 165, 188, 207, 223, 234, 243, 248, 252, 254, 255, 255,
    ]  # fmt: skip
    dot = Image.new("L", (9, 9), 0)
    dot.putpixel((4, 4), 255)
    assert px(blur_mask(dot, 1))[2:7, 2:7].tolist() == [
        [1, 3, 6, 3, 1],
        [3, 15, 25, 15, 3],
        [6, 25, 41, 25, 6],
        [3, 15, 25, 15, 3],
        [1, 3, 6, 3, 1],
    ]


def test_blur_of_a_corner_mask_is_symmetric_and_bounded():
    m = square_mask(300, 200, (0, 0, 40, 40))
    out = px(blur_mask(m, 8))
    assert out[60:, :].max() == 0 and out[:, 60:].max() == 0  # kernel radius 20
    sub = out[:200, :200]
    assert np.abs(sub - sub.T).max() <= 1  # same blur along x and y (rounded between the passes)
    assert out[0, 0] == 255 and 0 < out[0, 45] < 128


def test_crop_region_of_a_small_square():
    m = square_mask(400, 300, (100, 120, 120, 140))
    assert get_crop_region(m) == (100, 120, 120, 140)
    assert get_crop_region(m, 32) == (68, 88, 152, 172)
    assert get_crop_region(Image.new("L", (10, 10))) is None
    assert expand_crop_region((100, 120, 120, 140), 256, 256, 400, 300) == (100, 120, 120, 140)
    assert expand_crop_region((100, 120, 120, 140), 512, 256, 400, 300) == (90, 120, 130, 140)  # 2:1 target
    assert expand_crop_region((0, 0, 20, 290), 512, 256, 400, 300) == (0, 0, 400, 290)  # clamped to the image


# --- inpainting ------------------------------------------------------------------------------------------------------


def test_full_res_crops_around_the_mask_and_pastes_back():
    init = noise(400, 300)
    mask = square_mask(400, 300, (100, 120, 140, 160))
    opts = InpaintOptions(mask_blur=4, inpainting_fill=1, full_res=True, full_res_padding=8)
    prep = prepare_inpaint(init, mask, 256, 256, opts)
    assert prep.image.size == prep.mask.size == (256, 256) and prep.mask.mode == "L"
    x1, y1, x2, y2 = prep.crop_region
    assert x1 <= 100 - 8 and y1 <= 120 - 8 and x2 >= 140 + 8 and y2 >= 160 + 8 and (x2 - x1) == (y2 - y1)
    assert prep.output_size == (400, 300) and not prep.mask_empty  # A1111: "only masked" keeps the original size
    # the pipeline sees the crop, upscaled, not the whole picture
    crop = init.crop(prep.crop_region).resize((256, 256), Image.Resampling.LANCZOS)
    assert px(prep.image).tolist() == px(crop).tolist()

    out = px(prep.finish([Image.new("RGB", (256, 256), RED)])[0])
    assert out.shape == (300, 400, 3)
    keep = np.ones((300, 400), bool)
    keep[100:180, 80:160] = False  # the square grown by the blur radius (11 px)
    assert (out[keep] == px(init)[keep]).all()  # exactly the original outside the blurred mask
    assert (out[131:150, 111:130] == RED).all()  # exactly the result where the blurred mask is still 255


def test_whole_picture_resizes_and_composites():
    init = noise(400, 300)
    mask = square_mask(400, 300, (100, 100, 200, 200))
    opts = InpaintOptions(mask_blur=4, inpainting_fill=1, full_res=False)
    prep = prepare_inpaint(init, mask, 256, 192, opts)
    resized = init.resize((256, 192), Image.Resampling.LANCZOS)
    assert px(prep.image).tolist() == px(resized).tolist() and prep.output_size == (256, 192)
    out = px(prep.finish([Image.new("RGB", (256, 192), RED)] * 2)[1])
    assert (out[:40] == px(resized)[:40]).all() and (out[:, 200:] == px(resized)[:, 200:]).all()
    assert (out[80:120, 70:120] == RED).all()


def test_invert_repaints_the_outside():
    init = noise(200, 200)
    mask = square_mask(200, 200, (50, 50, 150, 150))
    prep = prepare_inpaint(init, mask, 200, 200, InpaintOptions(mask_blur=0, inpainting_fill=1, invert=True))
    assert prep.mask.getpixel((0, 0)) == 255 and prep.mask.getpixel((100, 100)) == 0
    out = px(prep.finish([Image.new("RGB", prep.image.size, RED)])[0])
    assert (out[60:140, 60:140] == px(init)[60:140, 60:140]).all() and (out[:40, :40] == RED).all()


def test_fill_replaces_the_masked_area_only_for_fill_modes():
    init = noise(128, 128)
    mask = square_mask(128, 128, (32, 32, 96, 96))
    base = InpaintOptions(mask_blur=0, full_res=False)
    original = prepare_inpaint(init, mask, 128, 128, InpaintOptions(**{**base.__dict__, "inpainting_fill": 1}))
    assert px(original.image).tolist() == px(init).tolist()
    for fill_mode in (0, 2, 3):
        filled = prepare_inpaint(
            init, mask, 128, 128, InpaintOptions(**{**base.__dict__, "inpainting_fill": fill_mode})
        )
        inside, outside = px(filled.image)[40:88, 40:88], px(filled.image)[:20]
        assert (outside == px(init)[:20]).all()
        assert inside.std() < px(init)[40:88, 40:88].std() / 4  # noise replaced by smooth surrounding colour
        assert px(filled.canvas).tolist() == px(init).tolist()  # the composite still uses the unfilled original


@pytest.mark.parametrize("full_res", [True, False])
def test_all_black_mask_returns_the_original(full_res):
    init = noise(300, 200)
    opts = InpaintOptions(full_res=full_res, mask_blur=4)
    prep = prepare_inpaint(init, Image.new("L", (300, 200), 0), 256, 256, opts)
    assert prep.mask_empty and prep.crop_region is None and prep.image.size == (256, 256)
    out = prep.finish([Image.new("RGB", (256, 256), RED)])[0]
    assert px(out).tolist() == px(init.resize((256, 256), Image.Resampling.LANCZOS)).tolist()


def test_inverted_white_mask_is_empty_too():
    prep = prepare_inpaint(noise(64, 64), Image.new("L", (64, 64), 255), 64, 64, InpaintOptions(invert=True))
    assert prep.mask_empty


def test_rgba_mask_init_and_size_mismatch():
    init = Image.new("RGBA", (200, 100), (0, 0, 0, 0))  # fully transparent: flattened onto white
    mask = Image.new("RGBA", (100, 50), (0, 0, 0, 0))  # half the size; alpha carries the mask
    mask.paste((0, 0, 0, 255), (10, 10, 20, 20))
    prep = prepare_inpaint(init, mask, 128, 128, InpaintOptions(mask_blur=0, inpainting_fill=1))
    assert prep.crop_region is not None and prep.output_size == (200, 100)
    assert prep.image.getpixel((0, 0)) == (255, 255, 255)
    out = prep.finish([Image.new("RGB", (120, 120), RED)])[0]  # a result that is not the requested size
    assert out.size == (200, 100) and out.getpixel((30, 30)) == RED and out.getpixel((150, 80)) == (255, 255, 255)


def test_without_composite_the_crop_is_pasted_unblended():
    init = noise(200, 200)
    mask = square_mask(200, 200, (80, 80, 120, 120))
    opts = InpaintOptions(mask_blur=4, inpainting_fill=1, composite_original=False, full_res_padding=16)
    prep = prepare_inpaint(init, mask, 64, 64, opts)
    out = px(prep.finish([Image.new("RGB", (64, 64), RED)])[0])
    x1, y1, x2, y2 = prep.crop_region
    assert (out[y1:y2, x1:x2] == RED).all() and (out[:y1] == px(init)[:y1]).all()


def test_resize_and_fill_never_makes_a_zero_pixel_image() -> None:
    """Issue #14: fitting a 1x2000 sliver into 64x64 rounds its width to 0; it is kept at 1 px and stretched."""
    from pipelines.imageprep import resize_image

    out = resize_image(Image.new("RGB", (1, 2000), (200, 10, 10)), 64, 64, resize_mode=2)
    assert out.size == (64, 64) and out.getpixel((32, 32)) == (200, 10, 10)
