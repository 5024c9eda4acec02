"""bitsandbytes 4-bit files as `denoiser:` (Forge's flux1-dev-bnb-nf4 and -v2, diffusers' bnb-4bit saves): Easel's
decoder against bitsandbytes' own, Forge-layout all-in-one files written with bitsandbytes from the demo models and
served through the A1111 route, the decoded model back in bitsandbytes 4-bit layers (the file's codes) where it would
not fit, and 8-bit files refused by name."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from pipelines import bnb_files, demo, layouts, quantized
from pipelines.checkpoints import CheckpointError
from pipelines.engine import Engine, EngineConfig
from pipelines.registry import load_registry
from server.app import create_app
from server.settings import Settings
from tests.image_helpers import a1111_txt2img

bnb_functional = pytest.importorskip("bitsandbytes.functional")

FAMILIES = ("flux", "sd15")
MARGIN = 3.0  # as tests/unit/test_quantized.py: a 4-bit model's image this many times closer than another seed's


def _quantized_state(weight: torch.Tensor, quant_type: str, nested: bool) -> dict[str, torch.Tensor]:
    """`weight` as bitsandbytes saves a 4-bit parameter: the packed codes under the weight's own key (""), the rest
    under `.<name>` suffixes."""
    packed, state = bnb_functional.quantize_4bit(weight, quant_type=quant_type, blocksize=64,
                                                 compress_statistics=nested)  # fmt: skip
    return {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["float-scales", "double-quantized"])
@pytest.mark.parametrize(("shape", "dtype"), [((48, 64), torch.bfloat16), ((3, 50), torch.float16)])
def test_the_decoder_gives_bitsandbytes_own_values(quant_type: str, nested: bool, shape, dtype) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.05).to(dtype)
    weight[0, :5] = 0.8  # a block with an outlier
    packed, state = bnb_functional.quantize_4bit(weight, quant_type=quant_type, blocksize=64,
                                                 compress_statistics=nested)  # fmt: skip
    stored = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    stored["bias"] = torch.ones(3)
    assert bnb_files.quant_types(stored) == {quant_type}
    decoded = bnb_files.dequantized(stored)
    assert set(decoded) == {"w", "bias"} and decoded["w"].dtype == dtype and decoded["w"].shape == shape
    expected = bnb_functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(decoded["w"], expected, rtol=0, atol=0)
    assert (decoded["w"].float() - weight.float()).norm() / weight.float().norm() < 0.15  # 4 bits, not garbage


@pytest.mark.parametrize("shape", [(32, 32), (16, 16), (64, 32)])
def test_matrices_narrower_than_a_block_decode_to_their_values(shape) -> None:
    """Blocks run across rows here. bitsandbytes 0.50's own CPU dequantisation gets these wrong (40-50 % off; its
    quantisation is right, its CUDA kernels were not tried), so the reference is the original matrix."""
    torch.manual_seed(0)
    weight = torch.randn(shape)
    stored = {f"w{k}": v for k, v in _quantized_state(weight, "nf4", False).items()}
    decoded = bnb_files.dequantized(stored)["w"]
    assert float((decoded - weight).norm() / weight.norm()) < 0.12  # NF4's error on N(0, 1) values: about 0.09


def test_an_inconsistent_state_is_named() -> None:
    stored = {f"w{k}": v for k, v in _quantized_state(torch.randn(8, 64), "nf4", False).items()}
    del stored["w.absmax"]
    with pytest.raises(ValueError, match=r"w: an incomplete bitsandbytes 4-bit state"):
        bnb_files.dequantized(stored)
    stored = {f"w{k}": v for k, v in _quantized_state(torch.randn(8, 64), "nf4", False).items()}
    stored["w.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(b'{"dtype": "load", "shape": [8, 64], "blocksize": 64}'), dtype=torch.uint8
    )
    with pytest.raises(ValueError, match=r"w: an incomplete bitsandbytes 4-bit state .*'load'"):
        bnb_files.dequantized(stored)
    stored["w.quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0xFE], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w.quant_state.bitsandbytes__nf4: an unreadable bitsandbytes quant state"):
        bnb_files.dequantized(stored)
    stored = {f"w{k}": v for k, v in _quantized_state(torch.randn(8, 64), "nf4", False).items()}
    stored["w"] = stored["w"][:10]
    with pytest.raises(ValueError, match=r"packed bytes .* do not make the shape \[8, 64\]"):
        bnb_files.dequantized(stored)


def _forge_file(family: str, demo_root: Path, out: Path, nested: bool) -> torch.nn.Module:
    """The demo denoiser as Forge writes flux1-dev-bnb-nf4: an all-in-one file, the denoiser under
    `model.diffusion_model.` in the original (BFL / ldm) keys with its Linear weights in NF4, a text encoder beside
    it. Returns the float denoiser."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls, sub = (FluxTransformer2DModel, "transformer") if family == "flux" else (UNet2DConditionModel, "unet")
    model = cls.from_pretrained(str(demo.ensure_demo_model(family, demo_root)), subfolder=sub).eval()
    community = layouts.to_community(dict(model.state_dict()), family, model.config)
    stored: dict[str, torch.Tensor] = {}
    for key, tensor in community.items():
        name = f"model.diffusion_model.{key}"
        if tensor.dim() == 2 and key.endswith(".weight"):  # Linear weights (convolutions stay float, as in Forge)
            stored.update({name + k: v for k, v in _quantized_state(tensor.to(torch.bfloat16), "nf4", nested).items()})
        else:
            stored[name] = tensor.to(torch.bfloat16)
    stored["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    save_file(stored, str(out))
    return model


@dataclass
class Served:
    client: TestClient
    engine: Engine


@pytest.fixture(scope="module")
def served(data_dir: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("bnb")
    lines = ["default_model: demo-sd15", "models:"]
    for family in FAMILIES:
        # FLUX as Forge's v2 (float32 block scales), SD1.5 as v1 (double-quantized).
        _forge_file(family, demo_root, work / f"{family}-nf4.safetensors", nested=family == "sd15")
        lines += [f"  demo-{family}:", f"    family: {family}", f"    source: demo:{family}"]
        lines += [f"  {family}-nf4:", f"    family: {family}", f"    source: demo:{family}",
                  f"    denoiser: {family}-nf4.safetensors"]  # fmt: skip
    int8 = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32, dtype=torch.int8),
            "model.diffusion_model.double_blocks.0.img_attn.qkv.SCB": torch.ones(96)}  # fmt: skip
    save_file(int8, str(work / "int8.safetensors"))
    lines += ["  flux-int8:", "    family: flux", "    source: demo:flux", "    denoiser: int8.safetensors"]
    (work / "models.yaml").write_text("\n".join(lines) + "\n")
    registry = load_registry(work / "models.yaml")
    engine = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False, max_wait_ms=0, cache_max_models=4))
    engine.start()
    with TestClient(create_app(Settings(data_dir=work / "data"), engine=engine, registry=registry)) as client:
        yield Served(client, engine)
    engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_forge_nf4_files_serve_nearly_the_unquantized_image(served: Served, family: str, caplog) -> None:
    reference = a1111_txt2img(served.client, f"demo-{family}", 11)
    other_seed = float(np.abs(reference - a1111_txt2img(served.client, f"demo-{family}", 12)).mean())
    assert other_seed > 1.0
    with caplog.at_level(logging.INFO, logger="easel.optimize"):
        near = float(np.abs(reference - a1111_txt2img(served.client, f"{family}-nf4", 11)).mean())
    assert near * MARGIN < other_seed, f"{family}: {near:.2f} vs another seed's {other_seed:.2f}"
    # No CUDA here: it stays decoded in the compute dtype, and the log says why.
    assert f"model {family}-nf4: 4-bit (nf4) denoiser kept decoded in float32: 4-bit layers need a CUDA device" in (
        caplog.text
    )


