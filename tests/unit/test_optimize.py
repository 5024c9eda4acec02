"""The CUDA fast path: what is planned per family and device, that it is skipped on CPU, and that the
device-independent steps really run (forced on CPU) without changing the picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import demo
from pipelines.families import adapter_for
from pipelines.optimize import apply_optimizations, plan_optimizations, prepare_call
from pipelines.registry import ModelSpec, RegistryError, load_registry
from pipelines.request import GenerationRequest

CUDA = torch.device("cuda")  # a device object is enough to plan; nothing is allocated
CPU = torch.device("cpu")


def spec(family: str = "sd15", **performance) -> ModelSpec:
    return ModelSpec(id=f"m-{family}", family=family, source=f"demo:{family}", performance=performance)


def test_defaults_per_family_on_cuda():
    assert plan_optimizations(spec("sd15"), CUDA) == ["sdpa", "channels_last", "fuse_qkv"]
    assert plan_optimizations(spec("sdxl"), CUDA) == ["sdpa", "channels_last", "fuse_qkv"]
    assert plan_optimizations(spec("flux"), CUDA) == ["sdpa", "fuse_qkv"]  # no UNet: no channels_last
    assert plan_optimizations(spec("qwen-image"), CUDA) == ["sdpa", "fuse_qkv"]


def test_configured_steps_and_cpu_skips_everything():
    s = spec("flux", compile="regional", fuse_qkv=False, attention="xformers")
    plan = plan_optimizations(s, CUDA)
    assert plan[0] in ("xformers", "sdpa") and "compile_regional" in plan and "fuse_qkv" not in plan
    assert plan_optimizations(s, CPU) == []
    assert "compile_regional" not in plan_optimizations(s, CPU, force=True)  # compile is CUDA only


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
