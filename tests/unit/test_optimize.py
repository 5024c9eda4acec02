"""The CUDA fast path: what is planned per family and device, that it is skipped on CPU, and that the
device-independent steps really run (forced on CPU) without changing the picture."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import demo
from pipelines.families import adapter_for
from pipelines.optimize import (
    apply_optimizations,
    attention_step,
    compile_mode,
    plan_optimizations,
    prepare_call,
    quantization_step,
    uncompile,
    warmup_shapes,
    watch_compiles,
)
from pipelines.registry import ModelSpec, RegistryError, load_registry
from pipelines.request import GenerationRequest

CUDA = torch.device("cuda")  # a device object is enough to plan; nothing is allocated
CPU = torch.device("cpu")


def spec(family: str = "sd15", **performance) -> ModelSpec:
    return ModelSpec(id=f"m-{family}", family=family, source=f"demo:{family}", performance=performance)


HOPPER, AMPERE = (9, 0), (8, 0)
EVERYTHING = frozenset({"torchao", "flash_attn", "flash_attn_interface", "sageattention", "xformers"})
NOTHING: frozenset[str] = frozenset()


def plan(s: ModelSpec, capability=HOPPER, installed=EVERYTHING) -> list[str]:
    return plan_optimizations(s, CUDA, capability=capability, installed=installed)


def test_defaults_per_family_on_cuda():
    # UNets: the whole UNet compiled (with CUDA graphs); no FP8 by default (small matmuls gain little).
    assert plan(spec("sd15")) == ["sdpa", "channels_last", "fuse_qkv", "compile_full"]
    assert plan(spec("sdxl")) == ["sdpa", "channels_last", "fuse_qkv", "compile_full"]
    # Transformers: FP8 where the card has it and torchao is installed; the repeated blocks compiled.
    assert plan(spec("flux")) == ["sdpa", "fuse_qkv", "fp8", "compile_regional"]
    assert plan(spec("qwen-image")) == ["sdpa", "fuse_qkv", "fp8", "compile_regional"]
    assert plan(spec("flux"), capability=AMPERE) == ["sdpa", "fuse_qkv", "compile_regional"]
    assert plan(spec("flux"), installed=NOTHING) == ["sdpa", "fuse_qkv", "compile_regional"]
    assert plan(spec("flux", quantization="none", compile="off")) == ["sdpa", "fuse_qkv"]
    assert plan(spec("sd15", quantization="fp8")) == ["sdpa", "channels_last", "fuse_qkv", "fp8", "compile_full"]


def test_configured_steps_and_cpu_skips_everything():
    s = spec("flux", compile="regional", fuse_qkv=False, attention="xformers")
    assert plan(s, installed=frozenset({"xformers"})) == ["xformers", "compile_regional"]
    assert plan(s, installed=NOTHING)[0] == "sdpa"  # asked for but missing: SDPA
    assert plan_optimizations(s, CPU) == []
    assert "compile_regional" not in plan_optimizations(s, CPU, force=True)  # compile is CUDA only


def test_attention_backends_need_their_package_and_a_transformer():
    for asked, package in (("flash", "flash_attn"), ("flash3", "flash_attn_interface"), ("sage", "sageattention")):
        s = spec("flux", attention=asked)
        assert attention_step(s, frozenset({package})) == (f"attention_{asked}", None)
        step, note = attention_step(s, NOTHING)
        assert step == "sdpa" and package in note
    assert attention_step(spec("qwen-image", attention="cudnn"), NOTHING) == ("attention_cudnn", None)
    step, note = attention_step(spec("sdxl", attention="flash"), EVERYTHING)
    assert step == "sdpa" and "transformers only" in note


def test_fp8_asked_for_where_it_cannot_run_says_why():
    assert quantization_step(spec("flux", quantization="fp8"), HOPPER, EVERYTHING) == (True, None)
    on, note = quantization_step(spec("flux", quantization="fp8"), AMPERE, EVERYTHING)
    assert not on and "8.9" in note
    on, note = quantization_step(spec("flux", quantization="fp8"), HOPPER, NOTHING)
    assert not on and "torchao" in note
    assert quantization_step(spec("flux"), AMPERE, EVERYTHING) == (False, None)  # auto: quietly off


def test_compile_mode_uses_cuda_graphs_for_full_compiles_only():
    assert compile_mode(spec("sd15").performance, "sd15") == "reduce-overhead"
    assert compile_mode(spec("flux").performance, "flux") is None  # regional
    assert compile_mode(spec("flux", cuda_graphs=True).performance, "flux") == "reduce-overhead"
    assert compile_mode(spec("sd15", cuda_graphs=False).performance, "sd15") is None
    assert compile_mode(spec("sd15", compile_mode="max-autotune").performance, "sd15") == "max-autotune"


def test_warmup_shapes_default_to_the_model_size_and_cross_sizes_with_batches():
    s = ModelSpec(id="m", family="sdxl", source="demo:sdxl", defaults={"width": 1024, "height": 768})
    assert warmup_shapes(s) == [(1024, 768, 1)]
    s = spec("sd15", warmup_sizes=[[512, 512], [768, 512]], warmup_batch_sizes=[1, 4])
    assert warmup_shapes(s) == [(512, 512, 1), (512, 512, 4), (768, 512, 1), (768, 512, 4)]


def test_a_new_shape_on_a_compiled_model_is_logged_with_its_cost(caplog: pytest.LogCaptureFixture):
    def ours() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "easel.optimize"]

    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="eager", dynamic=False)
    fn(torch.ones(2))  # the warmed-up shape
    with caplog.at_level(logging.WARNING, logger="easel.optimize"):
        with watch_compiles("m", True, 512, 512, 2):
            fn(torch.ones(2))  # same shape: nothing compiled
        assert not ours()
        with watch_compiles("m", True, 768, 512, 3):
            fn(torch.ones(3))  # a new shape: a recompile
        with watch_compiles("m", False, 64, 64, 1):  # uncompiled models are not watched
            fn(torch.ones(5))
    assert len(ours()) == 1
    assert "compiled 1 new graph(s) for 768x512 with 3 image(s)" in ours()[0] and "warmup_sizes" in ours()[0]


def test_uncompile_restores_eager_calls():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    model.compile(backend="eager")
    model[0].compile(backend="eager")
    uncompile(model)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    assert model(torch.ones(1, 4)).shape == (1, 4)


def test_bad_warmup_sizes_name_the_field(tmp_path: Path):
    p = tmp_path / "models.yaml"
    p.write_text("models:\n  m:\n    family: sd15\n    source: demo:sd15\n    performance: {warmup_sizes: [[8, 8]]}\n")
    with pytest.raises(RegistryError, match="performance.warmup_sizes"):
        load_registry(p)


def test_bad_performance_values_name_the_field(tmp_path: Path):
    p = tmp_path / "models.yaml"
    p.write_text("models:\n  m:\n    family: sd15\n    source: demo:sd15\n    performance: {compile: always}\n")
    with pytest.raises(RegistryError, match="model 'm': field 'performance.compile'"):
        load_registry(p)


def test_forced_steps_run_on_cpu_and_keep_the_picture(demo_root: Path):
    s = spec("sd15")
    adapter = adapter_for("sd15")
    path = str(demo.ensure_demo_model("sd15", demo_root))
    req = GenerationRequest(model=s.id, prompt="a cat", width=64, height=64, steps=3)

    def render(loaded):
        sched = type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)
        with torch.inference_mode():
            return np.asarray(adapter.run(loaded, req, [1], sched, lambda *_: False)[0], dtype=np.int16)

    plain = adapter.load(s, path, CPU, torch.float32)
    assert apply_optimizations(plain.base, s, CPU) == []  # skipped cleanly on CPU
    fast = adapter.load(s, path, CPU, torch.float32)
    applied = apply_optimizations(fast.base, s, CPU, force=True)
    assert applied == ["sdpa", "channels_last", "fuse_qkv"]
    assert fast.base.unet.attn_processors and any(
        "Fused" in type(p).__name__ for p in fast.base.unet.attn_processors.values()
    )
    assert np.abs(render(plain) - render(fast)).max() <= 2
    prepare_call(fast.base, s, CPU, 4096, 4096, 8)  # a no-op on CPU
    assert not getattr(fast.base.vae, "use_tiling", False)


def test_vae_tiling_and_slicing_follow_the_size_of_each_call(demo_root: Path):
    s = spec("sd15", vae_tiling_above_pixels=1024 * 1024, vae_slicing_above_images=2)
    loaded = adapter_for("sd15").load(s, str(demo.ensure_demo_model("sd15", demo_root)), CPU, torch.float32)
    vae = loaded.base.vae
    prepare_call(loaded.base, s, CUDA, 2048, 1024, 4)  # flags only: the VAE itself stays where it is
    assert vae.use_tiling and vae.use_slicing
    prepare_call(loaded.base, s, CUDA, 512, 512, 1)
    assert not vae.use_tiling and not vae.use_slicing
