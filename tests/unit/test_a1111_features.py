"""A1111 generation features on the demo SD models, each checked by its mechanism (the noise, convolutions,
conditioning and models actually used): variation seeds, tiling, textual-inversion embeddings, prompt editing and
alternation, the SDXL refiner."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from pipelines.embedding_files import listing
from pipelines.embeddings import TextualInversions
from pipelines.families import adapter_for
from pipelines.families.base import BatchItem
from pipelines.prompt_embeds import CacheScope, encode_sd15, encode_sdxl
from pipelines.prompt_schedules import prompt_schedule, text_at_step
from pipelines.request import GenerationRequest, Task
from pipelines.text_cache import TextEmbeddingCache
from pipelines.tiling import tiling_convs
from tests.image_helpers import pixels


def _req(family: str = "sd15", **kw) -> GenerationRequest:
    base = dict(model=f"demo-{family}", prompt="a red fox", width=64, height=64, steps=2, guidance=4.0, seed=11)
    return GenerationRequest(**{**base, **kw})


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), (120, 80, 40))


def _spy_latents(monkeypatch, cls=StableDiffusionPipeline) -> list:
    """Record the `latents` argument and result of every prepare_latents call."""
    calls: list = []
    original = cls.prepare_latents

    def spy(self, *args, **kwargs):
        given = kwargs.get("latents", args[7] if len(args) > 7 else None)
        out = original(self, *args, **kwargs)
        calls.append((given, out, float(self.scheduler.init_noise_sigma)))
        return out

    monkeypatch.setattr(cls, "prepare_latents", spy)
    return calls


def a1111_slerp(val, low, high):  # A1111 v1.10 modules/rng.py, as written there
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _cpu_noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


# Variation seeds -----------------------------------------------------------------------------------------------------


def test_variation_noise_is_a1111_slerp_of_seed_and_subseed(load, monkeypatch) -> None:
    loaded = load("sd15")
    calls = _spy_latents(monkeypatch)
    req = _req(subseed=100, subseed_strength=0.3)
    adapter_for("sd15").run(loaded, req, [11, 12], None, lambda s, t: False)
    given, used, sigma = calls[-1]
    f = loaded.base.vae_scale_factor
    shape = (loaded.base.unet.config.in_channels, 64 // f, 64 // f)
    # Image i: seed + i and subseed + i, as A1111.
    expected = torch.stack([a1111_slerp(0.3, _cpu_noise(11 + i, shape), _cpu_noise(100 + i, shape)) for i in range(2)])
    assert given is not None
    torch.testing.assert_close(given, expected)
    torch.testing.assert_close(used, expected * sigma)
    assert not torch.allclose(expected[0], _cpu_noise(11, shape))  # really mixed


def test_variation_strength_zero_and_one(load, monkeypatch) -> None:
    loaded, adapter = load("sd15"), adapter_for("sd15")
    calls = _spy_latents(monkeypatch)

    def run(**kw):
        return adapter.run(loaded, _req(**kw), [kw.get("seed", 11)], None, lambda s, t: False)[0]

    plain = run()
    assert calls[-1][0] is None  # the pipeline draws its own noise
    zero = run(subseed=555, subseed_strength=0.0)
    assert calls[-1][0] is None
    assert np.array_equal(pixels(zero), pixels(plain))  # strength 0: the plain seed's image
    full = run(subseed=77, subseed_strength=1.0)
    assert np.abs(pixels(full) - pixels(run(seed=77))).max() <= 1  # strength 1: the subseed's image


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_variation_seeds_on_packed_latents(load, family: str) -> None:
    """FLUX/Qwen-Image: the mixed noise is packed as the pipeline packs its own, so strength 0 is the plain seed
    (the pipeline's own noise) and strength 1 the subseed's image."""
    loaded, adapter = load(family), adapter_for(family)

    def run(**kw):
        req = _req(family, width=32, height=32, steps=2, **kw)
        return pixels(adapter.run(loaded, req, [req.seed], None, lambda s, t: False)[0])

    assert np.array_equal(run(subseed=9, subseed_strength=0.0), run())
    assert np.abs(run(subseed=9, subseed_strength=1.0) - run(seed=9)).max() <= 1
    assert not np.array_equal(run(subseed=9, subseed_strength=0.5), run())


def test_seed_resize_pastes_the_smaller_noise_in_the_middle(load, monkeypatch) -> None:
    loaded = load("sd15")
    calls = _spy_latents(monkeypatch)
    f = loaded.base.vae_scale_factor
    req = _req(width=64, height=64, seed_resize_from_w=32, seed_resize_from_h=32)
    adapter_for("sd15").run(loaded, req, [11], None, lambda s, t: False)
    given = calls[-1][0][0]
    c, n, small = given.shape[0], 64 // f, 32 // f
    d = (n - small) // 2
    torch.testing.assert_close(given[:, d : d + small, d : d + small], _cpu_noise(11, (c, small, small)))
    outside = _cpu_noise(11, (c, n, n))
    torch.testing.assert_close(given[:, :d, :], outside[:, :d, :])


# Tiling --------------------------------------------------------------------------------------------------------------


def _seam(image) -> float:
    """How much the left and right edges differ, relative to neighbouring columns inside the image."""
    a = pixels(image).astype(np.float64)
    seam = np.abs(a[:, 0] - a[:, -1]).mean()
    inner = np.abs(a[:, 1:] - a[:, :-1]).mean()
    return seam / max(inner, 1e-6)


def test_tiling_pads_circularly_during_the_call_only(load) -> None:
    loaded, adapter = load("sd15"), adapter_for("sd15")
    convs = tiling_convs(loaded.base)
    assert any(c in set(loaded.base.vae.modules()) for c in convs)
    assert any(c in set(loaded.base.unet.modules()) for c in convs)
    modes: list[set[str]] = []

    def on_step(step: int, total: int) -> bool:
        modes.append({c.padding_mode for c in convs})
        return False

    tiled = adapter.run(loaded, _req(tiling=True, steps=3), [3], None, on_step)[0]
    assert modes and all(m == {"circular"} for m in modes)
    assert {c.padding_mode for c in convs} == {"zeros"}  # restored
    plain = adapter.run(loaded, _req(steps=3), [3], None, lambda s, t: False)[0]
    assert _seam(tiled) < _seam(plain)


# Textual-inversion embeddings ----------------------------------------------------------------------------------------


def _first_layer_input(encoder) -> tuple[list, object]:
    """Capture the hidden states entering the encoder's first transformer layer (token + position embeddings)."""
    seen: list = []
    model = getattr(encoder, "text_model", encoder)

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    return seen, model.encoder.layers[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_embedding_vectors_replace_the_name_tokens(load, tmp_path: Path) -> None:
    loaded = load("sd15")
    pipe = loaded.base
    encoder = pipe.text_encoder
    dim = encoder.get_input_embeddings().embedding_dim
    vectors = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors}, str(folder / "foxstyle.safetensors"))
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)}, str(folder / "xlonly.safetensors"))

    listed = listing(folder, "sd15")
    assert listed["loaded"]["foxstyle"]["vectors"] == 2 and listed["loaded"]["foxstyle"]["shape"] == dim
    assert "xlonly" in listed["skipped"]
    assert "xlonly" in listing(folder, "sdxl")["loaded"]

    inversions = TextualInversions(folder)
    cache = CacheScope(TextEmbeddingCache())
    seen, handle = _first_layer_input(encoder)
    try:
        with_emb = encode_sd15(pipe, ["a foxstyle"], [""], cache=cache, embeddings=inversions)["prompt_embeds"]
    finally:
        handle.remove()
    name_ids = pipe.tokenizer(["a"], add_special_tokens=False)["input_ids"][0]
    start = 1 + len(name_ids)  # after BOS and "a"
    positions = getattr(encoder, "text_model", encoder).embeddings.position_embedding.weight
    hidden = seen[0][0]
    torch.testing.assert_close(hidden[start : start + 2], vectors + positions[start : start + 2])
    # The same words without the embedding folder: different tokens, so a different text-cache entry and output.
    without = encode_sd15(pipe, ["a foxstyle"], [""], cache=cache)["prompt_embeds"]
    assert with_emb.shape == without.shape and not torch.allclose(with_emb, without)
    again = encode_sd15(pipe, ["a foxstyle"], [""], cache=cache, embeddings=inversions)["prompt_embeds"]
    torch.testing.assert_close(again, with_emb)


