"""GGUF K-quant writing (`easel quantize --format gguf-q4_k|q5_k|q6_k`): the bytes decode with the gguf package's own
dequantizers (llama.cpp's layouts) and with diffusers' (what loads them), closer to the input than the legacy type of
the same width, and a transformer with 256-wide rows written so serves through `denoiser:` with a small error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pipelines import gguf_kquants, quantize, quantized  # noqa: E402

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
# Relative error bounds (Frobenius) on N(0, 1) weights with a few outliers; measured: Q4_K 0.074, Q5_K 0.037,
# Q6_K 0.020. A wrong bit in the packing gives errors of order 1.
BOUNDS = {"Q4_K": 0.085, "Q5_K": 0.043, "Q6_K": 0.024}
LEGACY_OF_THE_SAME_WIDTH = {"Q4_K": "Q4_0", "Q5_K": "Q5_0"}


def _weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[:, 7] *= 20  # outlier columns, as real weight matrices have
    x[3] = 0.0  # an all-zero row
    x[4] = -2.5  # a constant negative row
    x[5] = np.abs(x[5]) + 1  # a row with no negative value
    return x


def _relative_error(decoded: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(decoded - x) / np.linalg.norm(x))


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quants_decode_with_the_reference_dequantizers(name: str) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    x = _weights()
    qtype = gguf.GGMLQuantizationType[name]
    data = gguf_kquants.quantize(torch.from_numpy(x), name).numpy()
    assert data.dtype == np.uint8 and data.shape == (64, 1024 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    decoded = gguf.quants.dequantize(data, qtype)
    assert decoded.shape == x.shape
    error = _relative_error(decoded, x)
    assert error < BOUNDS[name], error
    np.testing.assert_array_equal(decoded[3], 0.0)  # zeros stay exactly zero
    for row in (4, 5):  # one-signed rows: each value within half a quantisation step of the row's own range
        assert np.abs(decoded[row] - x[row]).max() <= 0.1 * np.abs(x[row]).max(), row
    if name in LEGACY_OF_THE_SAME_WIDTH:
        legacy = gguf.GGMLQuantizationType[LEGACY_OF_THE_SAME_WIDTH[name]]
        assert error < _relative_error(gguf.quants.dequantize(gguf.quants.quantize(x, legacy), legacy), x)
    # diffusers' own dequantizer (the one `denoiser: *.gguf` runs) reads the same values, up to its fp16 arithmetic.
    parameter = GGUFParameter(torch.from_numpy(data), quant_type=qtype)
    assert _relative_error(dequantize_gguf_tensor(parameter).float().numpy(), decoded) < 2e-3


def test_k_quants_refuse_rows_that_are_not_whole_blocks() -> None:
    with pytest.raises(ValueError, match="256"):
        gguf_kquants.quantize(torch.zeros(4, 320), "Q4_K")


def _wide_flux(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A two-block FLUX transformer whose matrices have 256- and 1024-value rows (the demo model's are too narrow for
    K-quant blocks), saved as a base folder for `load_denoiser`."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=256, axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip
    base = tmp_path / "base"
    model.save_config(str(base / "transformer"))
    return model, base


def _flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 256, generator=g),
        "pooled_projections": torch.randn(1, 256, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def test_a_k_quant_denoiser_loads_quantized_and_stays_close(tmp_path: Path) -> None:
    model, base = _wide_flux(tmp_path)
    inputs = _flux_inputs()
    with torch.no_grad():
        reference = model(**inputs).sample
    errors = {}
    for fmt in ("gguf-q6_k", "gguf-q5_k", "gguf-q4_k", "gguf-q4_0"):
        path = tmp_path / f"{fmt}.gguf"
        result = quantize.write_denoiser(model, "flux", fmt, path)
        assert result.quantized > 0
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        qname = fmt.removeprefix("gguf-").upper()
        assert types["double_blocks.0.img_attn.qkv.weight"] == qname  # rows of 256
        if qname.endswith("_K"):  # rows of 64: not a whole K block, kept in F16 as ComfyUI-GGUF keeps it
            assert types["img_in.weight"] == "F16"
        loaded = quantized.load_denoiser("flux", path, base, torch.float32)
        kinds = {m.weight.quant_type.name for m in loaded.modules() if type(m).__name__ == "GGUFLinear"}
        assert qname in kinds
        with torch.no_grad():
            out = loaded(**inputs).sample
        errors[fmt] = float((out - reference).norm() / reference.norm())
    assert errors["gguf-q6_k"] < errors["gguf-q5_k"] < errors["gguf-q4_k"] < errors["gguf-q4_0"], errors
    assert errors["gguf-q4_k"] < 0.1, errors


def test_easel_quantize_writes_k_quants_and_names_a_missing_device(data_dir: Path, tmp_path: Path, capsys) -> None:
    from server.cli import main

    models = tmp_path / "m.yaml"
    models.write_text("default_model: demo-flux\nmodels:\n  demo-flux:\n    family: flux\n    source: demo:flux\n")
    common = ["--models", str(models), "--data-dir", str(data_dir)]
    out = tmp_path / "q4k.gguf"
    args = ["quantize", "demo-flux", "--format", "gguf-q4_k", "--out", str(out), *common]
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 1
        assert "--device cuda: no CUDA device here" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--device", "cpu"]) == 0
    assert "tensors in gguf-q4_k" in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q4_K_S
