"""S7: small requests cannot allocate large images. The decoded-pixel cap (S3) bounds the inputs; every image made
from them (resized to the output, the mask, the "only masked" paste-back, stitched references) is sized before it
is allocated and refused with a 4xx naming the field in the dialect's shape. Image preparation runs under a
concurrency limit with a bounded wait (429 beyond it), not in the HTTP thread pool.

The reproductions: a 91-byte 1x2000 PNG with A1111 `resize_mode` 1 made a 512x1024000 intermediate (2 GiB); a
1x16000 and a 4096x4096 image stitched by an OpenAI edit made 16000x16000. Scaled down here (small caps) so the
refusals are checked without the allocations.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.errors import InvalidRequest, QueueFull
from pipelines.imageprep import prepare_inpaint, resize_image, resize_work_pixels
from pipelines.registry import Registry
from pipelines.request import InpaintOptions
from server.app import create_app
from server.imagework import PrepGate
from server.settings import Settings
from tests.api.fake_engine import FakeEngine


def png_b64(width: int, height: int, color: Any = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def make_client(tmp_path: Path, registry: Registry) -> Iterator[Any]:
    opened: list[tuple[TestClient, FakeEngine]] = []

    def make(**overrides: Any) -> tuple[TestClient, FakeEngine]:
        settings = Settings(data_dir=tmp_path / f"data{len(opened)}", **overrides)
        engine = FakeEngine(registry)
        client = TestClient(create_app(settings, engine=engine, registry=registry))
        client.__enter__()
        opened.append((client, engine))
        return client, engine

    yield make
    for client, engine in opened:
        engine.release()
        client.__exit__(None, None, None)


# The arithmetic -----------------------------------------------------------------------------------------------------


def test_crop_and_resize_work_size_is_what_resize_image_makes() -> None:
    # A1111's "crop and resize" covers the frame first: 1x2000 -> 512x1024000 before the crop.
    assert resize_work_pixels((1, 2000), 512, 512, 1) == 512 * 1_024_000
    assert resize_work_pixels((1, 2000), 512, 512, 0) == 512 * 512
    assert resize_work_pixels((1, 2000), 512, 512, 2) == 512 * 512  # fits inside: never above the output
    small = Image.new("RGB", (3, 40), "red")
    # The prediction matches the real intermediate: 3x40 covering 16x16 is 16x213.
    assert resize_work_pixels(small.size, 16, 16, 1) == 16 * 213
    assert resize_image(small, 16, 16, 1).size == (16, 16)


def test_only_masked_paste_back_is_bounded_before_it_is_made() -> None:
    # A thin region against the image's edge: pasting the 64x64 result back covers 40x2000 with a 2000x2000 image.
    init = Image.new("RGB", (40, 2000), "blue")
    mask = Image.new("L", (40, 2000), 255)
    opts = InpaintOptions(mask_blur=0, full_res=True, full_res_padding=0)
    with pytest.raises(InvalidRequest) as e:
        prepare_inpaint(init, mask, 64, 64, opts, max_pixels=1_000_000)
    assert e.value.field == "init_images" and "max_work_pixels=1000000" in e.value.message
    assert prepare_inpaint(init, mask, 64, 64, opts, max_pixels=None).output_size == (40, 2000)


# A1111 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height", [2000, 100_000])
def test_a1111_crop_and_resize_of_a_sliver_is_a_422_naming_init_images(make_client, height: int) -> None:
    client, engine = make_client()
    body = {"init_images": [png_b64(1, height)], "resize_mode": 1, "width": 512, "height": 512, "steps": 1}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert "init_images" in r.json()["errors"] and "max_work_pixels" in r.text
    assert engine.requests == []  # refused before submission: no credit, no queue slot
    ok = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 0})  # the same image plainly resized is fine
    assert ok.status_code == 200, ok.text


def test_a1111_mask_is_bounded_too(make_client) -> None:
    client, _ = make_client()
    body = {
        "init_images": [png_b64(64, 64)],
        "mask": png_b64(1, 3000, (255, 255, 255)),
        "inpaint_full_res": 0,  # whole picture: the mask is resized like the image
        "resize_mode": 1,
        "width": 512,
        "height": 512,
        "steps": 1,
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert "mask" in r.json()["errors"]


# Stitching (OpenAI edits, gateway references) -----------------------------------------------------------------------


def test_openai_edit_stitching_is_bounded_in_openai_shape(make_client) -> None:
    client, engine = make_client(max_work_pixels=1_000_000)

    def edit(*sizes: tuple[int, int]) -> Any:
        files = []
        for i, (w, h) in enumerate(sizes):
            files.append(("image[]", (f"{i}.png", base64.b64decode(png_b64(w, h)), "image/png")))
        data = {"prompt": "add a hat", "model": "demo-qwen-image-edit", "size": "64x64"}
        return client.post("/v1/images/edits", data=data, files=files)

    r = edit((1, 1600), (400, 400))  # 400x400 at 1600 px high: 1601x1600 = 2.56 M pixels
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "image" and "max_work_pixels=1000000" in error["message"]
    assert engine.requests == []
    assert edit((64, 64), (400, 400)).status_code == 200  # similar heights: stitched as before


def test_gateway_reference_stitching_is_bounded(make_client, tmp_path: Path, registry: Registry) -> None:
    edit_routes = Registry(list(registry), routes={"flux": "demo-qwen-image-edit"})
    settings = Settings(data_dir=tmp_path / "gw", max_work_pixels=1_000_000)
    engine = FakeEngine(edit_routes)
    with TestClient(create_app(settings, engine=engine, registry=edit_routes)) as client:
        body = {"prompt": "x", "width": 64, "height": 64, "input_image": png_b64(1, 1600)}
        r = client.post("/v2/image/flux/generate", json={**body, "input_image_2": png_b64(400, 400)})
        engine.release()
    assert r.status_code == 422, r.text
    assert "input_image" in r.text and "max_work_pixels" in r.text


# Admission of image preparation ------------------------------------------------------------------------------------


def test_prep_gate_bounds_running_and_waiting() -> None:
    gate = PrepGate(concurrency=1, max_waiting=1)
    running = peak = 0
    lock = threading.Lock()

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return "done"

    async def main() -> list[Any]:
        return await asyncio.gather(*(gate.run(work) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:2] == ["done", "done"] and isinstance(results[2], QueueFull)
    assert peak == 1 and gate.pending == 0


def test_a1111_image_decoding_runs_under_the_prep_limit(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.api.a1111 import generation

    client, _ = make_client(image_prep_concurrency=1, queue_size=1)
    decode = generation.decode_inputs
    running = peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def held_decode(*args: Any) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(20)  # held until the refusals are seen: no timing assumptions
        with lock:
            running -= 1
        return decode(*args)

    monkeypatch.setattr(generation, "decode_inputs", held_decode)
    body = {"init_images": [png_b64(64, 64)], "width": 64, "height": 64, "steps": 1}
    statuses: list[int] = []

    def call() -> None:
        statuses.append(client.post("/sdapi/v1/img2img", json=body).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(statuses) < 2:  # one decoding, one waiting for the limit: the other two are refused at once
        assert time.monotonic() < deadline, statuses
        time.sleep(0.01)
    assert statuses == [429, 429] and peak == 1
    release.set()
    for t in threads:
        t.join(30)
    assert peak == 1  # never two decodes at once
    assert sorted(statuses) == [200, 200, 429, 429], statuses


# Queued jobs hold output-sized inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_presizing_is_exactly_the_engines_resize(mode: int) -> None:
    from pipelines.imageprep import flatten, presize_inputs
    from pipelines.request import GenerationRequest, Task

    rng = np.random.default_rng(mode)
    big = Image.fromarray(rng.integers(0, 255, (1100, 1300, 3), dtype=np.uint8), mode="RGB")
    req = GenerationRequest(model="m", prompt="p", width=64, height=48, task=Task.IMG2IMG, init_images=[big])
    req = dataclasses.replace(req, resize_mode=mode)
    presized = presize_inputs(req)
    assert presized.init_images[0].size == (64, 48)
    direct = resize_image(flatten(big), 64, 48, mode)
    again = resize_image(flatten(presized.init_images[0]), 64, 48, mode)  # what the engine then does
    assert np.array_equal(np.asarray(direct), np.asarray(again))


def test_large_img2img_inputs_are_queued_at_the_output_size(make_client) -> None:
    client, engine = make_client()
    body = {"init_images": [png_b64(1500, 1500)], "width": 64, "height": 64, "steps": 1}
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 200
    assert engine.requests[-1].init_images[0].size == (64, 64)
    small = {**body, "init_images": [png_b64(80, 80)]}  # small inputs stay as sent
    assert client.post("/sdapi/v1/img2img", json=small).status_code == 200
    assert engine.requests[-1].init_images[0].size == (80, 80)