def test_an_8bit_file_is_refused_at_start_up_by_name(served: Served) -> None:
    message = served.engine.broken_models["flux-int8"]
    assert "int8.safetensors" in message and "bitsandbytes int8 weights are not supported" in message
    assert a1111_txt2img(served.client, "demo-flux", 1).shape == (64, 64, 3)  # the others serve


@pytest.mark.parametrize("nested", [False, True], ids=["v2", "v1-double-quantized"])
def test_4bit_layers_where_the_decoded_model_would_not_fit(demo_root: Path, tmp_path: Path, nested: bool) -> None:
    """On a card (a fake probe and device here: bitsandbytes quantizes on the CPU too), a decoded 4-bit file goes
    back into bitsandbytes 4-bit layers when the decoded pipeline would not fit resident, with the file's own codes;
    where it fits it stays decoded (faster: no per-call dequantisation)."""
    from diffusers import FluxPipeline
    from safetensors import safe_open

    from pipelines import placement
    from pipelines.optimize import requantize_4bit_file

    path = tmp_path / "flux-nf4.safetensors"
    _forge_file("flux", demo_root, path, nested=nested)
    folder = demo.ensure_demo_model("flux", demo_root)
    cuda, installed = torch.device("cuda"), frozenset({"bitsandbytes"})

    def pipe() -> FluxPipeline:
        model = quantized.load_denoiser("flux", path, folder, torch.float32)
        return FluxPipeline.from_pretrained(str(folder), transformer=model)

    decoded = pipe()
    try:
        placement.set_probe(lambda d: (1 << 40, 1 << 40))
        assert requantize_4bit_file(decoded, "auto", "m", cuda, installed) == []  # fits: stays decoded
        assert requantize_4bit_file(decoded, "keep", "m", torch.device("cpu"), installed) == []  # no CUDA: decoded
        placement.set_probe(lambda d: (1 << 20, 1 << 20))
        small = pipe()
        assert requantize_4bit_file(small, "dequantize", "m", cuda, installed) == []
        assert requantize_4bit_file(small, "auto", "m", cuda, installed) == ["bnb-nf4"]
    finally:
        placement.set_probe(None)
    model = small.transformer
    assert type(model.x_embedder).__name__ == "Linear4bit" and model.x_embedder.weight.quant_state.quant_type == "nf4"
    assert placement.module_bytes(model) < placement.module_bytes(decoded.transformer) / 3
    # The file's own 4-bit codes come back (and, with float block scales, its scales too).
    with safe_open(str(path), framework="pt") as f:
        packed = f.get_tensor("model.diffusion_model.img_in.weight")
        absmax = f.get_tensor("model.diffusion_model.img_in.weight.absmax")
    assert torch.equal(model.x_embedder.weight.data.reshape(-1), packed.reshape(-1))
    if not nested:
        assert torch.equal(model.x_embedder.weight.quant_state.absmax, absmax)
    # Every 4-bit layer holds the decoded model's weights (read back with Easel's decoder: bitsandbytes 0.50's own CPU
    # dequantisation is wrong for matrices narrower than a block, as the demo's 32-column ones).
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    weights = decoded.transformer.state_dict()
    assert len(layers) > 20
    for name, layer in layers.items():
        state = {
            "w": layer.weight.data,
            **{f"w.{k}": v for k, v in layer.weight.quant_state.as_dict(packed=True).items()},
        }
        held = bnb_files.dequantized(state)["w"].float()
        expected_weight = weights[f"{name}.weight"].float()
        assert float((held - expected_weight).norm() / expected_weight.norm()) < 1e-2, name  # nested: rescaled blocks


