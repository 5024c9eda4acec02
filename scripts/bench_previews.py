#!/usr/bin/env python
"""What live previews cost (pipelines/previews.py): the same pipeline call with a preview every N steps and with none,
interleaved (A, B, A, B ...) in one process, per family. The goal: under 2 % of a job's time.

    python scripts/bench_previews.py                 # the demo models on this machine's device (CPU: tiny models)
    python scripts/bench_previews.py --full          # full-size random-weight models on CUDA (bench_gpu.py's)
    python scripts/bench_previews.py --models flux --every 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import demo  # noqa: E402
from pipelines.engine import resolve_dtype  # noqa: E402
from pipelines.families import adapter_for  # noqa: E402
from pipelines.families.base import LoadedModel, StepReporter  # noqa: E402
from pipelines.previews import PreviewMaker  # noqa: E402
from pipelines.registry import ModelSpec  # noqa: E402
from pipelines.request import GenerationRequest, wants_preview  # noqa: E402

FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")
FULL_SIZE = {"sd15": (512, 20), "sdxl": (1024, 30), "flux": (1024, 28), "qwen-image": (1024, 50)}


def load(family: str, full: bool, device: torch.device, work: Path) -> LoadedModel:
    spec = ModelSpec(id=f"bench-{family}", family=family, source=f"demo:{family}")
    dtype = resolve_dtype(spec, device)
    if full:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_gpu import FULL, build_pipeline

        pipe = build_pipeline(family, FULL[family], device, dtype)
        return LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)
    path = demo.ensure_demo_model(family, work)
    return adapter_for(family).load(spec, str(path), device, dtype)


def timed_call(loaded: LoadedModel, req: GenerationRequest, every: int) -> tuple[float, int]:
    """Seconds for one call, and how many previews it published."""
    made: list[int] = []
    maker = PreviewMaker(loaded.base, loaded.spec.family, req.width, req.height, lambda step, images: made.append(step))
    reporter = StepReporter(lambda step, total: False, maker if every else None,
                            lambda step, total: wants_preview(step, total, every))  # fmt: skip
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        adapter_for(loaded.spec.family).run(loaded, req, [1], None, reporter)
    maker.flush()
    sync()
    return time.perf_counter() - started, len(made)


def bench(family: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    loaded = load(family, args.full, device, work)
    size, steps = FULL_SIZE[family] if args.full else (args.size, args.steps)
    req = GenerationRequest(model=loaded.spec.id, prompt="a lighthouse at dusk", width=size, height=size, steps=steps)
    timed_call(loaded, req, args.every)  # warm-up, both ways
    timed_call(loaded, req, 0)
    with_previews, without, previews = [], [], 0
    for _ in range(args.rounds):
        t, previews = timed_call(loaded, req, args.every)
        with_previews.append(t)
        without.append(timed_call(loaded, req, 0)[0])
    a, b = statistics.median(with_previews), statistics.median(without)
    result = {"family": family, "size": size, "steps": steps, "every": args.every, "previews_per_call": previews,
              "with_previews_s": a, "without_s": b, "overhead_pct": 100 * (a - b) / b}  # fmt: skip
    print(f"{family:11s} {size}px {steps:3d} steps, preview every {args.every}: {previews} previews, "
          f"{a:.3f} s vs {b:.3f} s without: {result['overhead_pct']:+.2f} %", flush=True)  # fmt: skip
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--full", action="store_true", help="full-size random-weight models (CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--every", type=int, default=5, help="a preview every N steps (the server's default is 5)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved calls of each kind (medians)")
    p.add_argument("--size", type=int, default=256, help="demo models: image size")
    p.add_argument("--steps", type=int, default=20, help="demo models: steps")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(family, args, device, Path(tmp)) for family in args.models]
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": str(device), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
