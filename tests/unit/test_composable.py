"""A1111 `AND` composable prompts: the parser, the combination `ComposedUNet` computes, and on the demo SD1.5/SDXL
models the conditioning and noise predictions a call really uses; batching of composable requests in the engine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from pipelines.batching import batch_key
from pipelines.composable import ComposedUNet, StepConditioning, merged
from pipelines.families import adapter_for
from pipelines.families.base import LoadedModel
from pipelines.prompt_embeds import encode_sd15, encode_sdxl
from pipelines.prompts import SubPrompt, is_composable, split_and
from pipelines.request import GenerationRequest
from pipelines.sampler_names import resolve_sampler
from tests.engine_helpers import demo_registry, record_calls, start_engine


def _req(family: str = "sd15", **kw) -> GenerationRequest:
    base = dict(model=f"demo-{family}", prompt="a red fox", width=64, height=64, steps=2, guidance=4.0, seed=11)
    return GenerationRequest(**{**base, **kw})


def _image(loaded: LoadedModel, family: str = "sd15", **kw) -> np.ndarray:
    images = adapter_for(family).run(loaded, _req(family, width=32, height=32, **kw), [11], None, lambda s, t: False)
    return np.asarray(images[0].convert("RGB"), dtype=np.int16)


# The parser --------------------------------------------------------------------------------------------------------


def test_split_and_follows_a1111() -> None:
    assert split_and("a cat AND a dog:0.5") == [SubPrompt("a cat", 1.0), SubPrompt(" a dog", 0.5)]
    assert split_and("a AND b : -2 AND c:.5 ") == [SubPrompt("a"), SubPrompt(" b", -2.0), SubPrompt(" c", 0.5)]
    assert split_and("x:1.5") == [SubPrompt("x", 1.5)]  # one part with a weight scales its guidance
    # Only the uppercase word separates; emphasis and prompt editing keep their colons.
    for plain in ("cats and dogs", "ANDROID", "x_AND_y", "(cat:1.2)", "[cat:dog:5]", "a [cat:dog:0.5]"):
        assert split_and(plain) == [SubPrompt(plain)] and not is_composable(plain)
    assert split_and("a ANDb") == [SubPrompt("a ANDb")]
    assert is_composable("a AND b") and is_composable("a:2") and not is_composable("a cat")
    parts = [SubPrompt("a"), SubPrompt("b", 0.0), SubPrompt(" a ", 0.5), SubPrompt("c", 1), SubPrompt("c", -1)]
    assert merged(parts) == [SubPrompt("a", 1.5)]  # one entry per text (whitespace aside), zero weights dropped


def test_batch_key_keeps_composable_prompts_apart() -> None:
    choice = resolve_sampler("Euler", None)

    def key(prompt: str):
        return batch_key("job", _req(prompt=prompt), choice)

    assert key("a AND b") == key("c AND d AND e:0.3") != key("a b")
    assert key("a b <lora:x:0.5>") != key("a b:0.5 <lora:x:0.5>")


# The combination ---------------------------------------------------------------------------------------------------


class _FakeUNet:
    """Deterministic stand-in: the prediction depends on the latents, the conditioning and the pooled embedding."""

    config = "the wrapped UNet's config"

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True, **kw):
        self.calls.append((sample, encoder_hidden_states))
        out = sample * 0.5 + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        if added_cond_kwargs is not None:
            out = out + added_cond_kwargs["text_embeds"].sum(dim=1)[:, None, None, None]
            out = out + added_cond_kwargs["time_ids"][:, :1, None, None]
        return (out,)


def test_composed_unet_returns_uncond_plus_weighted_part_terms() -> None:
    torch.manual_seed(0)
    uncond, parts = torch.randn(2, 3, 4), torch.randn(3, 3, 4)  # image 0 has two parts, image 1 one part
    pooled_u, pooled_c = torch.randn(2, 5), torch.randn(3, 5)
    fake = _FakeUNet()
    weights = [[1.0, 0.5], [2.0]]
    unet = ComposedUNet(fake, weights, [StepConditioning(uncond, parts, pooled_u, pooled_c)])
    assert unet.config == fake.config  # the pipeline reads the real UNet's attributes through it
    latents = torch.randn(2, 4, 2, 2)
    time_ids = torch.tensor([[1.0], [2.0]])
    added = {"text_embeds": torch.zeros(4, 5), "time_ids": torch.cat([time_ids, time_ids])}
    out = unet(torch.cat([latents, latents]), 10, torch.zeros(4, 3, 4), added_cond_kwargs=added, return_dict=False)[0]

    def alone(x, cond, pooled, tid):
        return fake(x[None], 10, cond[None], {"text_embeds": pooled[None], "time_ids": tid[None]})[0][0]

    u = [alone(latents[j], uncond[j], pooled_u[j], time_ids[j]) for j in range(2)]
    c = [alone(latents[j], parts[k], pooled_c[k], time_ids[j]) for j, k in ((0, 0), (0, 1), (1, 2))]
    torch.testing.assert_close(out[:2], torch.stack(u))
    torch.testing.assert_close(out[2], u[0] + 1.0 * (c[0] - u[0]) + 0.5 * (c[1] - u[0]))
    torch.testing.assert_close(out[3], u[1] + 2.0 * (c[2] - u[1]))
    # One UNet call on the negatives then every part, each part with its image's latents.
    (sample, hidden), *_ = fake.calls
    assert torch.equal(sample, torch.stack([latents[0], latents[1], latents[0], latents[0], latents[1]]))
    assert torch.equal(hidden, torch.cat([uncond, parts]))
    # Without CFG in the pipeline (guidance <= 1) the combination is the whole output.
    no_cfg = unet(latents, 10, torch.zeros(2, 3, 4), added_cond_kwargs={**added, "time_ids": time_ids})
    torch.testing.assert_close(no_cfg.sample, out[2:])


# On the demo models --------------------------------------------------------------------------------------------------


def _record(monkeypatch, loaded: LoadedModel):
    """Every UNet call's conditioning and output, and every noise prediction the scheduler steps with."""
    unet_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    steps: list[torch.Tensor] = []
    unet_cls = type(loaded.base.unet)
    forward = unet_cls.forward
    step = EulerDiscreteScheduler.step

    def spy_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        out = forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)
        unet_calls.append((encoder_hidden_states.clone(), (out[0] if isinstance(out, tuple) else out.sample).clone()))
        return out

    def spy_step(self, model_output, *args, **kwargs):
        steps.append(model_output.clone())
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(unet_cls, "forward", spy_forward)
    monkeypatch.setattr(EulerDiscreteScheduler, "step", spy_step)
    return unet_calls, steps


