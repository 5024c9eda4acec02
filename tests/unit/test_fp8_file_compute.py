"""An FP8 `denoiser:` file on a card with FP8 compute takes the fast path's FP8 tier (#22 on #15), elsewhere FP8
storage with layerwise casting. The capability and the installed packages are inputs, and torchao's step is
replaced by a recorder, so both paths run on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from pipelines import demo, optimize, quantized
from pipelines.registry import ModelSpec

HOPPER, ADA, AMPERE = (9, 0), (8, 9), (8, 6)
TORCHAO = frozenset({"torchao"})
SCALED = "proj_out.weight"  # stored x4 with a per-tensor scale of 1/4 in the file: exact in FP8


@pytest.fixture(scope="module")
def fp8_file(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The demo FLUX transformer as an FP8 file in diffusers' keys, with one scaled tensor."""
    from diffusers import FluxTransformer2DModel

    folder = demo.ensure_demo_model("flux", demo_root)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v.contiguous()) for k, v in model.state_dict().items()}
    state[SCALED] = (state[SCALED].float() * 4).to(torch.float8_e4m3fn)
    state[SCALED.removesuffix(".weight") + ".weight_scale"] = torch.tensor(0.25)
    path = tmp_path_factory.mktemp("fp8-compute") / "flux-fp8.safetensors"
    save_file(state, str(path))
    return path, folder, state


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """torchao's FP8 step replaced: records the dtypes of the weights it was given."""
    calls: list[dict] = []

    def quantize_fp8(model: torch.nn.Module) -> int:
        calls.append({"model": model, "dtypes": {p.dtype for p in model.parameters()}})
        return 1

    monkeypatch.setattr(optimize, "quantize_fp8", quantize_fp8)
    return calls


def _spec(path: Path, family: str = "flux", **performance) -> ModelSpec:
    return ModelSpec(id="fp8-file", family=family, source=f"demo:{family}", denoiser=str(path),
                     performance=performance)  # fmt: skip


def _hooked(model: torch.nn.Module) -> int:
    return sum(getattr(m, "_diffusers_hook", None) is not None for m in model.modules())


def test_the_decision_is_the_fp8_tier_s_own(tmp_path: Path) -> None:
    s = _spec(tmp_path / "x.safetensors")
    assert optimize.fp8_compute_tier(s, HOPPER, TORCHAO)[0] and optimize.fp8_compute_tier(s, ADA, TORCHAO)[0]
    on, why = optimize.fp8_compute_tier(s, AMPERE, TORCHAO)
    assert not on and "8.9" in why
    on, why = optimize.fp8_compute_tier(s, HOPPER, frozenset())
    assert not on and "torchao" in why
    assert not optimize.fp8_compute_tier(s, None, TORCHAO)[0]  # CPU
    assert not optimize.fp8_compute_tier(_spec(tmp_path, quantization="none"), HOPPER, TORCHAO)[0]
    assert not optimize.fp8_compute_tier(_spec(tmp_path, "sdxl"), HOPPER, TORCHAO)[0]  # auto leaves UNets out
    assert optimize.fp8_compute_tier(_spec(tmp_path, "sdxl", quantization="fp8"), HOPPER, TORCHAO)[0]
    # The bf16 fast path does not quantize a file's denoiser a second time: the load did.
    assert optimize.quantization_step(s, HOPPER, TORCHAO) == (False, None)


@pytest.mark.parametrize("capability,installed", [(AMPERE, TORCHAO), (HOPPER, frozenset()), (None, TORCHAO)])
def test_without_fp8_compute_the_weights_stay_float8_with_layerwise_casting(
    fp8_file, recorded: list[dict], caplog: pytest.LogCaptureFixture, capability, installed
) -> None:
    path, folder, _ = fp8_file
    spec = _spec(path)
    decision = optimize.fp8_compute_tier(spec, capability, installed)
    with caplog.at_level(logging.INFO, logger="easel.quantized"):
        model = quantized.load_components(spec, folder, torch.bfloat16, decision)["transformer"]
    assert recorded == []
    assert torch.float8_e4m3fn in {p.dtype for p in model.parameters()}
    assert _hooked(model) > 0
    assert model._easel_fp8 == torch.float8_e4m3fn
    assert f"computed in bfloat16 layer by layer: {decision[1]}" in caplog.text