def test_an_nf4_file_of_another_family_is_named_at_start_up(demo_root: Path, tmp_path: Path) -> None:
    from pipelines.registry import ModelSpec

    path = tmp_path / "flux-nf4.safetensors"
    _forge_file("flux", demo_root, path, nested=False)
    spec = ModelSpec(id="x", family="sdxl", source="demo:sdxl", denoiser=str(path))
    with pytest.raises(CheckpointError, match=r"holds a FLUX.1 transformer, but the model's family is sdxl"):
        quantized.check_file(spec)


def test_a_text_encoder_file_in_nf4_is_decoded(demo_root: Path, tmp_path: Path) -> None:
    from transformers import T5EncoderModel

    folder = demo.ensure_demo_model("flux", demo_root)
    t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2")).eval()
    stored: dict[str, torch.Tensor] = {}
    for key, tensor in t5.state_dict().items():
        if tensor.dim() == 2 and key != "shared.weight":
            stored.update({key + k: v for k, v in _quantized_state(tensor, "nf4", True).items()})
        elif key != "encoder.embed_tokens.weight":  # tied to `shared`, as the community files leave it out
            stored[key] = tensor
    save_file(stored, str(tmp_path / "t5_nf4.safetensors"))
    encoder = quantized.load_text_encoder("text_encoder_2", tmp_path / "t5_nf4.safetensors", folder, torch.float32)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.inference_mode():
        want, got = t5(ids).last_hidden_state, encoder(ids).last_hidden_state
    assert 0 < float((got - want).norm() / want.norm()) < 0.3  # 4 bits through 2 layers: close, not equal
