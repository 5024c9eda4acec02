"""Quantized component files (#22): `easel quantize` on every demo family, each file served through `denoiser:` and
the A1111 route, the FP8 file really FP8, and every kind of bad file refused by name while the other models serve."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines import demo, placement, quantized
from pipelines.checkpoints import CheckpointError
from pipelines.engine import Engine, EngineConfig
from pipelines.errors import ModelLoadError
from pipelines.registry import ModelSpec, Registry, load_registry
from pipelines.request import GenerationRequest, Task
from server.app import create_app
from server.cli import main
from server.settings import Settings
from tests.image_helpers import a1111_txt2img

FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")
FORMATS = {"gguf-q8_0": ".gguf", "gguf-q4_0": ".gguf", "fp8": ".safetensors"}
# A quantized model's image must be at least this many times closer to the unquantized image of the same seed than
# an unquantized image of another seed is (mean absolute pixel difference).
MARGIN = 3.0
SEEDS = (11, 12)


def _yaml(models: dict[str, dict[str, str]], default: str) -> str:
    lines = [f"default_model: {default}", "models:"]
    for model_id, fields in models.items():
        lines.append(f"  {model_id}:")
        lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Served:
    client: TestClient
    engine: Engine
    files: dict[str, Path]
    outputs: dict[str, str]  # quantize's printed line per model id


@pytest.fixture(scope="module")
def served(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("quantized")
    base = {f"demo-{f}": {"family": f, "source": f"demo:{f}"} for f in FAMILIES}
    (work / "base.yaml").write_text(_yaml(base, "demo-sd15"))
    models = dict(base)
    files: dict[str, Path] = {}
    outputs: dict[str, str] = {}
    for family in FAMILIES:
        for fmt, suffix in FORMATS.items():
            model_id = f"{family}-{fmt}"
            out = work / f"{model_id}{suffix}"
            args = ["quantize", f"demo-{family}", "--format", fmt, "--out", str(out)]
            args += ["--models", str(work / "base.yaml"), "--data-dir", str(data_dir)]
            capture = io.StringIO()
            import contextlib

            with contextlib.redirect_stdout(capture):
                assert main(args) == 0
            outputs[model_id] = capture.getvalue()
            files[model_id] = out
            models[model_id] = {"family": family, "source": f"demo:{family}", "denoiser": out.name}
    models["flux-gguf-q8_0-once"] = {**models["flux-gguf-q8_0"], "performance": "{gguf: dequantize}"}
    # Bad files, each on its own model: the others must keep serving.
    flux_file = files["flux-gguf-q8_0"]
    models["bad-family"] = {"family": "sd15", "source": "demo:sd15", "denoiser": flux_file.name}
    truncated = work / "truncated.gguf"
    truncated.write_bytes(files["sd15-gguf-q4_0"].read_bytes()[:5000])
    models["bad-truncated"] = {"family": "sd15", "source": "demo:sd15", "denoiser": truncated.name}
    corrupt = work / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    models["bad-corrupt"] = {"family": "sdxl", "source": "demo:sdxl", "denoiser": corrupt.name}
    # The SD1.5 UNet file on the SDXL base: the right family, the wrong tensors.
    models["bad-mismatch"] = {"family": "sdxl", "source": "demo:sdxl", "denoiser": files["sd15-fp8"].name}
    (work / "models.yaml").write_text(_yaml(models, "demo-sd15"))
    registry = load_registry(work / "models.yaml")
    engine = Engine(registry, EngineConfig(data_dir=data_dir, preload_default=False, max_wait_ms=0, cache_max_models=4))
    engine.start()
    app = create_app(Settings(data_dir=work / "data"), engine=engine, registry=registry)
    with TestClient(app) as client:
        yield Served(client, engine, files, outputs)
    engine.stop()


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_quantize_reports_size_and_time(served: Served) -> None:
    for model_id, line in served.outputs.items():
        size = served.files[model_id].stat().st_size
        assert f"({size} bytes)" in line and " s\n" in line, line


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_denoisers_make_nearly_the_unquantized_image(served: Served, family: str) -> None:
    reference = a1111_txt2img(served.client, f"demo-{family}", SEEDS[0])
    other_seed = _distance(reference, a1111_txt2img(served.client, f"demo-{family}", SEEDS[1]))
    assert other_seed > 1.0  # the seeds really make different images
    for fmt in FORMATS:
        near = _distance(reference, a1111_txt2img(served.client, f"{family}-{fmt}", SEEDS[0]))
        assert near * MARGIN < other_seed, f"{family} {fmt}: {near:.2f} vs another seed's {other_seed:.2f}"


def test_fp8_files_store_float8_and_load_as_float8(served: Served, demo_root: Path) -> None:
    for family in FAMILIES:
        path = served.files[f"{family}-fp8"]
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "F8_E4M3" in dtypes, (family, dtypes)
        folder = demo.ensure_demo_model(family, demo_root)
        model = quantized.load_denoiser(family, path, folder, torch.float32)
        stored = {p.dtype for p in model.parameters()}
        assert torch.float8_e4m3fn in stored and torch.float32 in stored  # norms stay in the compute dtype


def test_gguf_files_keep_quantized_weights(served: Served, demo_root: Path) -> None:
    folder = demo.ensure_demo_model("flux", demo_root)
    model = quantized.load_denoiser("flux", served.files["flux-gguf-q4_0"], folder, torch.float32)
    assert any(type(m).__name__ == "GGUFLinear" for m in model.modules())
    # BFL keys in the file (the community layout), not diffusers'.
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(served.files["flux-gguf-q4_0"])).tensors}
    assert "double_blocks.0.img_attn.qkv.weight" in names and "transformer_blocks.0.attn.to_q.weight" not in names


@pytest.mark.parametrize("fmt", ["gguf-q8_0", "fp8"])
def test_a_bf16_denoiser_writes_the_same_file_as_its_float32_copy(demo_root: Path, tmp_path: Path, fmt: str) -> None:
    """The writer widens one tensor at a time (no float32 copy of a 20 B model): a bf16 model, whose values are
    exact in float32, must give the very tensors its float32 copy gives."""
    from diffusers import FluxTransformer2DModel

    from pipelines import quantize as writer

    folder = demo.ensure_demo_model("flux", demo_root)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", torch_dtype=torch.bfloat16)
    written = {}
    for dtype in (torch.bfloat16, torch.float32):
        path = tmp_path / f"{dtype}{writer.suffix_for(fmt)}"
        writer.write_denoiser(model.to(dtype), "flux", fmt, path)
        if fmt == "fp8":
            with safe_open(str(path), framework="pt") as f:
                written[dtype] = {k: f.get_tensor(k).view(torch.uint8) for k in f.keys()}
        else:
            import gguf

            written[dtype] = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    assert written[torch.bfloat16].keys() == written[torch.float32].keys()
    for key, value in written[torch.bfloat16].items():
        other = written[torch.float32][key]
        assert (value == other) if isinstance(value, bytes) else torch.equal(value, other), key


def test_fp8_scaled_files_keep_small_weights_and_load_as_comfyui_scaled(demo_root: Path, tmp_path: Path) -> None:
    """`easel quantize --format fp8-scaled`: one scale per matrix (ComfyUI's scaled layout, marker included). Small
    weights then stay out of FP8's subnormal range: the output is closer to the float model's than plain FP8's is."""
    from diffusers import FluxTransformer2DModel

    from pipelines import quantize as writer
    from server.cli import QUANTIZE_FORMATS

    assert QUANTIZE_FORMATS == writer.FORMATS  # the CLI's own copy (it does not import torch)
    folder = demo.ensure_demo_model("flux", demo_root)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer").eval()
    model.requires_grad_(False)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(0.02 / p.std())  # real checkpoints' magnitudes: many values below FP8's smallest normal
    inputs = _denoiser_inputs("flux")
    with torch.inference_mode():
        expected = model(**inputs).sample
    errors = {}
    for fmt in ("fp8", "fp8-scaled"):
        path = tmp_path / f"{fmt}.safetensors"
        writer.write_denoiser(model, "flux", fmt, path)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        assert ("scaled_fp8" in keys) == (fmt == "fp8-scaled")
        assert ("double_blocks.0.img_attn.qkv.scale_weight" in keys) == (fmt == "fp8-scaled")
        loaded = quantized.load_denoiser("flux", path, folder, torch.float32)
        with torch.inference_mode():
            errors[fmt] = float((loaded(**inputs).sample - expected).norm() / expected.norm())
    # About 0.031 against 0.037 here: FP8's 3 mantissa bits dominate both; the scale removes the subnormal share.
    assert errors["fp8-scaled"] < 0.9 * errors["fp8"], errors


def _denoiser_inputs(family: str) -> dict:
    torch.manual_seed(0)
    if family == "flux":
        return dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                    pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                    txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))  # fmt: skip
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 64), added_cond_kwargs=added)  # fmt: skip


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_scaled_fp8_with_prefixed_keys_loads(served: Served, demo_root: Path, tmp_path: Path, family: str) -> None:
    """ComfyUI's scaled FP8 layout: `model.diffusion_model.` keys (BFL / ldm below it), a `.scale_weight` per
    matrix, a marker tensor. Stored x4 with scale 1/4 (exact in FP8): the very same outputs as the unscaled file."""
    folder = demo.ensure_demo_model(family, demo_root)
    plain = quantized.load_denoiser(family, served.files[f"{family}-fp8"], folder, torch.float32)
    with safe_open(str(served.files[f"{family}-fp8"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for key, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn:
            scaled["model.diffusion_model." + key] = (t.float() * 4).to(torch.float8_e4m3fn)
            scaled["model.diffusion_model." + key.removesuffix(".weight") + ".scale_weight"] = torch.tensor(0.25)
        else:
            scaled["model.diffusion_model." + key] = t
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    model = quantized.load_denoiser(family, tmp_path / "scaled.safetensors", folder, torch.float32)
    inputs = _denoiser_inputs(family)
    with torch.inference_mode():
        expected = plain(**inputs).sample
        assert torch.equal(expected, model(**inputs).sample)
    # `easel quantize` re-quantizes from such a file with its scales applied, not from the stored x4 values.
    from pipelines import quantize

    spec = ModelSpec(id="s", family=family, source=f"demo:{family}", denoiser=str(tmp_path / "scaled.safetensors"))
    source = quantize.source_denoiser(spec, demo_root, None)
    assert {p.dtype for p in source.parameters()} == {torch.bfloat16}  # the file's own non-FP8 dtype
    quantize.write_denoiser(source, family, "gguf-q8_0", tmp_path / "requantized.gguf")
    requantized = quantized.load_denoiser(family, tmp_path / "requantized.gguf", folder, torch.float32)
    with torch.inference_mode():
        got = requantized(**inputs).sample
    assert (got - expected).norm() / expected.norm() < 0.05  # without the scales applied: > 1


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def test_comfyui_mixed_precision_markers(served: Served, demo_root: Path, tmp_path: Path) -> None:
    """ComfyUI's mixed-precision files: `<layer>.weight_scale` and a `<layer>.comfy_quant` format marker per FP8
    layer. FP8 loads as any scaled FP8 file; another format is refused at start-up and at load, naming the layer."""
    folder = demo.ensure_demo_model("flux", demo_root)
    plain = quantized.load_denoiser("flux", served.files["flux-fp8"], folder, torch.float32)
    with safe_open(str(served.files["flux-fp8"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mixed: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mixed[key] = t
        if t.dtype == torch.float8_e4m3fn:
            layer = key.removesuffix(".weight")
            mixed[layer + ".weight_scale"], mixed[layer + ".comfy_quant"] = torch.tensor(1.0), _comfy_quant(
                "float8_e4m3fn")  # fmt: skip
    save_file(mixed, str(tmp_path / "fp8mixed.safetensors"))
    spec = ModelSpec(id="m", family="flux", source="demo:flux", denoiser=str(tmp_path / "fp8mixed.safetensors"))
    quantized.check_file(spec)
    model = quantized.load_denoiser("flux", tmp_path / "fp8mixed.safetensors", folder, torch.float32)
    inputs = _denoiser_inputs("flux")
    with torch.inference_mode():
        assert torch.equal(plain(**inputs).sample, model(**inputs).sample)
    marked = next(k for k in mixed if k.endswith(".comfy_quant"))
    mixed[marked] = _comfy_quant("nvfp4")
    save_file(mixed, str(tmp_path / "nvfp4.safetensors"))
    says = rf"{marked.removesuffix('.comfy_quant')}: ComfyUI's 'nvfp4' quantisation is not supported"
    with pytest.raises(CheckpointError, match=says):
        quantized.check_file(spec.model_copy(update={"denoiser": str(tmp_path / "nvfp4.safetensors")}))
    with pytest.raises(CheckpointError, match=says):
        quantized.load_denoiser("flux", tmp_path / "nvfp4.safetensors", folder, torch.float32)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_an_all_in_one_checkpoint_gives_its_denoiser(served: Served, demo_root: Path, tmp_path: Path, family) -> None:
    """ComfyUI's flux1-dev-fp8 and A1111's SD files hold the denoiser under `model.diffusion_model.` beside the text
    encoders and VAE: as a `denoiser:` file, the denoiser's tensors are read and the rest is left alone."""
    folder = demo.ensure_demo_model(family, demo_root)
    plain = quantized.load_denoiser(family, served.files[f"{family}-fp8"], folder, torch.float32)
    with safe_open(str(served.files[f"{family}-fp8"]), framework="pt") as f:
        tensors = {"model.diffusion_model." + k: f.get_tensor(k) for k in f.keys()}
    others = ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", "vae.decoder.conv_in.weight")
    if family == "sdxl":
        others = ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                  "first_stage_model.decoder.conv_in.weight")  # fmt: skip
    tensors.update({key: torch.ones(3, 3) for key in others})
    save_file(tensors, str(tmp_path / "all_in_one.safetensors"))
    spec = ModelSpec(id="a", family=family, source=f"demo:{family}", denoiser=str(tmp_path / "all_in_one.safetensors"))
    quantized.check_file(spec)  # the start-up check finds the denoiser too
    model = quantized.load_denoiser(family, tmp_path / "all_in_one.safetensors", folder, torch.float32)
    inputs = _denoiser_inputs(family)
    with torch.inference_mode():
        assert torch.equal(plain(**inputs).sample, model(**inputs).sample)


def test_text_encoder_from_an_fp8_file(data_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    folder = demo.ensure_demo_model("flux", demo_root)
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"))
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in t5.state_dict().items()}
    state.pop("encoder.embed_tokens.weight", None)  # tied to `shared`, as the community files leave it out
    save_file(state, str(tmp_path / "t5_fp8.safetensors"))
    encoder = quantized.load_text_encoder("text_encoder_2", tmp_path / "t5_fp8.safetensors", folder, torch.float32)
    assert any(p.dtype == torch.float8_e4m3fn for p in encoder.parameters())
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.inference_mode():
        want, got = t5(ids).last_hidden_state, encoder(ids).last_hidden_state
    assert float((got - want).norm() / want.norm()) < 0.15  # FP8's 3 mantissa bits, through 2 layers
    # And in the pipeline, through a model entry's `text_encoder_2:`.
    t5_file = str(tmp_path / "t5_fp8.safetensors")
    spec = ModelSpec(id="t5-fp8", family="flux", source="demo:flux", text_encoder_2=t5_file)
    engine = Engine(Registry([spec]), EngineConfig(data_dir=data_dir, preload_default=False))
    loaded = engine._load_model(spec)
    assert any(p.dtype == torch.float8_e4m3fn for p in loaded.base.text_encoder_2.parameters())
    req = GenerationRequest(model="t5-fp8", prompt="a fox", width=64, height=64, steps=2, seed=1)
    from pipelines.families import adapter_for

    with torch.inference_mode():
        (image,) = adapter_for("flux").run(loaded, req, [1], None, lambda step, total: False)
    assert image.size == (64, 64)


def test_text_encoder_files_with_extra_tensors_load(demo_root: Path, tmp_path: Path, caplog) -> None:
    """A CLIP-L file as the community has them: `text_model.*` keys (transformers 5 names them without the prefix
    and renames while loading), and, exported from a full CLIPModel, text_projection and logit_scale, which FLUX's
    CLIPTextModel has no place for: ignored and logged. A missing tensor is still an error naming it."""
    from transformers import CLIPTextModel

    folder = demo.ensure_demo_model("flux", demo_root)
    clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.state_dict().items()}
    hidden = clip.config.hidden_size
    extra = {"text_projection.weight": torch.randn(hidden, hidden), "logit_scale": torch.tensor(4.6)}
    save_file({**state, **extra}, str(tmp_path / "clip_l.safetensors"))
    with caplog.at_level("INFO", logger="easel.quantized"):
        encoder = quantized.load_text_encoder("text_encoder", tmp_path / "clip_l.safetensors", folder, torch.float32)
    assert "2 tensors the text_encoder does not use, ignored" in caplog.text and "logit_scale" in caplog.text
    ids = torch.tensor([[1, 5, 6, 2]])
    with torch.inference_mode():
        assert torch.equal(encoder(ids).last_hidden_state, clip(ids).last_hidden_state)
    del state["text_model.final_layer_norm.weight"]
    save_file(state, str(tmp_path / "clip_missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing, e.g. (text_model.)?final_layer_norm.weight"):
        quantized.load_text_encoder("text_encoder", tmp_path / "clip_missing.safetensors", folder, torch.float32)


def test_qwen_text_encoder_from_a_comfyui_style_fp8_file(data_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    """Qwen2.5-VL files keep the keys transformers writes (`model.layers.*`, `visual.*`: ComfyUI's
    qwen_2.5_vl_7b_fp8_scaled too), which the loaded model names `model.language_model.*` / `model.visual.*`; text
    encoder files may also leave out the LM head. Both load, FP8 stays FP8, and the pipeline generates."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = demo.ensure_demo_model("qwen-image", demo_root)
    (saved,) = (folder / "text_encoder").glob("*.safetensors")
    with safe_open(str(saved), framework="pt") as f:
        keys = list(f.keys())
        state = {k: f.get_tensor(k) for k in keys if k != "lm_head.weight"}
    assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and "embed" not in k else v) for k, v in state.items()}
    save_file(state, str(tmp_path / "qwen_te_fp8.safetensors"))
    encoder = quantized.load_text_encoder("text_encoder", tmp_path / "qwen_te_fp8.safetensors", folder, torch.float32)
    assert any(p.dtype == torch.float8_e4m3fn for p in encoder.parameters())
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        want = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert float((got - want).norm() / want.norm()) < 0.15  # FP8's 3 mantissa bits, through the layers
    spec = ModelSpec(id="qwen-te-fp8", family="qwen-image", source="demo:qwen-image",
                     text_encoder=str(tmp_path / "qwen_te_fp8.safetensors"))  # fmt: skip
    engine = Engine(Registry([spec]), EngineConfig(data_dir=data_dir, preload_default=False))
    loaded = engine._load_model(spec)
    req = GenerationRequest(model="qwen-te-fp8", prompt="a fox", width=64, height=64, steps=2, seed=1)
    from pipelines.families import adapter_for

    with torch.inference_mode():
        (image,) = adapter_for("qwen-image").run(loaded, req, [1], None, lambda step, total: False)
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    ("model_id", "says"),
    [
        ("bad-family", "holds a FLUX.1 transformer, but the model's family is sd15"),
        ("bad-truncated", "not a readable GGUF file"),
        ("bad-corrupt", "not a readable safetensors file"),
    ],
)
def test_bad_files_are_named_at_start_up_and_refused_per_model(served: Served, model_id: str, says: str) -> None:
    message = served.engine.broken_models[model_id]
    assert says in message and (".gguf" in message or ".safetensors" in message)
    body = {
        "prompt": "x",
        "steps": 1,
        "width": 64,
        "height": 64,
        "override_settings": {"sd_model_checkpoint": model_id},
    }
    r = served.client.post("/sdapi/v1/txt2img", json=body)
    assert 400 <= r.status_code < 600 and r.status_code != 200
    error = r.json()
    assert model_id in error["detail"] and says in error["detail"]
    assert "Traceback" not in r.text
    # The other models keep serving.
    assert a1111_txt2img(served.client, "demo-sd15", 1).shape == (64, 64, 3)


def test_tensors_of_another_architecture_fail_at_load_naming_the_file(served: Served) -> None:
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "bad-mismatch"}}  # fmt: skip
    r = served.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 500 and "Traceback" not in r.text
    detail = r.json()["detail"]
    assert "bad-mismatch" in detail and served.files["sd15-fp8"].name in detail and "do not match" in detail


def test_unknown_gguf_type_is_named(served: Served, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    # A type diffusers cannot dequantize (IQ2_XXS); the bytes only have to be well-formed.
    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor("input_blocks.0.0.weight", np.zeros((4, size), dtype=np.uint8),
                      raw_dtype=qtype)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"iq\.gguf: GGUF quantisation type IQ2_XXS is not supported"):
        quantized.read_tensors(path)


def test_quantize_never_overwrites_without_force(served: Served, data_dir: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out.gguf"
    target.write_bytes(b"keep me")
    yaml = tmp_path / "m.yaml"
    yaml.write_text(_yaml({"demo-flux": {"family": "flux", "source": "demo:flux"}}, "demo-flux"))
    common = ["--models", str(yaml), "--data-dir", str(data_dir)]
    assert main(["quantize", "demo-flux", "--format", "gguf-q8_0", "--out", str(target), *common]) == 1
    assert "pass --force" in capsys.readouterr().err and target.read_bytes() == b"keep me"
    assert main(["quantize", "demo-flux", "--format", "gguf-q8_0", "--out", str(target), "--force", *common]) == 0
    assert target.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    shutil.rmtree(tmp_path / "none", ignore_errors=True)


def _engine_with(data_dir: Path, **performance: object) -> tuple[Engine, ModelSpec]:
    spec = ModelSpec(id="q", family="sd15", source="demo:sd15", performance=performance)
    return Engine(Registry([spec]), EngineConfig(data_dir=data_dir, preload_default=False)), spec


@pytest.mark.parametrize(("how", "step"), [("int8", "int8"), ("fp8", "fp8-storage")])
def test_quantize_at_load_on_cpu(data_dir: Path, how: str, step: str) -> None:
    """int8: torchao weight-only; fp8 without FP8 compute: FP8 storage, layer by layer in the model's dtype."""
    if how == "int8":
        pytest.importorskip("torchao")
    engine, spec = _engine_with(data_dir, quantization=how, quantize_text_encoders=True)
    loaded = engine._load_model(spec)
    assert f"{step}:unet" in loaded.optimizations and f"{step}:text_encoder" in loaded.optimizations
    weights = loaded.base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    if how == "fp8":
        assert weights.dtype == torch.float8_e4m3fn
    else:
        assert "Int8" in type(weights).__name__
    req = GenerationRequest(model="q", prompt="a cube", width=64, height=64, steps=2, seed=3)
    from pipelines.families import adapter_for

    with torch.inference_mode():
        (image,) = adapter_for("sd15").run(loaded, req, [3], None, lambda step, total: False)
    assert image.size == (64, 64)


def test_nf4_without_cuda_is_a_clear_load_error(data_dir: Path) -> None:
    engine, spec = _engine_with(data_dir, quantization="nf4")
    with pytest.raises(ModelLoadError, match=r"model 'q': quantization nf4 needs a CUDA device"):
        engine._load_model(spec)


# --- offload: auto ------------------------------------------------------------------------------------------------

GIB = 1 << 30


def test_offload_auto_picks_the_fastest_mode_that_fits() -> None:
    flux_like = placement.Footprint(denoiser=24 * GIB, text_encoders=10 * GIB, vae=GIB // 4, largest_layer=GIB // 8)
    assert placement.choose(flux_like, 80 * GIB).mode == "resident"
    assert placement.choose(flux_like, 200 * GIB).vae_tiling_above_pixels is None  # decodes 4096² untiled
    assert placement.choose(flux_like, 80 * GIB).vae_tiling_above_pixels == 14227079  # ~3770², then tiles
    assert placement.choose(flux_like, 36 * GIB).mode == "text-encoders"
    assert placement.choose(flux_like, int(30.1 * GIB)).mode == "model"  # the denoiser alone + working memory
    small = placement.choose(flux_like, 7 * GIB)  # the largest layer + working memory (a quarter of the denoiser)
    assert small.mode == "sequential" and small.vae_tiling_above_pixels is not None
    with pytest.raises(placement.PlacementError, match=r"needs at least .* bytes.*free"):
        placement.choose(flux_like, 3 * GIB)
    no_encoders = placement.Footprint(denoiser=5 * GIB, text_encoders=0, vae=GIB // 4)
    assert placement.choose(no_encoders, int(6.3 * GIB)).mode == "model"  # no encoder tier without encoders


def test_offload_auto_on_a_real_pipeline_with_a_fake_probe(load, caplog: pytest.LogCaptureFixture) -> None:
    pipe = load("sdxl").base
    size = placement.footprint_of(pipe, torch.float32)
    assert size.denoiser > 0 and size.text_encoders > 0 and size.vae > 0
    device = torch.device("cuda")
    try:
        placement.set_probe(lambda d: (100 * GIB, 100 * GIB))
        with caplog.at_level("INFO", logger="easel.placement"):
            assert placement.plan(pipe, "m", device, torch.float32).mode == "resident"
        assert "offload auto chose 'resident'" in caplog.text and "bytes" in caplog.text and "free" in caplog.text
        # A small budget: whole-model offload (the floor of the working memory is half a GiB).
        budget = size.working + size.denoiser + 1
        placement.set_probe(lambda d: (budget, budget))
        assert placement.plan(pipe, "m", device, torch.float32).mode == "model"
        placement.set_probe(lambda d: (1000, 1000))
        with pytest.raises(placement.PlacementError, match="model m: cannot fit even with sequential offload"):
            placement.plan(pipe, "m", device, torch.float32)
    finally:
        placement.set_probe(None)


def test_the_cache_evicts_lru_pipelines_before_a_load_would_not_fit() -> None:
    """Each loaded model takes 10 GiB of a 25 GiB card; a third load evicts the least recently used one first."""
    from pipelines.cache import PipelineCache
    from pipelines.families.base import LoadedModel

    loaded: list[str] = []

    def probe(device: torch.device) -> tuple[int, int]:
        return 25 * GIB - 10 * GIB * len(cache.loaded_ids()), 25 * GIB

    def loader(s: ModelSpec) -> LoadedModel:
        footprint = placement.Footprint(denoiser=8 * GIB, text_encoders=0, vae=GIB)
        evict = placement._room_maker.get()
        while placement.choose(footprint, probe(torch.device("cuda"))[0]).mode != "resident" and evict():
            pass
        loaded.append(s.id)
        return LoadedModel(spec=s, base=object(), device=torch.device("cpu"), dtype=torch.float32)

    cache = PipelineCache(loader, max_models=5)
    for model_id in ("a", "b"):
        cache.get(ModelSpec(id=model_id, family="sd15", source="demo:sd15"))
    cache.get(ModelSpec(id="a", family="sd15", source="demo:sd15"))  # a is now the most recently used
    cache.get(ModelSpec(id="c", family="sd15", source="demo:sd15"))
    assert cache.loaded_ids() == ["a", "c"] and cache.evictions == {"b": 1}


# --- GGUF dequantized once ------------------------------------------------------------------------------------------


def test_gguf_dequantized_once_makes_the_same_image(served: Served) -> None:
    """`performance.gguf: dequantize`: the same weights, dequantized at load instead of on every call."""
    once = a1111_txt2img(served.client, "flux-gguf-q8_0-once", SEEDS[0])
    assert np.array_equal(once, a1111_txt2img(served.client, "flux-gguf-q8_0", SEEDS[0]))
    loaded = served.engine.cache.get(served.engine.registry.get("flux-gguf-q8_0-once"))
    assert "gguf-dequantized" in loaded.optimizations and not quantized.is_gguf(loaded.base.transformer)


def test_gguf_auto_dequantizes_only_when_the_pipeline_still_fits_resident(served: Served, demo_root: Path) -> None:
    from diffusers import FluxPipeline

    from pipelines.optimize import dequantize_gguf_if_it_fits

    folder = demo.ensure_demo_model("flux", demo_root)
    gguf_model = quantized.load_denoiser("flux", served.files["flux-gguf-q8_0"], folder, torch.float32)
    inputs = _denoiser_inputs("flux")
    with torch.inference_mode():
        expected = gguf_model(**inputs).sample

    def pipe() -> FluxPipeline:
        return FluxPipeline.from_pretrained(str(folder), transformer=gguf_model)

    cuda = torch.device("cuda")  # only the probe and the policy look at the device: nothing touches CUDA here
    dequantized = quantized.dequantized_bytes(gguf_model, torch.float32)
    assert dequantized > placement.module_bytes(gguf_model)  # Q8_0 is smaller than float32
    try:
        placement.set_probe(lambda d: (100 * GIB, 100 * GIB))
        fits, needed, _ = placement.resident_with(pipe(), dequantized, cuda, torch.float32)
        assert fits
        assert dequantize_gguf_if_it_fits(pipe(), "keep", "m", cuda) == []
        assert dequantize_gguf_if_it_fits(pipe(), "auto", "m", torch.device("cpu")) == []  # auto: CUDA only
        placement.set_probe(lambda d: (needed - 1, needed - 1))  # the quantized pipeline would still fit
        small = pipe()
        assert dequantize_gguf_if_it_fits(small, "auto", "m", cuda) == []
        assert quantized.is_gguf(small.transformer)
        placement.set_probe(lambda d: (needed, needed))
        roomy = pipe()
        assert dequantize_gguf_if_it_fits(roomy, "auto", "m", cuda) == ["gguf-dequantized"]
    finally:
        placement.set_probe(None)
    plain = roomy.transformer
    assert not quantized.is_gguf(plain) and not any(type(m).__name__ == "GGUFLinear" for m in plain.modules())
    assert placement.module_bytes(plain) == dequantized
    with torch.inference_mode():
        assert torch.equal(plain(**inputs).sample, expected)


def test_memory_and_metrics_report_each_loaded_models_bytes(served: Served) -> None:
    a1111_txt2img(served.client, "flux-gguf-q4_0", 1)
    loaded = served.engine.cache.get(served.engine.registry.get("flux-gguf-q4_0"))
    memory = served.client.get("/sdapi/v1/memory").json()
    assert set(memory) == {"ram", "cuda"}  # A1111's shape
    assert memory["ram"]["models"]["flux-gguf-q4_0"] == loaded.approx_bytes() > 0  # all on the CPU here
    metrics = served.client.get("/metrics").text
    line = (
        f'easel_model_memory_bytes{{device="cpu",location="cpu",model="flux-gguf-q4_0"}} {float(loaded.approx_bytes())}'
    )
    assert line in metrics


def test_text_encoders_off_the_device_make_the_same_image(demo_root: Path) -> None:
    """The 'text-encoders' placement (encoders wait on the CPU, visit the device to encode) runs the pipeline as is;
    on CPU the device is the CPU too, so the pixels must not change."""
    from pipelines.families import adapter_for

    spec = ModelSpec(id="m", family="flux", source="demo:flux")
    folder = demo.ensure_demo_model("flux", demo_root)
    loaded = adapter_for("flux").load(spec, str(folder), torch.device("cpu"), torch.float32)
    req = GenerationRequest(model="m", prompt="a fox", width=64, height=64, steps=2, seed=1)

    def image() -> np.ndarray:
        with torch.inference_mode():
            (out,) = adapter_for("flux").run(loaded, req, [1], None, lambda step, total: False)
        return np.asarray(out)

    before = image()
    placement.apply(loaded.base, placement.Placement("text-encoders", 1, 2, 256 * 256), torch.device("cpu"))
    assert loaded.execution_device is None  # hooks move modules: not pinned
    assert loaded.base.vae._easel_tiling_above == 256 * 256
    assert np.array_equal(before, image())


@pytest.mark.parametrize("model_id", ["flux-gguf-q4_0", "sdxl-fp8"])
def test_img2img_derives_from_a_quantized_base_without_casting_it(served: Served, model_id: str) -> None:
    """from_pipe casts every module to one dtype: the quantized denoiser must keep its storage (GGUF, FP8)."""
    from pipelines.families import adapter_for

    spec = served.engine.registry.get(model_id)
    loaded = served.engine.cache.get(spec)
    denoiser = getattr(loaded.base, "transformer", None) or loaded.base.unet
    before = {p.dtype for p in denoiser.parameters()}
    req = GenerationRequest(model=model_id, prompt="a fox", task=Task.IMG2IMG, width=64, height=64, steps=2, seed=1,
                            strength=0.6, init_images=[Image.new("RGB", (64, 64), "red")])  # fmt: skip
    adapter_for(spec.family).pipeline_for(loaded, Task.IMG2IMG)  # from_pipe, once
    assert {p.dtype for p in denoiser.parameters()} == before
    with torch.inference_mode():
        (image,) = adapter_for(spec.family).run(loaded, req, [1], None, lambda step, total: False)
    assert image.size == (64, 64)
    assert {p.dtype for p in denoiser.parameters()} == before and (
        torch.uint8 in before or torch.float8_e4m3fn in before
    )


def test_e5m2_files_load_and_stay_e5m2(served: Served, demo_root: Path, tmp_path: Path) -> None:
    folder = demo.ensure_demo_model("qwen-image", demo_root)
    with safe_open(str(served.files["qwen-image-fp8"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    e5m2 = {k: (t.float().to(torch.float8_e5m2) if t.dtype == torch.float8_e4m3fn else t) for k, t in tensors.items()}
    save_file(e5m2, str(tmp_path / "e5m2.safetensors"))
    model = quantized.load_denoiser("qwen-image", tmp_path / "e5m2.safetensors", folder, torch.float32)
    assert torch.float8_e5m2 in {p.dtype for p in model.parameters()}
    reference = quantized.load_denoiser("qwen-image", served.files["qwen-image-fp8"], folder, torch.float32)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([0.5]),
                  img_shapes=[(1, 4, 4)])  # fmt: skip
    with torch.inference_mode():
        want, got = reference(**inputs).sample, model(**inputs).sample
    assert float((got - want).norm() / want.norm()) < 0.2  # e5m2 has 2 mantissa bits to e4m3's 3


def test_loras_apply_to_quantized_denoisers(served: Served, data_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    """flux1-dev-fp8 or a GGUF file with a LoRA is the common case: the LoRA's layers run in the compute dtype (PEFT
    made them FP8 on an FP8-stored layer, which cannot run), change the image, and go away after the call."""
    from diffusers import FluxTransformer2DModel

    from pipelines.lora import LoraManager, LoraRegistry
    from tests.lora_helpers import ATTN, prefixed, random_lora

    transformer = FluxTransformer2DModel.from_pretrained(demo.ensure_demo_model("flux", demo_root) / "transformer")
    (tmp_path / "Lora").mkdir()
    save_file(prefixed("transformer", random_lora(transformer, ATTN, seed=5)), tmp_path / "Lora" / "style.safetensors")
    for model_id in ("flux-fp8", "flux-gguf-q4_0"):
        loaded = served.engine.cache.get(served.engine.registry.get(model_id))
        if loaded is None:
            a1111_txt2img(served.client, model_id, 1)
            loaded = served.engine.cache.get(served.engine.registry.get(model_id))
        loaded.loras = LoraManager(loaded.base, LoraRegistry(tmp_path / "Lora"))
        try:
            req = {"model": model_id, "width": 64, "height": 64, "steps": 2, "seed": 5}
            runs = [served.engine.submit(GenerationRequest(prompt=p, **req)).wait_sync(120)
                    for p in ("a red fox", "a red fox <lora:style:1>", "a red fox")]  # fmt: skip
        finally:
            loaded.loras = None
        plain, styled, again = (np.asarray(r.images[0], dtype=np.int16) for r in runs)
        assert np.abs(styled - plain).mean() > 0.3, model_id
        assert np.array_equal(again, plain), model_id
        lora_dtypes = {p.dtype for n, p in loaded.base.transformer.named_parameters() if ".lora_" in n}
        assert lora_dtypes == {torch.float32}, (model_id, lora_dtypes)


@pytest.mark.parametrize(
    ("model_id", "unit"),
    [
        ("flux-gguf-q4_0", {"model": "control_demo-flux", "source": "demo:flux"}),
        ("sdxl-gguf-q8_0", {"model": "control_demo-sdxl", "source": "demo:sdxl"}),
        (
            "sd15-gguf-q8_0",
            {"model": "ip-adapter_demo-sd15", "source": "demo-ip:sd15", "image_encoder": "demo-ip:sd15"},
        ),
        ("sd15-fp8", {"model": "ip-adapter_demo-sd15", "source": "demo-ip:sd15", "image_encoder": "demo-ip:sd15"}),
    ],
)
def test_controlnet_and_ip_adapter_on_quantized_denoisers(served: Served, model_id: str, unit: dict) -> None:
    """A GGUF denoiser refuses the whole-model cast that diffusers' from_pipe (ControlNet pipelines) and IP-Adapter
    loading end with: both failed on every request before. The unit steers the image; without it the model gives
    its own image again, in its own storage."""
    from PIL import ImageDraw

    from pipelines.control_units import ControlUnit

    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle((16, 16, 48, 48), fill="white")
    req = {"model": model_id, "prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 5}
    plain = served.engine.submit(GenerationRequest(**req)).wait_sync(120)
    loaded = served.engine.cache.get(served.engine.registry.get(model_id))
    denoiser = loaded.base.transformer if model_id.startswith("flux") else loaded.base.unet
    stored = {p.dtype for p in denoiser.parameters()}
    steered = served.engine.submit(GenerationRequest(**req, control_units=[ControlUnit(**unit, image=square)]))
    again = served.engine.submit(GenerationRequest(**req)).wait_sync(120)
    a, b, c = (np.asarray(r.images[0], dtype=np.int16) for r in (plain, steered.wait_sync(120), again))
    assert np.abs(b - a).mean() > 0.3 and np.array_equal(c, a)
    assert {p.dtype for p in denoiser.parameters()} == stored


def test_a_text_encoder_lora_applies_to_an_fp8_text_encoder_file(data_dir: Path, demo_root: Path, tmp_path) -> None:
    from transformers import CLIPTextModel

    from tests.lora_helpers import prefixed, random_lora

    folder = demo.ensure_demo_model("flux", demo_root)
    clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v).contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(tmp_path / "clip_fp8.safetensors"))
    (tmp_path / "Lora").mkdir()
    save_file(
        prefixed("text_encoder", random_lora(clip, ["q_proj", "v_proj"], seed=9)), tmp_path / "Lora" / "te.safetensors"
    )
    spec = ModelSpec(
        id="te-fp8", family="flux", source="demo:flux", text_encoder=str(tmp_path / "clip_fp8.safetensors")
    )
    engine = Engine(
        Registry([spec]), EngineConfig(data_dir=data_dir, lora_dir=tmp_path / "Lora", preload_default=False)
    )
    engine.start()
    try:
        req = {"model": "te-fp8", "width": 64, "height": 64, "steps": 2, "seed": 5}
        runs = [engine.submit(GenerationRequest(prompt=p, **req)).wait_sync(120)
                for p in ("a red fox", "a red fox <lora:te:1>", "a red fox")]  # fmt: skip
    finally:
        engine.stop()
    plain, styled, again = (np.asarray(r.images[0], dtype=np.int16) for r in runs)
    assert np.abs(styled - plain).mean() > 0.3 and np.array_equal(again, plain)


@pytest.mark.parametrize("model_id", ["flux-fp8", "flux-gguf-q8_0"])
def test_the_fast_path_leaves_quantized_projections_unfused(served: Served, model_id: str, caplog) -> None:
    """Fusing concatenates the q/k/v weights: FP8-stored or GGUF ones make no fused layer (diffusers raised, and the
    step was logged as a failure on every load). The step is skipped and said so; the model still makes its image."""
    from pipelines.optimize import apply_optimizations

    before = a1111_txt2img(served.client, model_id, 3)
    loaded = served.engine.cache.get(served.engine.registry.get(model_id))
    spec = ModelSpec(id=model_id, family="flux", source="demo:flux", performance={"compile": "off"})
    with caplog.at_level("INFO", logger="easel.optimize"):
        applied = apply_optimizations(loaded.base, spec, torch.device("cpu"), force=True)
    assert "fuse_qkv" not in applied and "not applied" not in caplog.text
    assert "QKV projections not fused: its weights are stored quantized" in caplog.text
    assert np.array_equal(a1111_txt2img(served.client, model_id, 3), before)
