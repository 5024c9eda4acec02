#!/usr/bin/env python
"""Issue #22's table: full-size random-weight models run with the process capped to a smaller card's memory
(torch.cuda.set_per_process_memory_fraction), through Easel's own loading path: the denoiser written by
`pipelines.quantize` (the `easel quantize` writer) and read back by `pipelines.quantized` (a model entry's
`denoiser:`), placed by `performance.offload: auto` (pipelines.placement) under the cap, then one timed generation at
the family's benchmark size and steps (scripts/bench_gpu.py's WORKLOADS). Per row: wall time, peak device memory,
the placement chosen, and the denoiser's relative error against bf16 on the same inputs (measured uncapped, before
the capped run). One row per process, so each cap starts from an empty device.

    python scripts/bench_capped.py --list                      # the rows
    python scripts/bench_capped.py --row flux-fp8@24           # one row (CUDA); JSON to --json-out or $OUT
    python scripts/bench_capped.py --all --budget-s 540        # every row, each in its own process, until the budget
    python scripts/bench_capped.py --all --only flux,sd        # the rows whose names contain flux or sd
    python scripts/bench_capped.py --tiny --row flux-gguf-q8_0@24   # the plumbing on CPU with tiny configs

GGUF Q4_K files are written by pipelines.gguf_kquants (the gguf package only reads K-quants). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GIB = 1 << 30


@dataclass(frozen=True)
class Row:
    family: str
    fmt: str  # bf16 (fp16 for SD) | fp8 | gguf-q8_0 | gguf-q4_k
    cap_gb: int | None  # None: uncapped (the reference row)
    goal: str
    gguf: str = "auto"  # performance.gguf for GGUF rows: auto (dequantized once when it fits resident) | keep

    @property
    def name(self) -> str:
        keep = "-keep" if self.gguf == "keep" else ""
        return f"{self.family}-{self.fmt}{keep}@{self.cap_gb or 'uncapped'}"


ROWS = [
    Row("flux", "bf16", None, "reference"),
    Row("qwen-image", "bf16", None, "reference"),
    Row("sdxl", "bf16", None, "reference"),
    Row("qwen-image", "fp8", 48, "<= 1.3x uncapped bf16"),
    Row("flux", "bf16", 48, "<= 1.3x uncapped bf16"),
    Row("flux", "fp8", 24, "<= 1.5x uncapped bf16"),
    Row("flux", "gguf-q8_0", 24, "<= 1.5x uncapped bf16"),
    # GGUF's per-call dequantisation against dequantizing once (performance.gguf), where bf16 fits: vs the reference.
    Row("flux", "gguf-q8_0", None, "per-call dequantisation cost", gguf="keep"),
    Row("flux", "gguf-q8_0", None, "dequantized once at load (gguf: auto)"),
    Row("qwen-image", "gguf-q4_k", 24, "completes (text encoder offloaded)"),
    Row("sdxl", "bf16", 24, "completes"),
    Row("flux", "gguf-q4_k", 12, "completes"),
    Row("sdxl", "bf16", 12, "completes"),
    Row("sdxl", "bf16", 8, "completes (VAE tiling)"),
    Row("sd15", "bf16", 8, "completes"),
]


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("easel_bench_gpu_script", REPO / "scripts" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def find_row(name: str) -> Row:
    for row in ROWS:
        if row.name == name or row.name == name.replace("@uncapped", "@None"):
            return row
    family_fmt, _, cap = name.rpartition("@")
    gguf = "keep" if family_fmt.endswith("-keep") else "auto"
    family_fmt = family_fmt.removesuffix("-keep")
    family, _, fmt = family_fmt.partition("-") if not family_fmt.startswith("qwen-image") else (
        "qwen-image", "", family_fmt.removeprefix("qwen-image-"))  # fmt: skip
    return Row(family, fmt, None if cap in ("", "uncapped") else int(cap), "ad hoc", gguf)


def run_row(row: Row, tiny: bool) -> dict[str, Any]:
    """Build, quantize through the real writer and loader, measure quality uncapped, then cap, place and time."""
    from pipelines import optimize, placement, quantize, quantized
    from pipelines.registry import ModelSpec

    bg = _bench_gpu()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float16 if row.family in ("sd15", "sdxl") and not tiny else torch.bfloat16
    if tiny:
        dtype = torch.float32
    cfg = bg.TINY[row.family] if tiny else bg.FULL[row.family]
    work = bg.WORKLOADS[row.family]
    size, steps = (64, 2) if tiny else (work.size, work.steps)
    # Random init on the GPU (minutes faster than on the host for 20 B values), the file written from there (the
    # K-quant writer runs on the GPU), then everything to the host: placement decides what moves back.
    comps = bg.build_components(row.family, cfg, device, dtype)
    name = bg.DENOISER[row.family]
    result: dict[str, Any] = {"row": asdict(row), "name": row.name, "size": size, "steps": steps}
    result["dtype"] = str(dtype).removeprefix("torch.")
    reference = comps[name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / f"denoiser{quantize.suffix_for(row.fmt)}"
        if row.fmt != "bf16":
            written = quantize.write_denoiser(reference, row.family, row.fmt, path)
            result.update(file_bytes=written.bytes, quantize_s=round(written.seconds, 1))
        for module in comps.values():
            if isinstance(module, torch.nn.Module):
                module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if row.fmt != "bf16":
            reference.save_config(folder / name)  # the config the loader reads, as in a diffusers folder
            # An FP8 file takes the FP8 compute tier where the server would give it one (FLUX/Qwen-Image on 8.9+
            # with torchao), as a `denoiser:` entry does; layerwise casting elsewhere.
            spec = ModelSpec(id=f"bench-{row.family}", family=row.family, source=f"demo:{row.family}")
            fp8_compute = optimize.fp8_compute_tier(spec, optimize.capability_of(device), optimize.installed_packages())
            result["fp8_compute"] = fp8_compute[0] if row.fmt == "fp8" else None
            comps[name] = quantized.load_denoiser(row.family, path, folder, dtype, fp8_compute=fp8_compute)
            result["relative_error"] = denoiser_error(bg, reference, comps[name], device, dtype)
    del reference
    pipe = bg.assemble(row.family, comps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if row.cap_gb is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, row.cap_gb * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        result["allocated_before"] = torch.cuda.memory_allocated(device)  # what the cap's row starts with
    if row.fmt.startswith("gguf"):  # what the server does with a GGUF denoiser under this cap (auto: CUDA only)
        result["gguf"] = optimize.dequantize_gguf_if_it_fits(pipe, row.gguf, row.name, device) or ["kept"]
    if device.type == "cuda":
        chosen = placement.plan(pipe, row.name, device, dtype)
        placement.apply(pipe, chosen, device)
        result["placement"] = {"mode": chosen.mode, "needed": chosen.needed, "free": chosen.free,
                               "vae_tiling_above_pixels": chosen.vae_tiling_above_pixels}  # fmt: skip
        if chosen.vae_tiling_above_pixels is not None and size * size > chosen.vae_tiling_above_pixels:
            pipe.vae.enable_tiling()
    call = bg.plain_call(pipe, row.family, work, size)
    try:
        call(1, 1)  # warm-up: one step
        started = time.perf_counter()
        call(1, steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["seconds"] = round(time.perf_counter() - started, 3)
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of memory: {e}"
    return result


def denoiser_error(bg, reference: torch.nn.Module, candidate: torch.nn.Module, device, dtype) -> float | None:
    """Relative error of the quantized denoiser's output against the bf16 one on the same random inputs, uncapped
    (both on the device one after the other; the reference goes back to the host)."""
    inputs = denoiser_inputs(reference, dtype)
    try:
        with torch.inference_mode():
            ref = bg.first_tensor(reference.to(device)(**bg.to_device(inputs, device))).float().cpu()
            reference.to("cpu")
            out = bg.first_tensor(candidate.to(device)(**bg.to_device(inputs, device))).float().cpu()
            candidate.to("cpu")
    except (torch.OutOfMemoryError, RuntimeError) as e:
        print(f"relative error not measured: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return bg.relative_error(ref, out)


def denoiser_inputs(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Random inputs of a 512x512 image's latents for the model's forward."""
    g = torch.Generator().manual_seed(0)
    c = model.config
    cls = type(model).__name__
    if cls == "UNet2DConditionModel":
        text_states = torch.randn(1, 77, c.cross_attention_dim, generator=g, dtype=dtype)
        sample = torch.randn(1, c.in_channels, 64, 64, generator=g, dtype=dtype)
        inputs = dict(sample=sample, timestep=torch.tensor([500]), encoder_hidden_states=text_states)
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            time_ids = torch.tensor([[512, 512, 0, 0, 512, 512]], dtype=dtype)
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g, dtype=dtype),
                                           "time_ids": time_ids}  # fmt: skip
        return inputs
    tokens, text = 1024, 64
    if cls == "FluxTransformer2DModel":
        return dict(hidden_states=torch.randn(1, tokens, c.in_channels, generator=g, dtype=dtype),
                    encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g, dtype=dtype),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g, dtype=dtype),
                    timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(tokens, 3),
                    txt_ids=torch.zeros(text, 3),
                    guidance=torch.tensor([3.5], dtype=dtype) if c.guidance_embeds else None)  # fmt: skip
    return dict(hidden_states=torch.randn(1, tokens, c.in_channels, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g, dtype=dtype),
                encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
                timestep=torch.tensor([0.5], dtype=dtype), img_shapes=[(1, 32, 32)])  # fmt: skip