def test_sdxl_embedding_uses_clip_l_and_clip_g(load, tmp_path: Path) -> None:
    pipe = load("sdxl").base
    dims = [e.get_input_embeddings().embedding_dim for e in (pipe.text_encoder, pipe.text_encoder_2)]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vec_l, vec_g = torch.randn(1, dims[0]), torch.randn(1, dims[1])
    save_file({"clip_l": vec_l, "clip_g": vec_g}, str(folder / "xlstyle.safetensors"))
    seen_l, h1 = _first_layer_input(pipe.text_encoder)
    seen_g, h2 = _first_layer_input(pipe.text_encoder_2)
    try:
        encode_sdxl(pipe, ["xlstyle"], [""], embeddings=TextualInversions(folder))
    finally:
        h1.remove()
        h2.remove()
    for seen, vec, enc in ((seen_l, vec_l, pipe.text_encoder), (seen_g, vec_g, pipe.text_encoder_2)):
        positions = getattr(enc, "text_model", enc).embeddings.position_embedding.weight
        torch.testing.assert_close(seen[0][0][1], vec[0] + positions[1])


# Prompt editing and alternation --------------------------------------------------------------------------------------


def test_prompt_schedules_follow_a1111() -> None:
    # Examples of A1111's prompt_parser doctests.
    assert prompt_schedule("a [b:.5] c", 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10) == [(10, "a  c")]
    assert prompt_schedule("[fe|]male", 3) == [(1, "female"), (2, "male"), (3, "female")]
    assert prompt_schedule("[a:[b:c:7]:3]", 10) == [(3, "a"), (7, "b"), (10, "c")]
    assert prompt_schedule("((a][:b:c [d:3]", 10) == [(3, "((a][:b:c "), (10, "((a][:b:c d")]
    assert prompt_schedule("(a:[b:c:2])", 4) == [(2, "(a:b)"), (4, "(a:c)")]
    assert prompt_schedule("plain (x:1.2) [y]", 5) == [(5, "plain (x:1.2) [y]")]
    # A hires second pass of 10 steps after 20: step numbers count on, fractions from 1.0 (A1111's hires_steps).
    assert prompt_schedule("[a:b:25]", 10, base_steps=20) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, base_steps=20) == [(10, "b")]
    assert prompt_schedule("[a:b:1.5]", 10, base_steps=20) == [(5, "a"), (10, "b")]
    # Sampling step k uses the first entry ending at or after k (A1111's reconstruct_cond_batch).
    schedule = prompt_schedule("[cat:dog:2]", 4)
    assert [text_at_step(schedule, k) for k in range(4)] == ["cat", "cat", "cat", "dog"]