def test_with_fp8_compute_the_fp8_tier_gets_bf16_weights_and_no_hooks(
    fp8_file, recorded: list[dict], caplog: pytest.LogCaptureFixture
) -> None:
    path, folder, state = fp8_file
    spec = _spec(path)
    with caplog.at_level(logging.INFO, logger="easel.quantized"):
        model = quantized.load_components(spec, folder, torch.bfloat16,
                                          optimize.fp8_compute_tier(spec, ADA, TORCHAO))["transformer"]  # fmt: skip
    assert len(recorded) == 1 and recorded[0]["model"] is model
    assert recorded[0]["dtypes"] == {torch.bfloat16}
    assert _hooked(model) == 0
    weights = dict(model.named_parameters())
    assert torch.equal(weights[SCALED], (state[SCALED].float() * 0.25).to(torch.bfloat16))  # the scale applied
    assert torch.equal(weights["x_embedder.weight"], state["x_embedder.weight"].to(torch.bfloat16))
    assert model._easel_fp8 == optimize.FP8_COMPUTE
    assert "FP8 compute tier from bfloat16 weights (torchao): FP8 compute on this device (compute capability 8.9" in (
        caplog.text
    )


def test_a_failing_fp8_tier_falls_back_to_layerwise_casting(fp8_file, monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder, _ = fp8_file

    def broken(model: torch.nn.Module) -> int:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(optimize, "quantize_fp8", broken)
    model = quantized.load_denoiser("flux", path, folder, torch.bfloat16, fp8_compute=(True, "test"))
    assert torch.float8_e4m3fn in {p.dtype for p in model.parameters()} and _hooked(model) > 0


def test_the_fast_path_does_not_fuse_a_denoiser_that_got_the_tier_at_load() -> None:
    fused: list[bool] = []
    model = SimpleNamespace(_easel_fp8=optimize.FP8_COMPUTE, fuse_qkv_projections=lambda: fused.append(True))
    pipe = SimpleNamespace(unet=None, transformer=model)
    s = ModelSpec(id="m", family="flux", source="demo:flux", performance={"compile": "off"})
    applied = optimize.apply_optimizations(pipe, s, torch.device("cpu"), force=True)
    assert "fuse_qkv" in applied and fused == []


def test_the_engine_gives_an_fp8_file_the_tier_its_device_reports(
    fp8_file, recorded: list[dict], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a model entry's `denoiser:`: the engine asks the device (here a fake Ada card with torchao), and the
    model still generates (the recorder left the upcast weights as they were)."""
    from pipelines import engine as engine_module
    from pipelines.engine import Engine, EngineConfig
    from pipelines.families import adapter_for
    from pipelines.registry import Registry
    from pipelines.request import GenerationRequest

    monkeypatch.setattr(engine_module, "capability_of", lambda device: ADA)
    monkeypatch.setattr(engine_module, "installed_packages", lambda: TORCHAO)
    spec = _spec(fp8_file[0])
    loaded = Engine(Registry([spec]), EngineConfig(data_dir=data_dir, preload_default=False))._load_model(spec)
    assert len(recorded) == 1 and recorded[0]["model"] is loaded.base.transformer
    assert _hooked(loaded.base.transformer) == 0
    req = GenerationRequest(model=spec.id, prompt="a fox", width=64, height=64, steps=2, seed=1)
    with torch.inference_mode():
        (image,) = adapter_for("flux").run(loaded, req, [1], None, lambda step, total: False)
    assert image.size == (64, 64)


def test_the_qkv_projections_are_fused_before_the_fp8_tier(
    demo_root: Path, tmp_path: Path, recorded: list[dict]
) -> None:
    """A UNet file with `quantization: fp8` (auto leaves UNets out): fused first, so the fused projections are the
    ones quantized, as the fast path orders it for a bf16 denoiser."""
    from diffusers import UNet2DConditionModel

    folder = demo.ensure_demo_model("sdxl", demo_root)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v.contiguous()) for k, v in unet.state_dict().items()}
    save_file(state, str(tmp_path / "unet-fp8.safetensors"))
    spec = _spec(tmp_path / "unet-fp8.safetensors", "sdxl", quantization="fp8")
    model = quantized.load_components(spec, folder, torch.bfloat16, optimize.fp8_compute_tier(spec, HOPPER, TORCHAO))
    assert len(recorded) == 1 and recorded[0]["model"] is model["unet"]
    assert any(name.endswith("to_qkv") for name, _ in model["unet"].named_modules())
