"""Issue #22's capped-memory rows on the lent GPU: full-size random-weight models through `easel quantize`'s writer,
a model entry's `denoiser:` loader and `offload: auto`, with the process capped to a smaller card
(scripts/bench_capped.py; the whole table is `bash scripts/bench_gpu.sh capped`). Skipped without CUDA.

Each row runs in its own process (a cap is per process). EASEL_CAPPED_ROWS picks rows (comma-separated names from
`python scripts/bench_capped.py --list`); the default is the two 24 GB FLUX rows, which fit a short device check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_capped.py"
ROWS = os.environ.get("EASEL_CAPPED_ROWS", "flux-fp8@24,flux-gguf-q8_0@24").split(",")


@pytest.mark.parametrize("row", ROWS)
def test_capped_row_completes_within_its_cap(row: str, tmp_path: Path) -> None:
    out = tmp_path / "row.json"
    subprocess.run([sys.executable, str(SCRIPT), "--row", row, "--json-out", str(out)], check=True, timeout=900)
    (result,) = json.loads(out.read_text())
    assert "error" not in result, result
    cap = result["row"]["cap_gb"]
    if cap is not None:
        assert result["peak_bytes"] <= cap * 2**30, result  # the cap held: the run did not need more
    if result["row"]["fmt"] != "bf16":
        assert result["relative_error"] is not None and result["relative_error"] < 0.1, result
    print(json.dumps(result))