def test_and_evaluates_each_part_and_combines_per_a1111(load, monkeypatch) -> None:
    loaded = load("sd15")
    pipe = loaded.base
    unet_calls, steps = _record(monkeypatch, loaded)
    freed_with: list = []  # the UNet in place when the pipeline re-arms CPU-offload hooks at the end of its call
    free = type(pipe).maybe_free_model_hooks
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: freed_with.append(self.unet) or free(self))
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    req = _req(prompt="a red fox AND a cat:0.5 AND a red fox:-0.25", guidance=3.0)
    adapter_for("sd15").run(loaded, req, [11], euler, lambda s, t: False)
    monkeypatch.undo()
    assert freed_with == [pipe.unet] and pipe.unet is loaded.base.unet  # the cached pipeline never saw the wrapper
    want = encode_sd15(pipe, ["a red fox", " a cat"], [""])
    assert len(unet_calls) == len(steps) == 2
    for (hidden, out), noise in zip(unet_calls, steps, strict=True):
        # Rows: the negative, then each distinct part once ("a red fox" twice: weights 1 - 0.25 added).
        torch.testing.assert_close(hidden, torch.cat([want["negative_prompt_embeds"], want["prompt_embeds"]]))
        u, fox, cat = out
        torch.testing.assert_close(noise[0], u + 3.0 * (0.75 * (fox - u) + 0.5 * (cat - u)), rtol=1e-5, atol=1e-5)


