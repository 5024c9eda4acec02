"""A1111's built-in img2img scripts (issue 16, item 5) over raw HTTP against the fake engine, whose images are the
seed's solid colour: which jobs a script submits (tiles, masks, seeds), how their images are put together, the sizes,
the listings and the 422s naming `script_args[i]`. The real pipelines run them in tests/e2e/test_webuiapi_scripts.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.request import Task
from pipelines.script_geometry import combine_grid, matched_noise, split_grid
from tests.api.fake_engine import FakeEngine, seed_color
from tests.api.test_a1111 import GW, SD, assert_422_names, decode_png, info_of, png_b64


def body(script: str, args: list, size=(64, 64), color=(200, 10, 10), **extra) -> dict:
    return {
        "prompt": "a lighthouse",
        "steps": 1,
        "seed": 7,
        "width": 64,
        "height": 64,
        "init_images": [png_b64(size, color)],
        "script_name": script,
        "script_args": args,
        **extra,
    }


def images_of(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [decode_png(data).convert("RGB") for data in response.json()["images"]]


# Listings ------------------------------------------------------------------------------------------------------------


def test_scripts_and_script_info_list_the_builtins_as_a1111(client: TestClient) -> None:
    names = ["sd upscale", "outpainting mk2", "poor man's outpainting"]
    assert client.get(f"{SD}/scripts").json() == {"txt2img": [], "img2img": names}
    info = {s["name"]: s for s in client.get(f"{SD}/script-info").json()}
    assert list(info) == names
    upscale = info["sd upscale"]
    assert upscale["is_img2img"] and not upscale["is_alwayson"]
    assert [a["label"] for a in upscale["args"]] == ["", "Tile overlap", "Upscaler", "Scale Factor"]
    assert [a["value"] for a in upscale["args"][1:]] == [64, "None", 2.0]
    assert upscale["args"][2]["choices"] == ["None", "Lanczos", "Nearest"]
    mk2 = info["outpainting mk2"]["args"]
    assert [a["value"] for a in mk2[1:]] == [128, 8, ["left", "right", "up", "down"], 1.0, 0.05]
    poor = info["poor man's outpainting"]["args"]
    assert [a["label"] for a in poor] == ["Pixels to expand", "Mask blur", "Masked content", "Outpainting direction"]
    assert [a["value"] for a in poor[:3]] == [128, 4, "fill"]


# SD upscale ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [SD, GW])
def test_sd_upscale_tiles_the_upscaled_image_and_blends_the_tiles(client: TestClient, engine: FakeEngine, prefix: str):
    # 64x48 x2 = 128x96 in 64x64 tiles overlapping by 16: 3 columns (x 0, 32, 64) x 2 rows (y 0, 32).
    r = client.post(f"{prefix}/img2img", json=body("SD upscale", ["", 16, "Lanczos", 2.0], size=(64, 48)))
    (out,) = images_of(r)
    assert out.size == (128, 96)
    assert len(engine.requests) == 6
    assert all(q.task == Task.IMG2IMG and [im.size for im in q.init_images] == [(64, 64)] for q in engine.requests)
    assert [q.seed for q in engine.requests] == [7, 8, 9, 10, 11, 12]  # p.seed = processed.seed + 1
    # away from the seams each pixel is its tile's img2img (the fake's seed colour), not the upscaled input
    assert out.getpixel((110, 10)) == seed_color(9)  # row 0, column 2
    assert out.getpixel((10, 90)) == seed_color(10)  # row 1, column 0
    assert out.getpixel((110, 90)) == seed_color(12)
    # across an overlap the two tiles blend linearly (A1111 combine_grid)
    a, b = np.array(seed_color(7)), np.array(seed_color(8))
    blended = np.array(out.getpixel((40, 10)))
    assert np.abs(blended - (a + (b - a) * (8 * 255 // 16) / 255)).max() <= 2
    info = info_of(r)
    assert info["all_seeds"] == [7]
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in info["infotexts"][0]
    assert "Size: 64x64" in info["infotexts"][0]  # A1111 reports p.width x p.height: the tile size


def test_sd_upscale_batches_tiles_and_repeats_per_n_iter(client: TestClient, engine: FakeEngine) -> None:
    # the upscaler by index (1 = Lanczos), 4 tiles two at a time, two upscales from seeds 7 and 8
    payload = body("sd upscale", ["", 0, 1, 2], size=(64, 64), batch_size=2, n_iter=2)
    outs = images_of(client.post(f"{SD}/img2img", json=payload))
    assert [o.size for o in outs] == [(128, 128), (128, 128)]
    assert [(q.seed, q.batch_size) for q in engine.requests] == [(7, 2), (8, 2), (8, 2), (9, 2)]
    assert outs[1].getpixel((100, 100)) == seed_color(10)  # second upscale, second job, second tile: 9 + 1


def test_sd_upscale_result_over_the_size_limit_is_refused_before_work(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(f"{SD}/img2img", json=body("SD upscale", ["", 16, "Lanczos", 8.0], size=(512, 512)))
    assert_422_names(r, "script_args[3]")
    assert "4096x4096" in r.text and "max_width=2048" in r.text
    assert engine.requests == []


@pytest.mark.parametrize(
    ("script", "args", "field"),
    [
        ("SD upscale", ["", "wide", "Lanczos", 2], "script_args[1]"),
        ("SD upscale", ["", 64, "Lanczos", 2], "script_args[1]"),  # overlap 64 >= the 64 px tile
        ("SD upscale", ["", 16, "ESRGAN_4x", 2], "script_args[2]"),
        ("SD upscale", ["", 16, 7, 2], "script_args[2]"),
        ("SD upscale", ["", 16, "Lanczos", 0], "script_args[3]"),
        ("SD upscale", ["", 16, "Lanczos", 2, "extra"], "script_args[4]"),
        ("Outpainting mk2", ["", 0], "script_args[1]"),
        ("Outpainting mk2", ["", 64, 8, ["north"]], "script_args[3]"),
        ("Outpainting mk2", ["", 64, 8, []], "script_args[3]"),
        ("Outpainting mk2", ["", 64, 8, ["left"], 1.0, 2.0], "script_args[5]"),
        ("Poor man's outpainting", [64], "script_args[0]"),  # the tiles' overlap, not below the 64 px tile
        ("Poor man's outpainting", [32, 4, "smudge"], "script_args[2]"),
        ("Poor man's outpainting", [32, -1], "script_args[1]"),
        ("Poor man's outpainting", [56], "script_args[0]"),  # 192 px canvas in 8 px steps: 17 x 17 tiles > 256 jobs
        ("X/Y/Z plot", [], "script_name"),
    ],
)
def test_bad_script_args_are_422_naming_the_argument(client: TestClient, engine: FakeEngine, script, args, field):
    assert_422_names(client.post(f"{SD}/img2img", json=body(script, args)), field)
    assert engine.requests == []


def test_img2img_scripts_are_not_txt2img_scripts(client: TestClient) -> None:
    r = client.post(f"{SD}/txt2img", json={"prompt": "x", "script_name": "SD upscale", "script_args": []})
    assert_422_names(r, "script_name")
    assert "Script 'SD upscale' not found" in r.text


# Outpainting ---------------------------------------------------------------------------------------------------------


def test_outpainting_mk2_grows_the_chosen_sides_only(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(f"{SD}/img2img", json=body("Outpainting mk2", ["", 64, 0, ["left", "down"]]))
    (out,) = images_of(r)
    assert out.size == (128, 128)
    left, down = engine.requests
    assert (left.task, left.width, left.height, left.seed) == (Task.INPAINT, 64, 64, 7)
    assert (left.inpaint.inpainting_fill, left.inpaint.full_res) == (1, False)
    assert (down.width, down.height, down.seed) == (128, 64, 7)  # every job keeps the request's seed
    assert out.getpixel((100, 30)) == (200, 10, 10)  # the picture, where it was put
    assert out.getpixel((10, 30)) == seed_color(7)  # the left strip from the first job
    assert out.getpixel((60, 100)) == seed_color(7)  # the bottom strip from the second
    # the job's input: the new strip is matched noise, the picture as it was, the mask white over the strip only
    mask = np.asarray(left.mask.convert("L"))
    assert mask[:, :64].min() == 255 and np.asarray(left.init_images[0])[:, :64].std() > 0
    assert one_pass_size(client, ["up"]) == (64, 128) and one_pass_size(client, ["right"]) == (128, 64)


def one_pass_size(client: TestClient, directions: list[str]) -> tuple[int, int]:
    (out,) = images_of(client.post(f"{SD}/img2img", json=body("Outpainting mk2", ["", 64, 8, directions])))
    return out.size


def test_outpainting_mk2_mask_blur_is_four_times_along_the_expanded_axis(client: TestClient, engine: FakeEngine):
    images_of(client.post(f"{SD}/img2img", json=body("Outpainting mk2", ["", 64, 4, ["right"]])))
    (job,) = engine.requests
    assert (job.inpaint.mask_blur, job.inpaint.mask_blur_y) == (16, 0)


def test_matched_noise_takes_the_pictures_colour_statistics() -> None:
    rng = np.random.default_rng(1)
    src = np.zeros((64, 128, 3))
    src[:, 64:] = rng.normal((0.7, 0.3, 0.2), 0.05, (64, 64, 3)).clip(0, 1)  # a reddish picture on the right
    mask = np.zeros_like(src)
    mask[:, :64] = 1.0  # fill the left half
    out = matched_noise(src.copy(), mask, noise_q=1.0, color_variation=0.05)
    fill, picture = out[:, :64].reshape(-1, 3), src[:, 64:].reshape(-1, 3)
    assert np.array_equal(out[:, 64:], src[:, 64:])  # the picture is kept
    assert np.abs(fill.mean(0) - picture.mean(0)).max() < 0.01  # per channel: the histograms are matched
    assert np.abs(fill.std(0) - picture.std(0)).max() < 0.01
    assert fill.std(0).min() > 0.02  # noise, not a flat colour


def test_split_and_combine_grid_round_trip() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8))
    grid = split_grid(image, 64, 64, 16)
    assert len(grid) == 3 * 2 and [t.x for t in grid.rows[0].tiles] == [0, 48, 96]
    assert np.abs(np.asarray(combine_grid(grid), np.int16) - np.asarray(image, np.int16)).max() <= 1


def test_poor_mans_outpainting_inpaints_the_border_tiles(client: TestClient, engine: FakeEngine) -> None:
    # 64x64 grown right by 32 -> 128x64 (rounded to 64); 64 px tiles overlapping by 32 at x 0, 32, 64: the first
    # lies inside the picture and is left alone, the other two are inpainted with seeds 7 and 8.
    payload = body("Poor man's outpainting", [32, 4, "fill", ["right"]], batch_size=2, n_iter=2)
    (out,) = images_of(client.post(f"{SD}/img2img", json=payload))  # one picture whatever the batch says
    assert out.size == (128, 64)
    assert [(q.task, q.seed, q.batch_size) for q in engine.requests] == [(Task.INPAINT, 7, 1), (Task.INPAINT, 8, 1)]
    first = engine.requests[0]
    assert (first.inpaint.mask_blur, first.inpaint.inpainting_fill, first.inpaint.full_res) == (8, 0, False)
    mask = np.asarray(first.mask.convert("L"))  # tile at x 32: the picture up to x 64 minus 2 * mask_blur kept
    assert mask[:, : 32 - 8].max() == 0 and mask[:, 32:].min() == 255
    assert out.getpixel((10, 30)) == (200, 10, 10)
    assert out.getpixel((120, 30)) == seed_color(8)


def test_outpainting_mk2_batch_returns_its_grid_first(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(f"{SD}/img2img", json=body("Outpainting mk2", ["", 64, 8, ["up"]], batch_size=2))
    images = images_of(r)
    assert [im.size for im in images] == [(128, 128), (64, 128), (64, 128)]  # A1111's grid of the two, then each
    assert info_of(r)["index_of_first_image"] == 1
    (job,) = engine.requests
    assert job.batch_size == 2 and len(job.init_images) == 2


def test_interrupt_stops_a_script_after_the_running_tile(client: TestClient, engine: FakeEngine) -> None:
    engine.block()
    result: dict = {}
    payload = body("SD upscale", ["", 0, "Nearest", 2])  # 4 tiles, one job each
    worker = threading.Thread(target=lambda: result.setdefault("r", client.post(f"{SD}/img2img", json=payload)))
    worker.start()
    engine.wait_for_running()
    assert client.post(f"{SD}/interrupt").status_code == 200
    engine.release()
    worker.join(10)
    (out,) = images_of(result["r"])
    assert out.size == (128, 128) and len(engine.requests) == 1  # no tile submitted after the interrupt
    assert out.getpixel((10, 10)) == seed_color(7) and out.getpixel((100, 100)) == (200, 10, 10)  # as upscaled