def markdown_table(results: list[dict[str, Any]]) -> str:
    """docs/benchmarks.md section 5's table from the rows' JSON: s/img against the same family's uncapped bf16 row of
    this run."""
    reference = {
        r["row"]["family"]: r["seconds"]
        for r in results
        if "row" in r and r["row"]["cap_gb"] is None and r["row"]["fmt"] == "bf16" and "seconds" in r
    }
    lines = ["| cap | row | goal | s/img | vs uncapped bf16 | peak memory | placement | GGUF | rel. error vs bf16 |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    for r in results:
        row = r.get("row")
        if row is None or "seconds" not in r:
            lines.append(f"| | {r.get('name')} | | {r.get('error', 'no result')} | | | | | |")
            continue
        ref = reference.get(row["family"])
        ratio = f"{r['seconds'] / ref:.2f}x" if ref else "no reference"
        peak = f"{r['peak_bytes'] / GIB:.1f} GiB" if "peak_bytes" in r else ""
        error = f"{r['relative_error']:.4f}" if r.get("relative_error") is not None else "—"
        cap = f"{row['cap_gb']} GB" if row["cap_gb"] else "none"
        mode, gguf = r.get("placement", {}).get("mode", ""), ", ".join(r.get("gguf", []))
        lines.append(f"| {cap} | {r['name']} | {row['goal']} | {r['seconds']:.2f} | {ratio} | {peak} | {mode} | "
                     f"{gguf} | {error} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", default=[], help="row name (see --list); repeatable")
    p.add_argument("--all", action="store_true", help="every row, each in its own process")
    p.add_argument("--only", default="", help="with --all: the rows whose names contain one of these (comma-separated)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (no caps, no figures)")
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name:32} goal: {row.goal}")
        return 0
    out = args.json_out or (Path(os.environ["OUT"]) / "bench_capped.json" if os.environ.get("OUT") else None)
    if args.all:  # one process per row: each cap starts from an empty device
        deadline, results = time.monotonic() + args.budget_s, []
        wanted = [w for w in args.only.split(",") if w]
        for row in ROWS:
            if wanted and not any(w in row.name for w in wanted):
                continue
            left = deadline - time.monotonic()
            if left < 30:
                results.append({"name": row.name, "error": "not run: the time budget ran out"})
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, "--row", row.name, "--json-out", f.name] + (["--tiny"] * args.tiny)
                try:
                    subprocess.run(cmd, timeout=left, check=False)
                    results.extend(json.loads(Path(f.name).read_text() or "[]"))
                except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    results.append({"name": row.name, "error": f"{type(e).__name__}"})
    else:
        if not args.tiny and not torch.cuda.is_available():
            print("bench_capped: needs CUDA (or --tiny)", file=sys.stderr)
            return 2
        results = [run_row(find_row(name), args.tiny) for name in args.row]
    text = json.dumps(results, indent=1)
    if out is not None:
        out.write_text(text)
    print(text)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
