#!/usr/bin/env python
"""Serving benchmarks through the live HTTP server: overhead vs direct pipeline calls, and request batching.

overhead  N A1111 txt2img requests, one after another, to a real `easel serve` subprocess vs N direct `pipe(...)`
          calls in this process on the same pipeline built the same way (adapter, device, dtype, fast path, Euler
          scheduler, seed; the two images are compared). Ratio = HTTP / direct, in wall time and in CPU time.
batching  K concurrent compatible requests (different prompts and seeds) to a server started with
          EASEL_MAX_BATCH=<max-batch> vs one with EASEL_MAX_BATCH=1: throughput ratio, p50/p95 latency.

Only one side ever computes at a time. --order blocks (default) keeps both servers and the direct pipeline up and
alternates blocks of calls, so drifting background load on a shared machine hits both sides alike; --order
sequential runs one process holding the model at a time (server, server, then in-process). Every run reports how
much CPU other processes took meanwhile: on a shared machine, trust only runs where that share is near 0.
Defaults take a few minutes on 2 idle CPU cores with the demo model; on a GPU, serve a full-size model through
--models/--model (`scripts/bench_gpu.sh http` does). Prints a table; --json-out writes every number.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_server.py next to this script
from local_server import easel_command, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLER = "Euler"
TXT2IMG = "/sdapi/v1/txt2img"


# --- statistics ------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "n": len(latencies),
        "total_s": sum(latencies),
        "mean_s": statistics.fmean(latencies),
        "median_s": statistics.median(latencies),
        "min_s": min(latencies),
        "max_s": max(latencies),
        "latencies_s": latencies,
    }


def completion_clusters(ends: list[float], min_latency: float) -> int:
    """Estimate of the pipeline calls a burst took: requests answered by one batched call finish within a few ms of
    each other, calls are at least one call time apart. The server does not report its call count over HTTP."""
    xs = sorted(ends)
    gap = 0.25 * min_latency
    return 1 + sum(1 for a, b in zip(xs, xs[1:], strict=False) if b - a > gap)


# --- the server subprocess -------------------------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    pid: int


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads): far less sensitive than wall time to other work
    sharing the cores."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all processes, plus time a hypervisor stole from this VM)."""
    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


@contextlib.contextmanager
def foreign_load(report: dict[str, Any], phase: str, pids: list[int]) -> Iterator[None]:
    """How much CPU other processes took while a phase ran: the noise meter of a shared machine. A phase where they
    took a large share of the cores measured contention, not Easel."""
    ours = [os.getpid(), *pids]
    w0, b0, o0 = time.perf_counter(), busy_cpu_seconds(), sum(cpu_seconds(p) for p in ours)
    yield
    wall = time.perf_counter() - w0
    foreign = max(0.0, busy_cpu_seconds() - b0 - (sum(cpu_seconds(p) for p in ours) - o0))
    share = foreign / (wall * (os.cpu_count() or 1))
    report["foreign_cpu"][phase] = {"wall_s": wall, "foreign_cpu_s": foreign, "share_of_cores": share}


