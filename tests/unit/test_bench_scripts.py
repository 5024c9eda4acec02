"""The benchmark scripts run: bench.py parses its options; bench_gpu.py's harness runs on CPU with tiny configs and its
full-size configurations reproduce the published parameter counts (built on the meta device: no memory, no init)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)  # bench_gpu.py writes its JSON to $OUT when set
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_help() -> None:
    r = run_script(str(SCRIPTS / "bench.py"), "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    for option in ("--n", "--k", "--steps", "--size", "--model", "--data-dir", "--json-out", "--max-batch"):
        assert option in r.stdout


def test_bench_gpu_tiny_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    r = run_script(str(SCRIPTS / "bench_gpu.py"), "--tiny", "--models", "sd15", "--json-out", str(out), timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "s/img b1" in r.stdout and "img/s sat" in r.stdout  # the table
    assert "sd15 64px 2st" in r.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["family"] == "sd15" and set(result["variants"]) == {"plain", "easel"}
    for variant in result["variants"].values():
        assert variant["s_per_image_b1"] > 0
        assert variant["img_per_s_saturated"] > 0
        assert [row["batch"] for row in variant["sweep"]][0] == 1


def test_full_size_configs_match_published_parameter_counts(tmp_path: Path) -> None:
    out = tmp_path / "params.json"
    r = run_script(str(SCRIPTS / "bench_gpu.py"), "--check-configs", "--json-out", str(out), timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    for family, published in data["published_denoiser_params"].items():
        counts = data["params"][family]
        denoiser = counts.get("unet") or counts["transformer"]
        assert abs(denoiser / published - 1) < 0.005, (family, denoiser, published)
    # Text encoders: CLIP-L 123 M, OpenCLIP bigG 695 M, T5-XXL encoder 4.76 B, Qwen2.5-VL-7B 8.29 B.
    assert round(data["params"]["sd15"]["text_encoder"] / 1e6) == 123
    assert round(data["params"]["sdxl"]["text_encoder_2"] / 1e6) == 695
    assert round(data["params"]["flux"]["text_encoder_2"] / 1e7) == 476
    assert round(data["params"]["qwen-image"]["text_encoder"] / 1e7) == 829


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("easel_bench_script", SCRIPTS / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_statistics() -> None:
    bench = _load_bench()
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == 4.8  # linear, as numpy
    # One batched call answers three requests within milliseconds; unbatched calls finish a call time apart.
    assert bench.completion_clusters([10.000, 10.004, 10.009], min_latency=1.0) == 1
    assert bench.completion_clusters([10.0, 11.0, 12.0, 12.003], min_latency=1.0) == 3