def test_prompt_editing_switches_the_conditioning_per_step(load, monkeypatch) -> None:
    loaded = load("sd15")
    pipe = loaded.base
    used: list[torch.Tensor] = []
    unet = pipe.unet
    original = type(unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        used.append(encoder_hidden_states.detach().clone())
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", spy)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # one UNet call per step (PNDM adds one)
    adapter_for("sd15").run(loaded, _req(prompt="a [cat:dog:2] photo", steps=4), [5], euler, lambda s, t: False)
    monkeypatch.undo()
    cat = encode_sd15(pipe, ["a cat photo"], [""])
    dog = encode_sd15(pipe, ["a dog photo"], [""])
    assert len(used) == 4
    for k, cond in enumerate(used):  # CFG: [negative, positive]
        want = cat if k <= 2 else dog
        torch.testing.assert_close(cond[1:], want["prompt_embeds"])
        torch.testing.assert_close(cond[:1], want["negative_prompt_embeds"])


def test_alternation_on_sdxl_swaps_embeds_and_pooled(load, monkeypatch) -> None:
    loaded = load("sdxl")
    pipe = loaded.base
    used: list[tuple[torch.Tensor, torch.Tensor]] = []
    unet = pipe.unet
    original = type(unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        used.append((encoder_hidden_states.clone(), kwargs["added_cond_kwargs"]["text_embeds"].clone()))
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", spy)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    adapter_for("sdxl").run(loaded, _req("sdxl", prompt="a [cat|dog]", steps=3), [5], euler, lambda s, t: False)
    monkeypatch.undo()
    # Step k (0-based) uses the first schedule entry ending at or after k: cat (end 1) for steps 0 and 1, then dog.
    texts = ["a cat", "a cat", "a dog"]
    for (cond, pooled), text in zip(used, texts, strict=True):
        want = encode_sdxl(pipe, [text], [""])
        torch.testing.assert_close(cond[-1:], want["prompt_embeds"])
        torch.testing.assert_close(pooled[-1:], want["pooled_prompt_embeds"])


# SDXL refiner --------------------------------------------------------------------------------------------------------


def test_refiner_runs_base_to_the_switch_then_the_refiner(load, monkeypatch) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    loaded = load("sdxl")
    seen: list[tuple[str, dict]] = []
    for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline):
        original = cls.__call__

        def spy(self, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    steps: list[tuple[int, int]] = []
    req = _req("sdxl", steps=4, refiner="demo-sdxl", refiner_switch_at=0.5)
    images = adapter_for("sdxl").run_refined(
        loaded, loaded, BatchItem(req, [5]), None, None, lambda s, t: steps.append((s, t)) and False
    )
    assert len(images) == 1 and images[0].size == (64, 64)
    (base_name, base), (ref_name, ref) = seen
    assert base_name == "StableDiffusionXLPipeline" and base["denoising_end"] == 0.5 and base["output_type"] == "latent"
    assert ref_name == "StableDiffusionXLImg2ImgPipeline" and ref["denoising_start"] == 0.5
    assert ref["image"].shape[1] == loaded.base.vae.config.latent_channels  # the base's latents, not pixels
    assert steps[-1][0] == steps[-1][1] and len(steps) == 4  # 2 + 2 steps, one progress
    assert Task.TXT2IMG == req.task


# Through the engine --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from pipelines.engine import Engine, EngineConfig
    from tests.engine_helpers import yaml_registry

    registry = yaml_registry(
        tmp_path_factory,
        "models:\n"
        "  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"
        "  demo-sdxl:\n    family: sdxl\n    source: demo:sdxl\n"
        "  demo-flux:\n    family: flux\n    source: demo:flux\n",
    )
    embeddings = tmp_path_factory.mktemp("embeddings")
    eng = Engine(registry, EngineConfig(data_dir=data_dir, queue_size=4, embeddings_dir=embeddings))
    eng.start()
    yield eng
    eng.stop()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(model="demo-sd15", refiner="demo-sdxl"), "refiner_checkpoint"),
        (dict(model="demo-sdxl", refiner="nope"), "refiner_checkpoint"),
        (dict(model="demo-sdxl", refiner="demo-sdxl", refiner_switch_at=1.0), "refiner_switch_at"),
        (dict(model="demo-flux", tiling=True), "tiling"),
        (dict(model="demo-sd15", subseed_strength=float("nan")), "subseed_strength"),
        (
            dict(model="demo-sd15", task=Task.IMG2IMG, subseed_strength=0.5, init_images=[_blank()]),
            "subseed_strength",
        ),
    ],
)
def test_engine_refuses_what_it_cannot_apply(engine, kw, field) -> None:
    from pipelines.errors import InvalidRequest

    base = dict(prompt="a", width=64, height=64, steps=2, seed=1)
    with pytest.raises(InvalidRequest) as e:
        engine.submit(GenerationRequest(**{**base, **kw}))
    assert e.value.field == field