@contextlib.contextmanager
def live_server(args: argparse.Namespace, env_extra: dict[str, str], name: str) -> Iterator[Live]:
    """`easel serve` on a free loopback port, ready (/readyz 200) when the block starts, stopped after it."""
    port = free_port()
    log_dir = args.data_dir / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op pool size, as torch.set_num_threads here
    cmd = [*easel_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(args.data_dir)]
    if args.models:
        cmd += ["--models", str(args.models)]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as out:
        # Own session: the whole server process group is ours to stop, and Ctrl-C here does not hit it twice.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"easel serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"easel serve not ready after {args.startup_timeout} s (log: {log_path})")
            time.sleep(0.25)
        yield Live(url, proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def server_setting(client: httpx.Client, key: str) -> Any:
    """A setting as the server sees it (/cmd-flags lists Settings); None if this server has no such setting."""
    try:
        return client.get("/sdapi/v1/cmd-flags").json().get(key)
    except (httpx.HTTPError, ValueError):
        return None


# --- requests --------------------------------------------------------------------------------------------------------


def payload(args: argparse.Namespace, prompt: str, seed: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "negative_prompt": "",
        "seed": seed,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "cfg_scale": args.cfg,
        "sampler_name": SAMPLER,
        "batch_size": 1,
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": args.model},
    }


def post(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(TXT2IMG, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"txt2img answered {r.status_code}: {r.text[:500]}")
    data = r.json()
    data["server_timing"] = parse_server_timing(r.headers.get("server-timing", ""))
    if len(data.get("images", [])) != 1:
        raise RuntimeError(f"txt2img returned {len(data.get('images', []))} images, expected 1")
    return data


def parse_server_timing(header: str) -> dict[str, float]:
    """`queue;dur=0.4, run;dur=212.5, ...` (ms) -> {"queue": 0.0004, "run": 0.2125, ...} in seconds."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, params = part.partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                out[name.strip()] = float(value) / 1000
    return out


def stage_breakdown(served: list[dict[str, Any]], http_lat: list[float], direct_lat: list[float]) -> dict[str, float]:
    """Median seconds per server stage (the server's own Server-Timing), plus what lies outside them: the rest of
    the server's time ("server_other": HTTP parsing, validation, JSON) and the client's ("client_transport")."""
    stages: dict[str, list[float]] = {}
    for timing in served:
        for name, seconds in timing.items():
            stages.setdefault(name, []).append(seconds)
    out = {name: statistics.median(values) for name, values in stages.items()}
    if "total" in out:
        inside = sum(v for k, v in out.items() if k != "total")
        out["server_other"] = max(0.0, out["total"] - inside)
        out["client_transport"] = max(0.0, statistics.median(http_lat) - out["total"])
    out["direct_pipe"] = statistics.median(direct_lat)
    return out


def burst(client: httpx.Client, args: argparse.Namespace, round_no: int) -> tuple[list[float], list[float], float]:
    """K compatible requests released together; (latencies, end times, wall time of the burst)."""
    k = args.k
    barrier = threading.Barrier(k)
    starts, ends = [0.0] * k, [0.0] * k
    errors: list[BaseException] = []

    def one(i: int) -> None:
        body = payload(args, f"{args.prompt}, variation {round_no}-{i}", args.seed + 1000 * round_no + i)
        barrier.wait()
        starts[i] = time.perf_counter()
        try:
            post(client, body)
        except BaseException as e:  # reported after the burst; a silent thread would read as a fast request
            errors.append(e)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {k} concurrent requests failed: {errors[0]}")
    return [e - s for s, e in zip(starts, ends, strict=True)], ends, max(ends) - min(starts)


# --- phases ----------------------------------------------------------------------------------------------------------


def http_client(url: str, k: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=max(k, 1) + 4, max_keepalive_connections=max(k, 1) + 4)
    return httpx.Client(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits)


@dataclass
class Served:
    """One running server under test and what was measured on it."""

    name: str
    client: httpx.Client
    max_batch: int
    server_max_batch: Any = None  # as /cmd-flags reports it; None: the server has no such setting
    latencies: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def warm_up(self, args: argparse.Namespace, bursts: bool) -> None:
        self.server_max_batch = server_setting(self.client, "max_batch")
        for _ in range(args.warmup):
            post(self.client, payload(args, args.prompt, args.seed))
        if bursts:
            burst(self.client, args, round_no=0)  # first calls at the batched shapes

    def timed_burst(self, args: argparse.Namespace, round_no: int) -> None:
        lat, ends, wall = burst(self.client, args, round_no)
        self.latencies += lat
        self.walls.append(wall)
        self.calls.append(completion_clusters(ends, min(lat)))

    def result(self, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "server_max_batch": self.server_max_batch,
            "wall_s": sum(self.walls),
            "img_per_s": args.k * len(self.walls) / sum(self.walls),
            "p50_s": percentile(self.latencies, 50),
            "p95_s": percentile(self.latencies, 95),
            "calls_per_burst_est": self.calls,
            "latencies_s": self.latencies,
        }


class DirectPipeline:
    """The pipeline the server would build, called in this process: same adapter, device, dtype, fast path, Euler
    scheduler, per-image CPU generator and torch.inference_mode as the engine."""

    def __init__(self, args: argparse.Namespace, report: dict[str, Any]):
        import torch

        from pipelines import demo
        from pipelines.engine import resolve_device, resolve_dtype
        from pipelines.families import adapter_for
        from pipelines.registry import load_registry
        from pipelines.samplers import build_scheduler, resolve_sampler
        from server.settings import Settings

        self.torch = torch
        if args.threads:
            torch.set_num_threads(args.threads)
        registry = load_registry(args.models or Settings().models)
        spec = registry.resolve(args.model)
        if spec is None:
            raise SystemExit(f"unknown model '{args.model}'")
        device = resolve_device(Settings().device)  # EASEL_DEVICE, as the server reads it
        dtype = resolve_dtype(spec, device)
        root = args.data_dir / "demo-models"
        path = demo.ensure_demo_model(spec.demo_kind, root) if spec.is_demo else spec.source
        adapter = adapter_for(spec.family)
        loaded = adapter.load(spec, str(path), device, dtype)
        fast_path = apply_fast_path(loaded.base, spec, device)
        self.pipe = loaded.base
        self.pipe.scheduler = build_scheduler(
            resolve_sampler(SAMPLER), self.pipe.scheduler.config, adapter.flow_matching, sdxl=spec.family == "sdxl"
        )
        with contextlib.suppress(ImportError):
            from pipelines.optimize import prepare_call

            prepare_call(self.pipe, spec, device, args.size, args.size, 1)
        self.kwargs = direct_kwargs(spec.family, args)
        self.seed = args.seed
        self.cuda = device.type == "cuda"
        report["direct_setup"] = {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "fast_path": fast_path,
        }

    def call(self) -> tuple[float, Any]:
        torch = self.torch
        t0 = time.perf_counter()
        generator = [torch.Generator("cpu").manual_seed(self.seed)]  # the server's per-image CPU generator
        with torch.inference_mode():
            image = self.pipe(**self.kwargs, generator=generator).images[0]
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, image


def timed_post(client: httpx.Client, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    data = post(client, payload(args, args.prompt, args.seed))
    return time.perf_counter() - t0, data


def run_blocks(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Both servers and the direct pipeline up at once; only one side computes at a time, in alternating blocks.

    Alternating lets both sides see the same background load (a shared machine drifts by more than the overhead being
    measured). Whole blocks, each opened by one untimed call, keep each side in its steady state: alternating single
    calls would make every call pay the wake-up of an idle process (thread pools, caches), which hides overhead.
    """
    out: dict[str, Any] = {}
    want_overhead, want_batching = args.phase in ("all", "overhead"), args.phase in ("all", "batching")
    on_env = {"EASEL_MAX_BATCH": str(args.max_batch), "EASEL_MAX_WAIT_MS": str(args.max_wait_ms)}
    off_env = {"EASEL_MAX_BATCH": "1", "EASEL_MAX_WAIT_MS": "0"}
    with contextlib.ExitStack() as stack:
        on_server = stack.enter_context(live_server(args, on_env, "batching-on"))
        on = Served("on", stack.enter_context(http_client(on_server.url, args.k)), args.max_batch)
        off = None
        if want_batching:
            off_server = stack.enter_context(live_server(args, off_env, "batching-off"))
            off = Served("off", stack.enter_context(http_client(off_server.url, args.k)), 1)
        print("  servers ready", flush=True)
        if want_overhead:
            direct = DirectPipeline(args, report)
            for _ in range(args.warmup):
                direct.call()
            on.warm_up(args, bursts=False)
            http = Sampler(lambda: timed_post(on.client, args), [on_server.pid])
            local = Sampler(direct.call, [])
            with foreign_load(report, "overhead", [on_server.pid]):
                done, block_no = 0, 0
                while done < args.n:
                    size = min(args.block, args.n - done)
                    for sampler in (http, local) if block_no % 2 == 0 else (local, http):
                        sampler.block(size)
                    done, block_no = done + size, block_no + 1
            served_image = http.last["images"][0]
            out["overhead"] = overhead_result(http.wall, local.wall, served_image, local.last)
            out["overhead"].update(cpu_result(http.cpu, local.cpu))
            out["overhead"]["stages_s"] = stage_breakdown(http.timings, http.wall, local.wall)
            print(f"  overhead: ratio {out['overhead']['ratio_total']:.3f}", flush=True)
            del direct
        if want_batching and off is not None:
            on.warm_up(args, bursts=True)
            off.warm_up(args, bursts=True)
            with foreign_load(report, "batching", [on_server.pid, off_server.pid]):
                for r in range(1, args.rounds + 1):
                    for served in (on, off) if r % 2 else (off, on):
                        served.timed_burst(args, r)
            out["batching"] = batching_result(on.result(args), off.result(args))
            print(f"  batching: throughput ratio {out['batching']['throughput_ratio']:.3f}", flush=True)
    return out


class Sampler:
    """Timed calls of one side: wall time, and CPU time of this process plus `pids` (the server, for HTTP)."""

    def __init__(self, fn: Callable[[], tuple[float, Any]], pids: list[int]):
        self.fn, self.pids = fn, pids
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.timings: list[dict[str, float]] = []  # the server's Server-Timing stages of each timed HTTP call
        self.last: Any = None

    def _cpu(self) -> float:
        return cpu_seconds() + sum(cpu_seconds(p) for p in self.pids)

    def block(self, size: int) -> None:
        self.fn()  # untimed: back to steady state after the other side's block
        for _ in range(size):
            c0 = self._cpu()
            t, self.last = self.fn()
            self.cpu.append(self._cpu() - c0)
            self.wall.append(t)
            if isinstance(self.last, dict) and self.last.get("server_timing"):
                self.timings.append(self.last["server_timing"])


def run_sequential(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """The strict order: one process holds the model at a time (batching-on server: sequential requests and bursts;
    batching-off server: bursts; then direct calls in this process). Use on a quiet machine, or when two copies
    of the model do not fit."""
    out: dict[str, Any] = {}
    want_overhead, want_batching = args.phase in ("all", "overhead"), args.phase in ("all", "batching")
    on_env = {"EASEL_MAX_BATCH": str(args.max_batch), "EASEL_MAX_WAIT_MS": str(args.max_wait_ms)}
    http: Sampler | None = None
    with live_server(args, on_env, "batching-on") as live, http_client(live.url, args.k) as client:
        on = Served("on", client, args.max_batch)
        on.warm_up(args, bursts=want_batching)
        if want_overhead:
            http = Sampler(lambda: timed_post(client, args), [live.pid])
            with foreign_load(report, "http", [live.pid]):
                http.block(args.n)
        if want_batching:
            with foreign_load(report, "batching_on", [live.pid]):
                for r in range(1, args.rounds + 1):
                    on.timed_burst(args, r)
    if want_batching:
        off_env = {"EASEL_MAX_BATCH": "1", "EASEL_MAX_WAIT_MS": "0"}
        with live_server(args, off_env, "batching-off") as live, http_client(live.url, args.k) as client:
            off = Served("off", client, 1)
            off.warm_up(args, bursts=True)
            with foreign_load(report, "batching_off", [live.pid]):
                for r in range(1, args.rounds + 1):
                    off.timed_burst(args, r)
        out["batching"] = batching_result(on.result(args), off.result(args))
    if http is not None:
        direct = DirectPipeline(args, report)
        for _ in range(args.warmup):
            direct.call()
        local = Sampler(direct.call, [])
        with foreign_load(report, "direct", []):
            local.block(args.n)
        out["overhead"] = overhead_result(http.wall, local.wall, http.last["images"][0], local.last)
        out["overhead"].update(cpu_result(http.cpu, local.cpu))
        out["overhead"]["stages_s"] = stage_breakdown(http.timings, http.wall, local.wall)
    return out


def overhead_result(http_lat: list[float], direct_lat: list[float], served: str | None, image: Any) -> dict[str, Any]:
    http, direct = summary(http_lat), summary(direct_lat)
    return {
        "http": http,
        "direct": direct,
        "ratio_total": http["total_s"] / direct["total_s"],
        "ratio_median": http["median_s"] / direct["median_s"],
        "ratio_min": http["min_s"] / direct["min_s"],
        "max_pixel_diff": max_pixel_diff(served, image) if served is not None and image is not None else None,
    }


def cpu_result(http_cpu: list[float], direct_cpu: list[float]) -> dict[str, Any]:
    return {
        "http_cpu_s": http_cpu,
        "direct_cpu_s": direct_cpu,
        "cpu_ratio_total": sum(http_cpu) / sum(direct_cpu),
        "cpu_ratio_median": statistics.median(http_cpu) / statistics.median(direct_cpu),
    }


def batching_result(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    return {"on": on, "off": off, "throughput_ratio": on["img_per_s"] / off["img_per_s"]}


def apply_fast_path(pipe: Any, spec: Any, device: Any) -> list[str] | str:
    """What the engine does at load time (pipelines.optimize), so both sides run the same kernels."""
    try:
        from pipelines.optimize import apply_optimizations
    except ImportError:
        return "pipelines.optimize not available: stock pipeline"
    return apply_optimizations(pipe, spec, device)  # compile (if any) warms up in our own warm-up calls


def direct_kwargs(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline arguments the family adapter passes for this request (pipelines/families/*.py)."""
    common = dict(
        prompt=[args.prompt],
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        output_type="pil",
    )
    if family in ("sd15", "sdxl"):
        return {**common, "negative_prompt": None, "guidance_scale": args.cfg}
    if family == "flux":
        return {**common, "guidance_scale": args.cfg}
    if family == "qwen-image":
        negative = [" "] if args.cfg > 1 else None  # Qwen runs true CFG only with a negative prompt
        return {**common, "negative_prompt": negative, "true_cfg_scale": args.cfg}
    raise SystemExit(f"family '{family}' has no txt2img benchmark")


def max_pixel_diff(b64_png: str, image: Any) -> int | None:
    """Largest per-channel difference between the server's image and the direct one (0 = same computation)."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB"), dtype=np.int16)
    direct = np.asarray(image.convert("RGB"), dtype=np.int16)
    if served.shape != direct.shape:
        return None
    return int(np.abs(served - direct).max())


# --- report ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    values: list[str]


def table(header: list[str], rows: list[Row]) -> str:
    cells = [header] + [[r.label, *r.values] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    just = [str.ljust] + [str.rjust] * (len(header) - 1)  # labels left, numbers right
    lines = ["  ".join(just[i](c[i], widths[i]) for i in range(len(c))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def print_report(report: dict[str, Any]) -> None:
    p, d = report["params"], report.get("direct_setup")
    print(
        f"\nEasel serving benchmark: {p['model']}, {p['size']}x{p['size']}, {p['steps']} steps, {SAMPLER}, "
        f"cfg {p['cfg']}, {report['machine']['cpus']} CPUs"
        + (f", direct calls on {d['device']} ({d['dtype']}, {d['torch_threads']} torch threads)" if d else "")
    )
    if "overhead" in report:
        o = report["overhead"]
        rows = [
            Row(name, [f"{s['total_s']:.3f}", f"{s['mean_s']:.3f}", f"{s['median_s']:.3f}", f"{s['min_s']:.3f}"])
            for name, s in (("HTTP (easel serve)", o["http"]), ("direct pipe()", o["direct"]))
        ]
        print(f"\noverhead: N={p['n']} requests one after another, same seed ({p['order']}, {p['warmup']} warm-ups)")
        print(table(["path", "total s", "mean s", "median s", "min s"], rows))
        print(
            f"  ratio HTTP/direct: total {o['ratio_total']:.3f}, median {o['ratio_median']:.3f}, "
            f"min {o['ratio_min']:.3f}  (targets: <= 1.10 CPU demo model, <= 1.03 GPU full-size)"
        )
        print(
            f"  CPU seconds (server + client vs direct): {sum(o['http_cpu_s']):.2f} vs {sum(o['direct_cpu_s']):.2f}, "
            f"ratio total {o['cpu_ratio_total']:.3f}, median {o['cpu_ratio_median']:.3f}"
        )
        if o.get("stages_s"):
            st = o["stages_s"]
            parts = ", ".join(f"{k} {v * 1000:.1f}" for k, v in st.items() if k not in ("total", "direct_pipe"))
            print(f"  where an HTTP request's time goes (median ms): {parts}")
            if "run" in st:
                print(
                    f"  engine run vs direct pipe(): {st['run'] * 1000:.1f} vs {st['direct_pipe'] * 1000:.1f} ms; "
                    f"everything else the server adds: {(st.get('total', 0) - st['run']) * 1000:.1f} ms"
                )
        if o.get("max_pixel_diff") is not None:
            print(f"  largest pixel difference, served vs direct image: {o['max_pixel_diff']} (0 = same computation)")
    if "batching" in report:
        b = report["batching"]
        rows = []
        for key in ("on", "off"):
            r = b[key]
            seen = r["server_max_batch"]
            rows.append(
                Row(
                    f"max_batch={r['max_batch']}" + ("" if seen == r["max_batch"] else f" (server: {seen})"),
                    [
                        f"{r['wall_s']:.2f}",
                        f"{r['img_per_s']:.3f}",
                        f"{r['p50_s']:.2f}",
                        f"{r['p95_s']:.2f}",
                        "/".join(str(c) for c in r["calls_per_burst_est"]),
                    ],
                )
            )
        print(
            f"\nbatching: K={p['k']} concurrent compatible requests x {p['rounds']} timed burst(s) per server, "
            f"max_wait {p['max_wait_ms']} ms ({p['order']})"
        )
        print(table(["config", "wall s", "img/s", "p50 s", "p95 s", "~calls/burst"], rows))
        print(f"  throughput ratio on/off: {b['throughput_ratio']:.3f}  (target >= 2 on a GPU, SD1.5 512x512)")
        if b["on"]["server_max_batch"] != b["on"]["max_batch"] or b["off"]["server_max_batch"] != 1:
            print("  WARNING: the servers did not report the max_batch asked for (EASEL_MAX_BATCH not read?):")
            print("           both may have run the same batching setting; the ratio is then meaningless.")
    shares = ", ".join(f"{k} {v['share_of_cores']:.0%}" for k, v in report["foreign_cpu"].items())
    print(f"\n  other processes' CPU use while timing (share of all {report['machine']['cpus']} cores): {shares}")


# --- main ------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["all", "overhead", "batching"], default="all")
    p.add_argument("--n", type=int, default=20, help="sequential requests (and direct calls) for the overhead")
    p.add_argument("--k", type=int, default=8, help="concurrent requests per burst for batching")
    p.add_argument("--rounds", type=int, default=2, help="timed bursts per batching configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each timed series")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="width = height in pixels")
    p.add_argument("--cfg", type=float, default=7.0, help="A1111 cfg_scale (guidance)")
    p.add_argument("--model", default="demo-sd15", help="model id, alias or title in models.yaml")
    p.add_argument("--models", type=Path, help="models.yaml (default: the server's default, EASEL_MODELS)")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench", help="server data dir (demo models)")
    p.add_argument("--max-batch", type=int, default=8, help="EASEL_MAX_BATCH of the batching-on server")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="EASEL_MAX_WAIT_MS of the batching-on server")
    p.add_argument("--threads", type=int, help="torch threads for server and direct calls (default: torch's)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    p.add_argument(
        "--order",
        choices=["blocks", "sequential"],
        default="blocks",
        help="blocks (default): servers and direct pipeline up at once, alternating blocks of calls (one side "
        "computes at a time; robust to drifting background load). sequential: one process with the model at a time",
    )
    p.add_argument("--block", type=int, default=5, help="timed calls per block with --order blocks")
    p.add_argument("--json-out", type=Path, help="write all figures here as JSON")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    if args.models:
        args.models = args.models.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "foreign_cpu": {},  # per phase: CPU other processes took meanwhile (noise on a shared machine)
    }
    started = time.perf_counter()
    print(f"running ({args.order}) ...", flush=True)
    run = run_blocks if args.order == "blocks" else run_sequential
    report.update(run(args, report))
    report["elapsed_s"] = time.perf_counter() - started
    print_report(report)
    print(f"  whole run: {report['elapsed_s']:.0f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"  JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
