"""A bitsandbytes NF4 file on a CUDA card: Forge-layout files of the demo FLUX (float and double-quantized block
scales) served with `performance.gguf: keep`, so the denoiser runs in bitsandbytes' 4-bit layers on the card, against
the same file decoded (`gguf: dequantize`). Skipped without CUDA or bitsandbytes (the CPU tests cover the decoder
and the conversion; bitsandbytes' CUDA kernels only run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from pipelines.engine import Engine, EngineConfig  # noqa: E402
from pipelines.registry import load_registry  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402
from tests.unit.test_bnb_files import _forge_file  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("nested", [False, True], ids=["v2", "v1-double-quantized"])
def test_nf4_layers_on_the_card_make_the_decoded_models_image(demo_root: Path, tmp_path: Path, nested: bool) -> None:
    _forge_file("flux", demo_root, tmp_path / "nf4.safetensors", nested=nested)
    lines = ["models:"]
    for policy in ("keep", "dequantize"):
        lines += [f"  nf4-{policy}:", "    family: flux", "    source: demo:flux", "    denoiser: nf4.safetensors",
                  f"    performance: {{gguf: {policy}, compile: 'off'}}"]  # fmt: skip
    (tmp_path / "models.yaml").write_text("\n".join(lines) + "\n")
    engine = Engine(load_registry(tmp_path / "models.yaml"),
                    EngineConfig(data_dir=demo_root.parent, device="cuda", preload_default=False))  # fmt: skip
    engine.start()
    try:
        images = {}
        for policy in ("keep", "dequantize"):
            req = GenerationRequest(model=f"nf4-{policy}", prompt="a red fox", width=64, height=64, steps=2, seed=5)
            images[policy] = np.asarray(engine.submit(req).wait_sync(300).images[0], dtype=np.float32)
            loaded = engine.cache.get(engine.registry.get(f"nf4-{policy}"))
            kinds = {type(m).__name__ for m in loaded.base.transformer.modules()}
            assert ("Linear4bit" in kinds) == (policy == "keep"), (policy, kinds)
    finally:
        engine.stop()
    # The same 4-bit values computed two ways (bitsandbytes' kernels in bf16/fp16 vs decoded weights): close images.
    assert np.abs(images["keep"] - images["dequantize"]).mean() < 8.0