def test_engine_runs_the_refiner_and_resolves_subseeds(engine) -> None:
    req = GenerationRequest(
        model="demo-sdxl", prompt="a", width=64, height=64, steps=2, seed=3, refiner="demo-sdxl", refiner_switch_at=0.5
    )
    job = engine.submit(req)
    result = job.wait_sync(120)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert job.progress.sampling_step == job.progress.sampling_steps
    assert job.request.seed == 3 and job.request.subseed >= 0  # -1 resolved, as A1111 does


def test_engine_uses_the_embeddings_folder(engine) -> None:
    """A file dropped into the folder is used by name on the next request, and gone when the file is."""
    spec = engine.registry.get("demo-sd15")
    loaded = engine.cache.get(spec)
    assert loaded.embeddings is not None
    folder = loaded.embeddings.folder
    dim = loaded.base.text_encoder.get_input_embeddings().embedding_dim
    req = GenerationRequest(model="demo-sd15", prompt="a foxstyle", width=64, height=64, steps=2, seed=4)
    before = pixels(engine.submit(req).wait_sync(120).images[0])
    path = folder / "foxstyle.safetensors"
    save_file({"emb_params": torch.randn(2, dim, generator=torch.Generator().manual_seed(1)) * 3}, str(path))
    try:
        with_emb = pixels(engine.submit(req).wait_sync(120).images[0])
    finally:
        path.unlink()
    after = pixels(engine.submit(req).wait_sync(120).images[0])
    assert not np.array_equal(with_emb, before)
    assert np.array_equal(after, before)
