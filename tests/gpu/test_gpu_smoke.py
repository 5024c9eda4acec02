"""The GPU smoke test (`scripts/gpu_smoke.sh`, under 3 minutes): a real `easel serve` on CUDA, on loopback, with the
demo models of every family, driven through real HTTP: txt2img, img2img and inpainting with a mask. Checks image
sizes, that a seed reproduces identical pixels, and that pixels outside the mask stay as they were. Skipped without
CUDA. `GPU_SMOKE_DEVICE=cpu` runs the same requests against a CPU server (to check the test itself, not the GPU);
`GPU_SMOKE_COMPILE=off` serves the demo models without torch.compile (the fast path's compile at load is then not
covered, but the run is shorter)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from server.settings import REPO_ROOT
from tests.image_helpers import b64_png, decode_b64

DEVICE = os.environ.get("GPU_SMOKE_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FAMILIES = ["demo-sd15", "demo-sdxl", "demo-flux", "demo-qwen-image"]
# The demo models' default size, which the server warms up (and compiles for) at load: no request pays a recompile.
SIZE = int(os.environ.get("GPU_SMOKE_SIZE", "512"))
STEPS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from local_server import local_server

    demo = tmp_path_factory.mktemp("demo-models")
    env = {"EASEL_DEVICE": DEVICE, "EASEL_MAX_STEPS": "50"}
    if os.environ.get("GPU_SMOKE_COMPILE") == "off":  # the HTTP path alone, without the compile at model load
        yaml = tmp_path_factory.mktemp("models") / "models.yaml"
        entries = "".join(
            f"  {m}:\n    family: {m.removeprefix('demo-')}\n    source: demo:{m.removeprefix('demo-')}\n"
            "    performance: {compile: 'off'}\n"
            for m in FAMILIES
        )
        yaml.write_text(f"default_model: demo-sd15\nmodels:\n{entries}")
        env["EASEL_MODELS"] = str(yaml)
    with local_server(env, demo_models=demo, startup_timeout_s=150) as live:
        yield live.url


def post(url: str, route: str, body: dict) -> dict:
    r = httpx.post(f"{url}/sdapi/v1/{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text[:2000]
    return r.json()


@pytest.mark.parametrize("model", FAMILIES)
def test_every_family_txt2img_img2img_inpaint_on_cuda(server: str, model: str) -> None:
    base = {"prompt": "a harbour at dawn", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 7}
    base["override_settings"] = {"sd_model_checkpoint": model}

    # txt2img: the size asked for, and the same seed gives the very same pixels.
    first = post(server, "txt2img", base)
    again = post(server, "txt2img", base)
    img = decode_b64(first["images"][0])
    assert img.size == (SIZE, SIZE) and json.loads(first["info"])["sd_model_name"] == model
    assert np.array_equal(np.asarray(img), np.asarray(decode_b64(again["images"][0]))), "same seed, different pixels"

    # img2img from a structured picture: the size of the request.
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = post(server, "img2img", {**base, "init_images": [b64_png(init)], "denoising_strength": 0.6})
    assert decode_b64(out["images"][0]).size == (SIZE, SIZE)

    # Inpainting: the masked square is repainted, everything outside it stays the input (composited back).
    mask = Image.new("L", (SIZE, SIZE), 0)
    lo, hi = SIZE // 4, 3 * SIZE // 4
    ImageDraw.Draw(mask).rectangle([lo, lo, hi - 1, hi - 1], fill=255)
    body = {
        **base,
        "init_images": [b64_png(init)],
        "mask": b64_png(mask),
        "denoising_strength": 0.9,
        "inpainting_fill": 1,
        "mask_blur": 0,
        "inpaint_full_res": False,
    }
    out_img = decode_b64(post(server, "img2img", body)["images"][0]).convert("RGB")
    assert out_img.size == (SIZE, SIZE)
    got, src = np.asarray(out_img, dtype=np.int16), np.asarray(init, dtype=np.int16)
    outside = np.ones((SIZE, SIZE), bool)
    outside[lo - 16 : hi + 16, lo - 16 : hi + 16] = False  # a margin for the latent grid at the mask's edge
    assert np.abs(got[outside] - src[outside]).max() <= 2
    inner = slice(lo + 16, hi - 16)
    assert np.abs(got[inner, inner] - src[inner, inner]).mean() > 5  # the masked square was repainted


@pytest.mark.skipif(DEVICE != "cuda", reason="a CPU dry run")
def test_the_engine_ran_on_the_gpu(server: str) -> None:
    """After the requests above: the engine's device is CUDA and it allocated device memory."""
    cuda = httpx.get(f"{server}/sdapi/v1/memory", timeout=10).json()["cuda"]
    assert "error" not in cuda, cuda
    assert cuda["allocated"]["peak"] > 0
