"""The official `openai` SDK, unchanged, against a real `easel serve` (the session's live_server, demo models on CPU).

Tiny sizes (64x64; the demo SDXL's multiple is 8) and 1 denoising step through the `steps` extension (extra_body).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

FAST = {"steps": 1}


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def decode(data: str | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    image.load()
    return image


def png_file(image: Image.Image, name: str) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return (name, buf.getvalue(), "image/png")


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_generate_b64_json_and_seeds_reproduce(client: openai.OpenAI) -> None:
    def make(seed: int) -> Image.Image:
        result = client.images.generate(
            model="gpt-image-1", prompt="a lighthouse", size="64x64", extra_body={**FAST, "seed": seed}
        )
        assert result.output_format == "png" and result.size == "64x64" and result.usage is not None
        (item,) = result.data or []
        assert item.url is None and item.revised_prompt is None
        image = decode(item.b64_json or "")
        assert image.format == "PNG" and image.size == (64, 64)
        return image

    first, again, other = make(7), make(7), make(8)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_generate_url_and_other_formats(client: openai.OpenAI, live_server: LiveServer) -> None:
    result = client.images.generate(
        prompt="a fox", size="80x64", n=2, response_format="url", output_format="jpeg", extra_body=FAST
    )
    assert len(result.data or []) == 2
    for item in result.data or []:
        assert item.url and item.url.startswith(f"{live_server.url}/v2/results/")
        fetched = httpx.get(item.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
        assert decode(fetched.content).size == (80, 64)

    result = client.images.generate(
        model="dall-e-3",
        prompt="a fox",
        size="64x64",
        output_format="webp",
        response_format="b64_json",
        extra_body=FAST,
    )
    image = decode((result.data or [])[0].b64_json or "")
    assert image.format == "WEBP" and image.size == (64, 64)


def test_seed_002_sdk_example_with_a_provider_prefixed_model(live_server: LiveServer) -> None:
    """IndoxHub's own example (seed 002): `base_url=".../v1"`, `model="openai/dall-e-3"`, a dall-e URL answer."""
    with openai.OpenAI(api_key="YOUR_API_KEY", base_url=f"{live_server.url}/v1", max_retries=0, timeout=300) as c:
        response = c.images.generate(
            model="openai/dall-e-3",
            prompt="A serene mountain landscape at sunset, photorealistic",
            size="64x64",  # the example's 1024x1024, small to stay fast on CPU
            n=1,
            extra_body=FAST,
        )
    url = (response.data or [])[0].url
    assert url and url.startswith(f"{live_server.url}/v2/results/")
    assert decode(httpx.get(url).content).size == (64, 64)


def test_transparent_background_has_real_alpha(client: openai.OpenAI, live_server: LiveServer) -> None:
    """models.yaml's background_removal model (the live server's tiny SegFormer) gives png and webp an alpha channel."""
    result = client.images.generate(
        prompt="a red apple", size="80x64", background="transparent", extra_body={**FAST, "seed": 2}
    )
    assert result.background == "transparent"
    image = decode((result.data or [])[0].b64_json or "")
    assert image.format == "PNG" and image.mode == "RGBA" and image.size == (80, 64)
    alpha = np.asarray(image.getchannel("A"))
    assert alpha.min() < 255 and len(np.unique(alpha)) > 8  # per-pixel, not all opaque

    result = client.images.generate(
        prompt="a red apple",
        size="64x64",
        background="transparent",
        output_format="webp",
        response_format="url",
        extra_body=FAST,
    )
    fetched = decode(httpx.get((result.data or [])[0].url or "").content)
    assert fetched.format == "WEBP" and fetched.mode == "RGBA" and fetched.size == (64, 64)
    assert np.asarray(fetched.getchannel("A")).min() < 255

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="64x64", background="transparent", output_format="jpeg")
    assert caught.value.param == "output_format"


def test_edit_with_mask_keeps_the_opaque_area(client: openai.OpenAI) -> None:
    source = noise(64, 64, seed=0)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 24, 64))  # transparent = edit: the left 24 columns
    result = client.images.edit(
        image=png_file(source, "source.png"), mask=png_file(mask, "mask.png"), prompt="a hat", extra_body=FAST
    )
    out = np.asarray(decode((result.data or [])[0].b64_json or "").convert("RGB"), dtype=np.int16)
    assert out.shape == (64, 64, 3)  # size auto: the image's
    original = np.asarray(source, dtype=np.int16)
    assert np.abs(out[:, 40:] - original[:, 40:]).max() <= 2  # opaque in the mask, clear of the blurred edge: kept
    assert np.abs(out[:, :16] - original[:, :16]).mean() > 10  # transparent: repainted


def test_edit_with_two_images(client: openai.OpenAI) -> None:
    """The SDK sends a list as `image[]` parts. The default edit model (demo SDXL) runs img2img from the first image;
    the edit model stitches both into one reference."""
    images = [png_file(noise(72, 64, seed=1), "a.png"), png_file(noise(64, 64, seed=2), "b.png")]
    # img2img runs steps x strength (0.75) denoising steps: 2 steps give 1
    result = client.images.edit(image=images, prompt="combine them", extra_body={"steps": 2})
    assert result.size == "72x64"
    assert decode((result.data or [])[0].b64_json or "").size == (72, 64)

    result = client.images.edit(
        image=images, prompt="combine them", model="demo-qwen-image-edit", size="64x64", extra_body=FAST
    )
    assert decode((result.data or [])[0].b64_json or "").size == (64, 64)


def test_create_variation_makes_distinct_images_near_the_source(client: openai.OpenAI) -> None:
    source = noise(64, 64, seed=4)
    # img2img runs steps x strength (0.6) denoising steps: 2 steps give 1
    result = client.images.create_variation(
        image=png_file(source, "source.png"), n=2, size="64x64", response_format="b64_json", extra_body={"steps": 2}
    )
    first, second = (np.asarray(decode(d.b64_json or "").convert("RGB"), dtype=np.int16) for d in result.data or [])
    assert first.shape == second.shape == (64, 64, 3)
    assert not np.array_equal(first, second)  # seed, seed + 1


def test_invalid_input_raises_bad_request_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="65x64", extra_body=FAST)
    assert caught.value.param == "size" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=png_file(noise(64, 64, 3), "a.png"), prompt="x", extra_body={"negative": "x"})
    assert caught.value.param == "negative" and caught.value.code == "unknown_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="a fox", model="no-such-model")
    assert missing.value.code == "model_not_found"
    names = {model.id for model in client.models.list()}
    assert {"demo-sdxl", "gpt-image-1", "dall-e-3"} <= names
