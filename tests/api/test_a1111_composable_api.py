"""The A1111 wire side of `AND` composable prompts (fake engine): the prompt reaches the engine and the infotext as
sent; on FLUX (no per-part guidance) the infotext and `extra_generation_params` say it was not applied. The
combination itself is tested on the demo models in tests/unit/test_composable.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry, load_registry
from server.api.a1111.generation import COMPOSABLE_KEY, COMPOSABLE_NOT_APPLIED
from server.app import create_app
from tests.api.fake_engine import FakeEngine
from tests.api.test_a1111 import MODELS_YAML, SD, info_of, make_settings

PROMPT = "a fox AND a cat:0.5 <lora:none:1>"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[FakeEngine]:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    eng = FakeEngine(load_registry(path))
    yield eng
    eng.release()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    registry: Registry = engine.registry
    with TestClient(create_app(make_settings(), engine=engine, registry=registry)) as c:
        yield c


def test_and_prompt_reaches_the_engine_and_infotext_as_sent(client: TestClient, engine: FakeEngine) -> None:
    info = info_of(client.post(f"{SD}/txt2img", json={"prompt": PROMPT, "steps": 2}))
    assert engine.requests[-1].prompt == PROMPT
    assert info["prompt"] == PROMPT and info["all_prompts"] == [PROMPT]
    assert info["infotexts"][0].startswith(PROMPT + "\n")
    assert COMPOSABLE_KEY not in info["extra_generation_params"] and COMPOSABLE_KEY not in info["infotexts"][0]


def test_and_prompt_on_flux_says_it_was_not_applied(client: TestClient, engine: FakeEngine) -> None:
    flux = {"sd_model_checkpoint": "demo-flux"}
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "override_settings": flux}
    info = info_of(client.post(f"{SD}/txt2img", json=body))
    assert engine.requests[-1].model == "demo-flux" and engine.requests[-1].prompt == PROMPT
    assert info["extra_generation_params"][COMPOSABLE_KEY] == COMPOSABLE_NOT_APPLIED
    assert f"{COMPOSABLE_KEY}: {COMPOSABLE_NOT_APPLIED}," in info["infotexts"][0]
    # A plain prompt carries no such note; "and" in lowercase is a word, not a separator.
    info = info_of(client.post(f"{SD}/txt2img", json={**body, "prompt": "a fox and a cat"}))
    assert COMPOSABLE_KEY not in info["extra_generation_params"]