def test_zero_weight_part_is_inert_and_doubling_a_part_doubles_the_guidance(load) -> None:
    loaded = load("sd15")
    fox = _image(loaded, prompt="a red fox")
    assert np.array_equal(_image(loaded, prompt="a red fox AND a cat:0"), fox)
    assert np.array_equal(_image(loaded, prompt="a red fox <lora:nowhere:1> AND a cat:0", skip_missing_loras=True), fox)
    both = _image(loaded, prompt="a red fox AND a cat")
    assert np.abs(both - fox).max() > 2
    doubled = _image(loaded, prompt="a red fox:1 AND a red fox", guidance=4.0)
    twice_the_cfg = _image(loaded, prompt="a red fox", guidance=8.0)
    assert np.abs(doubled - twice_the_cfg).max() <= 1 and np.abs(twice_the_cfg - fox).max() > 2
    # One weighted part: A1111 scales its guidance term (u + 2 * g * (c - u)).
    assert np.abs(_image(loaded, prompt="a red fox:2", guidance=4.0) - twice_the_cfg).max() <= 1


def test_sdxl_parts_bring_their_pooled_embeddings_and_prompt_editing(load, monkeypatch) -> None:
    loaded = load("sdxl")
    pipe = loaded.base
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = type(pipe.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append((encoder_hidden_states.clone(), kwargs["added_cond_kwargs"]["text_embeds"].clone()))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    req = _req("sdxl", prompt="a [cat:dog:1] AND a tree:0.5", negative_prompt="blur", steps=3)
    adapter_for("sdxl").run(loaded, req, [11], euler, lambda s, t: False)
    monkeypatch.undo()
    assert len(seen) == 3
    for k, (hidden, pooled) in enumerate(seen):  # step k uses "a cat" up to step 1, then "a dog" (A1111's schedule)
        want = encode_sdxl(pipe, ["a cat" if k <= 1 else "a dog", " a tree"], ["blur"])
        torch.testing.assert_close(hidden, torch.cat([want["negative_prompt_embeds"][:1], want["prompt_embeds"]]))
        torch.testing.assert_close(pooled[1:], want["pooled_prompt_embeds"])


# In the engine -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    eng = start_engine(data_dir, demo_registry(tmp_path_factory), max_batch=8)
    yield eng
    eng.stop()


def test_composable_requests_share_a_call_apart_from_plain_ones(engine, monkeypatch) -> None:
    recorded = record_calls(monkeypatch)
    blocker = engine.submit(_req(prompt="blocker", steps=2000))
    while blocker.progress.sampling_step < 1:
        time.sleep(0.01)
    two = engine.submit(_req(prompt="a fox AND a cat:0.5", seed=30, batch_size=2))
    plain = engine.submit(_req(prompt="a fox", seed=40))
    three = engine.submit(_req(prompt="a boat AND sea AND sky:0.3", seed=50))
    blocker.cancel()
    results = [job.wait_sync(60) for job in (two, plain, three)]
    calls = [[prompt for prompt, _ in call] for call in recorded]
    assert sorted(calls[1:]) == sorted([["a fox AND a cat:0.5", "a boat AND sea AND sky:0.3"], ["a fox"]])
    assert results[0].seeds == [30, 31] and results[2].seeds == [50]
    # Each image is the one its seed makes alone (batched kernels may round a level differently).
    alone = engine.submit(_req(prompt="a boat AND sea AND sky:0.3", seed=50)).wait_sync(60)
    diff = np.abs(np.asarray(alone.images[0], np.int16) - np.asarray(results[2].images[0], np.int16))
    assert diff.max() <= 2
