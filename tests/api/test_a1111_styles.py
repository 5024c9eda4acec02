"""A1111 prompt styles: GET /sdapi/v1/prompt-styles lists styles.yaml's presets, and `styles` in txt2img/img2img
applies them (in order) to the prompt and negative prompt the engine gets, as A1111's `apply_styles_to_prompt`
does. The infotext and `info` carry the styled prompts; `parameters` echoes the request as sent. Fake engine."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.registry import Registry
from server.app import create_app
from server.images import read_png_info
from server.settings import Settings
from server.styles import load_styles
from tests.api.fake_engine import FakeEngine

SD = "/sdapi/v1"
GW = "/v2/automatic1111/sdapi/v1"
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 3}

# A1111's merge rule in both forms: a `{prompt}` template, and a plain text appended after a comma.
STYLES_YAML = """
styles:
  noir:
    name: Film noir
    description: Black and white crime film
    prompt: "film noir still of {prompt}, high contrast"
    negative_prompt: "color"
  grain:
    name: Grain
    description: Added film grain
    prompt: "film grain"
    negative_prompt: "clean, {prompt}, smooth"
"""


@pytest.fixture
def styles_file(tmp_path: Path) -> Path:
    path = tmp_path / "styles.yaml"
    path.write_text(STYLES_YAML)
    return path


def make_client(engine: FakeEngine, registry: Registry, tmp_path: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", **settings), engine=engine, registry=registry))


@pytest.fixture
def engine(registry: Registry) -> Iterator[FakeEngine]:
    eng = FakeEngine(registry)
    yield eng
    eng.release()


@pytest.fixture
def client(engine: FakeEngine, registry: Registry, tmp_path: Path, styles_file: Path) -> Iterator[TestClient]:
    with make_client(engine, registry, tmp_path, styles=styles_file) as c:
        yield c


def txt2img(client: TestClient, prefix: str = SD, **fields: Any) -> dict[str, Any]:
    r = client.post(f"{prefix}/txt2img", json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def png_info(data: str) -> str:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    text = read_png_info(image)
    assert text is not None
    return text


@pytest.mark.parametrize("prefix", [SD, GW])
def test_prompt_styles_lists_the_presets(client: TestClient, prefix: str):
    r = client.get(f"{prefix}/prompt-styles")
    assert r.status_code == 200
    assert r.json() == [
        {"name": "Film noir", "prompt": "film noir still of {prompt}, high contrast", "negative_prompt": "color"},
        {"name": "Grain", "prompt": "film grain", "negative_prompt": "clean, {prompt}, smooth"},
    ]


def test_prompt_styles_default_file(engine: FakeEngine, registry: Registry, tmp_path: Path):
    with make_client(engine, registry, tmp_path) as c:
        listed = c.get(f"{SD}/prompt-styles").json()
        book = c.app.state.styles  # type: ignore[attr-defined]
    assert [s["name"] for s in listed] == [s.name for s in book]
    assert {"Cinematic", "Photograph", "Technical diagram"} <= {s["name"] for s in listed}
    cinematic = next(s for s in listed if s["name"] == "Cinematic")
    assert cinematic["prompt"].startswith("cinematic film still of {prompt}") and cinematic["negative_prompt"]


def test_styles_apply_in_order_to_prompt_and_negative(client: TestClient, engine: FakeEngine):
    txt2img(client, prompt="a detective", negative_prompt="blurry", styles=["Film noir", "Grain"])
    req = engine.requests[-1]
    assert req.prompt == "film noir still of a detective, high contrast, film grain"
    assert req.negative_prompt == "clean, blurry, color, smooth"

    txt2img(client, prompt="a detective", negative_prompt="blurry", styles=["Grain", "Film noir"])
    req = engine.requests[-1]
    assert req.prompt == "film noir still of a detective, film grain, high contrast"
    assert req.negative_prompt == "clean, blurry, smooth, color"


def test_style_ids_are_accepted_too(client: TestClient, engine: FakeEngine):
    txt2img(client, prompt="a cat", styles=["noir"])
    assert engine.requests[-1].prompt == "film noir still of a cat, high contrast"


def test_infotext_and_info_carry_the_styled_prompt(client: TestClient):
    body = txt2img(client, prompt="a detective", negative_prompt="blurry", styles=["Film noir"])
    styled, styled_negative = "film noir still of a detective, high contrast", "blurry, color"
    text = png_info(body["images"][0])
    assert text.startswith(f"{styled}\nNegative prompt: {styled_negative}\nSteps: 2")
    info = json.loads(body["info"])
    assert info["infotexts"] == [text]
    assert (info["prompt"], info["all_prompts"]) == (styled, [styled])  # A1111 Processed.js: all_prompts[0]
    assert (info["negative_prompt"], info["all_negative_prompts"]) == (styled_negative, [styled_negative])
    assert info["styles"] == ["Film noir"]
    params = body["parameters"]
    assert (params["prompt"], params["negative_prompt"], params["styles"]) == ("a detective", "blurry", ["Film noir"])


def test_unknown_styles_are_ignored_with_a_warning(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="easel.a1111"):
        body = txt2img(client, prompt="a cat", negative_prompt="dog", styles=["Nope", "Grain"])
    assert (engine.requests[-1].prompt, engine.requests[-1].negative_prompt) == (
        "a cat, film grain",
        "clean, dog, smooth",
    )
    assert json.loads(body["info"])["styles"] == ["Nope", "Grain"]
    assert any("unknown styles ignored: Nope" in r.getMessage() for r in caplog.records)
    assert not any("not applied" in r.getMessage() and "styles" in r.getMessage() for r in caplog.records)


def test_no_styles_leaves_the_prompt_as_sent(client: TestClient, engine: FakeEngine):
    body = txt2img(client, prompt="a cat", negative_prompt="dog", styles=None)
    assert (engine.requests[-1].prompt, engine.requests[-1].negative_prompt) == ("a cat", "dog")
    assert png_info(body["images"][0]).startswith("a cat\nNegative prompt: dog\n")


def test_img2img_and_gateway_apply_styles(client: TestClient, engine: FakeEngine):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    r = client.post(f"{SD}/img2img", json={**SMALL, "prompt": "a cat", "init_images": [init], "styles": ["Grain"]})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].prompt == "a cat, film grain"
    assert png_info(r.json()["images"][0]).startswith("a cat, film grain\n")

    txt2img(client, GW, prompt="a dog", styles=["Film noir"])
    assert engine.requests[-1].prompt == "film noir still of a dog, high contrast"


def test_async_gateway_txt2img_applies_styles(client: TestClient, engine: FakeEngine):
    r = client.post(f"{GW}/txt2img", json={**SMALL, "prompt": "a dog", "styles": ["Grain"], "async": True})
    assert r.status_code == 202, r.text
    assert engine.requests[-1].prompt == "a dog, film grain"


def test_shipped_presets_match_a1111_rule():
    """The presets in styles.yaml as A1111 would apply them (the same `Style.apply` serves every dialect)."""
    book = load_styles(Path(__file__).resolve().parents[2] / "styles.yaml")
    photo = book.by_name("Photograph")
    assert photo is not None
    prompt, negative = photo.apply("a fox", "")
    assert prompt == photo.prompt.replace("{prompt}", "a fox") and negative == photo.negative_prompt
