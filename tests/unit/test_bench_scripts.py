"""The benchmark scripts run: bench.py parses its options; bench_gpu.py's harness runs on CPU with tiny configs and its
full-size configurations reproduce the published parameter counts (built on the meta device: no memory, no init)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """One tiny run covers the harness: the four variants (FP8 skipped on CPU, with the reason), interleaved rounds,
    the JSON, the profile trace and its summary, and the summary table read back from the results folder."""
    out = tmp_path / "bench_gpu_sd15.json"
    profile = tmp_path / "profile"
    r = run_script(
        str(SCRIPTS / "bench_gpu.py"),
        *("--tiny", "--models", "sd15", "--variants", "plain", "easel", "easel-nocompile", "easel-fp8"),
        *("--profile", str(profile), "--json-out", str(out)),
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "s/img b1" in r.stdout and "GPU s b1" in r.stdout and "vs plain" in r.stdout  # the table
    assert "sd15 64px 2st" in r.stdout
    assert "sd15 easel-fp8: skipped: FP8 needs a CUDA device" in r.stdout
    result = json.loads(out.read_text())["results"][0]
    order = ["plain", "easel", "easel-fp8", "easel-nocompile"]  # goal-bearing variants first
    assert result["family"] == "sd15" and list(result["variants"]) == order
    assert result["groups"] == [order]  # CPU: all share the device
    assert "skipped" in result["variants"]["easel-fp8"]
    measured = ["plain", "easel", "easel-nocompile"]
    for name in measured:
        v = result["variants"][name]
        assert set(v["batches"]) == {"1", "2"}  # batch 1 and the (tiny) throughput batch
        for row in v["batches"].values():
            assert row["wall"]["n"] >= 1 and row["wall"]["median_s"] > 0 and row["wall"]["spread"] >= 0
            assert row["gpu"] is None and row["warmup_s"] > 0  # no CUDA events on CPU
        assert v["s_per_image_b1"] > 0 and v["img_per_s_saturated"] > 0 and v["interleaved_with_plain"]
    assert set(result["variants"]["easel"]["ratio_vs_plain"]) == {"1", "2"}
    # Interleaved: every round times each variant once, in order, before the next round starts.
    assert [(b, rnd, v) for b, rnd, v in result["order"]] == [
        *[(1, rnd, v) for rnd in (0, 1) for v in measured],  # two rounds at b1
        *[(2, 0, v) for v in measured],  # one at the throughput batch
    ]
    # The profile: a chrome trace of one Easel call, summarised (CPU activities only here).
    trace = json.loads(gzip.open(profile / "trace_sd15.json.gz", "rt").read())
    assert any(e.get("name") == "easel_call" for e in trace["traceEvents"])
    prof = result["profile"]
    assert prof["variant"] == "easel" and prof["gpu_events"] == 0
    assert any("conv" in op["name"] for op in prof["top_cpu_ops"])
    # The summary table reads the results folder back.
    (tmp_path / "bench_http.json").write_text(
        json.dumps({"overhead": {"ratio_median": 1.05}, "batching": {"throughput_ratio": 2.4}})
    )
    summary = _load_bench_gpu().summarize_dir(tmp_path)
    assert summary["families"]["sd15"]["variants"]["easel-fp8"] == {"skipped": "FP8 needs a CUDA device"}
    assert summary["families"]["sd15"]["variants"]["easel"]["s_per_image_b1"] > 0
    assert summary["http"]["overhead_met"] is False and summary["http"]["batching_met"] is True


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


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"easel_{name}_script", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load_bench():
    return _load_script("bench")


def _load_bench_gpu():
    return sys.modules.get("easel_bench_gpu_script") or _load_script("bench_gpu")


def test_bench_statistics() -> None:
    bench = _load_bench()
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == 4.8  # linear, as numpy
    # One batched call answers three requests within milliseconds; unbatched calls finish a call time apart.
    assert bench.completion_clusters([10.000, 10.004, 10.009], min_latency=1.0) == 1
    assert bench.completion_clusters([10.0, 11.0, 12.0, 12.003], min_latency=1.0) == 3


def test_engine_spec_keeps_what_this_performance_spec_takes() -> None:
    bench_gpu = _load_bench_gpu()
    spec, notes = bench_gpu.engine_spec("flux", {"compile": "auto", "attention": "no-such-backend", "bogus": 1})
    # compile=auto: taken as is where PerformanceSpec knows it, else resolved (regional for the transformers).
    assert spec.performance.compile in ("auto", "regional")
    assert spec.performance.attention == "sdpa"  # the bad value dropped, the default kept
    assert any("bogus" in n for n in notes) and any("attention" in n for n in notes)
    spec, _ = bench_gpu.engine_spec("sd15", {"compile": "auto"})
    assert spec.performance.compile in ("auto", "full")


def test_variants_share_the_device_only_when_they_fit() -> None:
    plan = _load_bench_gpu().plan_groups
    variants = ["plain", "easel", "easel-fp8", "easel-nocompile"]
    gib = 2**30
    # Qwen-Image on an 80 GB card: 38 GiB per denoiser, 25 GiB shared + reserve: one variant at a time.
    assert plan(variants, dict.fromkeys(variants, 38 * gib), 25 * gib, 66 * gib) == [[v] for v in variants]
    # FLUX there: plain and easel interleaved first, then the other two.
    assert plan(variants, dict.fromkeys(variants, 22 * gib), 18 * gib, 66 * gib) == [variants[:2], variants[2:]]
    assert plan(variants, dict.fromkeys(variants, 1), 0, None) == [variants]  # CPU: one group


def test_fp8_quality_compares_two_modules_on_the_same_inputs() -> None:
    """The FP8-vs-bf16 comparison with a stand-in: the same MLP with weights rounded to bfloat16 (the precision
    loss of a cheaper weight format), both run in float32 on the same inputs."""
    import copy

    import torch

    bench_gpu = _load_bench_gpu()

    class Denoiser(torch.nn.Module):  # a keyword argument and a tuple output, as diffusers' denoisers
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.mlp(x) * scale,)

    torch.manual_seed(0)
    reference = Denoiser().eval()
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        for p in candidate.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    inputs = [((torch.randn(4, 64),), {"scale": torch.tensor(1.0 + i)}) for i in range(3)]
    errors = bench_gpu.module_relative_errors(reference, candidate, inputs)
    assert len(errors) == 3 and all(1e-4 < e < 2e-2 for e in errors), errors
    assert bench_gpu.module_relative_errors(reference, copy.deepcopy(reference), inputs) == [0.0, 0.0, 0.0]
    # The bench's path: record the reference's calls during a run, replay them on the candidate.
    with torch.inference_mode():
        calls = bench_gpu.capture_calls(reference, lambda: [reference(*a, **k) for a, k in inputs])
        assert bench_gpu.replay_errors(candidate, calls, "cpu") == errors
    report = bench_gpu.fp8_quality_report([0.1, 0.3, 0.2, 0.4], "plain", steps=2)  # true CFG: 2 calls a step
    assert report["per_step"] == pytest.approx([0.2, 0.3]) and report["max"] == 0.4 and report["calls"] == 4


def test_trace_summary_finds_the_gpu_idle_gaps() -> None:
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 140, "dur": 70},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 100, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 120, "dur": 30},  # overlaps: busy 100-150
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 150, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 200, "dur": 10},  # 45 us idle before it
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 400, "dur": 100},  # 190 us idle before it
    ]
    s = _load_bench_gpu().summarize_trace(events)
    assert s["gpu_window_ms"] == 0.4 and s["gpu_busy_ms"] == 0.165 and round(s["gpu_idle_ms"], 6) == 0.235
    assert s["idle_gaps"] == 2 and s["idle_gaps_over_100us"] == 1
    assert [g["gap_ms"] for g in s["largest_gaps"]] == [0.19, 0.045]
    assert s["largest_gaps"][1]["cpu_op"] == "aten::item"  # the host was busy in .item() during that gap
    top = s["top_kernels"][0]
    assert (top["name"], top["count"], top["total_ms"]) == ("gemm", 3, 0.16) and top["share"] == pytest.approx(16 / 17)


def test_bench_capped_tiny_runs_a_quantized_row_on_cpu(tmp_path: Path) -> None:
    """Issue #22's capped-memory harness end to end on CPU (tiny configs, no cap): the writer, the loader, a call."""
    out = tmp_path / "capped.json"
    r = run_script(str(SCRIPTS / "bench_capped.py"), "--tiny", "--all", "--only", "flux-gguf-q8_0@24", "--json-out",
                   str(out), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())  # --only: that row alone, in its own process
    assert row["name"] == "flux-gguf-q8_0@24" and row["seconds"] > 0 and row["file_bytes"] > 0
    assert 0 < row["relative_error"] < 0.1  # Q8_0 of the tiny transformer against its float weights
    assert row["gguf"] == ["kept"]  # gguf: auto dequantizes on CUDA only
    assert "| 24 GB | flux-gguf-q8_0@24 | <= 1.5x uncapped bf16 |" in r.stdout  # the docs' table row
