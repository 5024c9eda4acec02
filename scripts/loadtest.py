#!/usr/bin/env python
"""Constant-arrival-rate load test of a local Easel server (reliability promise R8: no 5xx below capacity, only 429s
above it, and no accepted job lost).

Open loop, as k6's constant-arrival-rate executor: request i starts at t0 + i / --rate whether or not the earlier ones
have answered, so a server slower than the rate builds a queue instead of slowing the client down. Sending stops after
--duration seconds or --max-requests requests, whichever comes first; the script then waits for every answer (each
bounded by --timeout) and for every accepted async job to reach a terminal state, until --grace seconds after the
last request was sent. It never runs longer than duration + max(timeout, grace) + a few seconds.

Request mix (--mix, weights; every request is cheap: --size px, --steps steps, one image, fixed seeds):
  a1111    POST /sdapi/v1/txt2img (sync)
  openai   POST /v1/images/generations, b64_json (sync)
  gateway  POST /v2/automatic1111/sdapi/v1/txt2img with "async": true -> 202 + task address, then
           GET /v2/tasks/{address} every --poll-interval until completed / failed / cancelled

Target: by default a fresh `easel serve` on a free loopback port with the demo models (--queue-size sets its
admission queue, so overload shows up as 429s sooner); --url takes a running server instead. Only loopback targets
are accepted: this is a load generator, not something to point at other people's machines.

--memory mode (docs/reliability.md S7): instead of the mix, the worst-case small requests for memory, --copies of
each sent at once: A1111 img2img "crop and resize" to 512x512 of a 1x2000 and a 1x100000 PNG (~100-byte bodies that made
2 GiB intermediates), an OpenAI edit stitching a 1x16000 and a 4096x4096 image, and the largest accepted input (a
4096x4096 init image) resized to --size. Reports the server's resident memory before, its peak during (VmHWM from
/proc, else polled with psutil) and the answers; exits 1 on any 5xx or transport error, or if the peak grows more
than --max-rss-growth-mib over the baseline. Needs its own server, or --url with --server-pid.

Reports p50/p95/p99 latency (sync requests answered 2xx; async submissions; async jobs from submission to completion;
429s), throughput, the count of 2xx / 429 / other 4xx / 5xx / transport errors, and lost jobs: accepted (202) but not
terminal by the end of the grace period, or answering 404 while polled. Exits 1 on any 5xx, transport error (timeout,
dropped connection), lost or failed job, 2xx without an image, or 429 without Retry-After; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_server.py next to this script
from bench import percentile  # noqa: E402
from local_server import DEFAULT_DEMO_MODELS, is_loopback_url, local_server  # noqa: E402

KINDS = ("a1111", "openai", "gateway")
TERMINAL = ("completed", "failed", "cancelled")
COUNTED = ("2xx", "429", "4xx", "5xx", "transport_error")  # answer classes; 4xx here means a 4xx other than 429


# --- statistics ------------------------------------------------------------------------------------------------------


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:  # None, not NaN: the JSON report stays standard JSON
        return {"n": 0, "p50_s": None, "p95_s": None, "p99_s": None, "max_s": None}
    return {
        "n": len(values),
        "p50_s": percentile(values, 50),
        "p95_s": percentile(values, 95),
        "p99_s": percentile(values, 99),
        "max_s": max(values),
    }


# --- requests --------------------------------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    task_address: str
    state: str  # completed | failed | cancelled | lost (never terminal) | lost-404
    latency_s: float | None = None  # submission to the poll that saw it terminal
    error: str | None = None


@dataclass
class Outcome:
    kind: str
    sent_at_s: float  # since the start of the run
    latency_s: float
    status: int | None  # None: transport error (timeout, refused, dropped)
    error: str | None = None  # transport error, missing image, 429 without Retry-After
    job: JobOutcome | None = None


def request_for(kind: str, i: int, size: int, steps: int) -> tuple[str, dict[str, Any]]:
    prompt = f"load test {i}: a lighthouse on a cliff"
    a1111 = {
        "prompt": prompt,
        "steps": steps,
        "width": size,
        "height": size,
        "seed": i,
        "sampler_name": "Euler",
        "batch_size": 1,
        "n_iter": 1,
    }
    if kind == "a1111":
        return "/sdapi/v1/txt2img", a1111
    if kind == "gateway":
        return "/v2/automatic1111/sdapi/v1/txt2img", {**a1111, "async": True}
    if kind == "openai":
        body = {"prompt": prompt, "size": f"{size}x{size}", "n": 1, "steps": steps, "seed": i}
        return "/v1/images/generations", {**body, "response_format": "b64_json"}
    raise ValueError(f"unknown request kind {kind!r}")


def missing_image(kind: str, body: Any) -> bool:
    if kind == "a1111":
        return not (isinstance(body, dict) and body.get("images"))
    if kind == "openai":
        return not (isinstance(body, dict) and body.get("data") and body["data"][0].get("b64_json"))
    return False


class Run:
    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace):
        self.client = client
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.poll_deadline = self.t0 + args.duration + args.grace  # moved to last send + grace when sending ends
        self.outcomes: list[Outcome] = []
        # Scheduled but not sent: --max-in-flight requests (or accepted jobs being polled) were already open, as k6's
        # dropped_iterations. The client's cap, not the server's answer.
        self.dropped = 0

    def now(self) -> float:
        return self.loop.time() - self.t0

    async def one(self, kind: str, i: int) -> None:
        path, body = request_for(kind, i, self.args.size, self.args.steps)
        sent = self.now()
        try:
            r = await self.client.post(path, json=body)
        except httpx.HTTPError as e:
            self.outcomes.append(Outcome(kind, sent, self.now() - sent, None, f"{type(e).__name__}: {e}"[:300]))
            return
        outcome = Outcome(kind, sent, self.now() - sent, r.status_code)
        self.outcomes.append(outcome)
        if r.status_code == 429 and "retry-after" not in r.headers:
            outcome.error = "429 without Retry-After"
        elif 200 <= r.status_code < 300:
            try:
                data = r.json()
            except ValueError:
                outcome.error = f"{r.status_code} with a body that is not JSON"
                return
            if kind == "gateway":
                if r.status_code != 202 or not data.get("task_address"):
                    outcome.error = f"expected 202 with a task address, got {r.status_code}"
                    return
                outcome.job = await self.follow(data["task_address"], sent)
            elif missing_image(kind, data):
                outcome.error = f"{r.status_code} without an image"

    async def follow(self, task_address: str, submitted: float) -> JobOutcome:
        """Poll an accepted job until it is terminal, answers 404, or the grace period ends."""
        while True:
            await asyncio.sleep(self.args.poll_interval)
            try:
                r = await self.client.get(f"/v2/tasks/{task_address}")
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"[:300]
            else:
                if r.status_code == 404:
                    return JobOutcome(task_address, "lost-404", error=r.text[:300])
                try:
                    task = r.json() if r.status_code == 200 else {}
                except ValueError:
                    task = {}
                if (status := task.get("status")) in TERMINAL:
                    error = json.dumps(task.get("error")) if status != "completed" else None
                    return JobOutcome(task_address, status, self.now() - submitted, error)
                error = None if r.status_code == 200 else f"poll answered {r.status_code}"
            if self.loop.time() > self.poll_deadline:
                return JobOutcome(task_address, "lost", error=error or "not terminal by the end of the grace period")

    async def drive(self) -> float:
        """Send at the arrival rate until duration or max requests; return the seconds spent sending."""
        args = self.args
        kinds, weights = zip(*args.mix.items(), strict=True)
        pick = random.Random(args.seed)
        in_flight: set[asyncio.Task[None]] = set()
        everything: list[asyncio.Task[None]] = []
        for i in range(args.max_requests):
            at = i / args.rate
            if at >= args.duration:
                break
            await asyncio.sleep(max(0.0, at - self.now()))
            kind = pick.choices(kinds, weights)[0]
            if len(in_flight) >= args.max_in_flight:
                self.dropped += 1
                continue
            task = asyncio.create_task(self.one(kind, i))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            everything.append(task)
        sending = self.now()
        self.poll_deadline = self.loop.time() + args.grace
        await asyncio.gather(*everything)
        return sending


async def warm_up(client: httpx.AsyncClient, args: argparse.Namespace) -> None:
    """One request of each kind in the mix, not counted: model loads happen here, not in the measured run."""
    for kind in args.mix:
        path, body = request_for(kind, 0, args.size, args.steps)
        r = await client.post(path, json=body)
        if kind == "gateway" and r.status_code == 202:
            address = r.json()["task_address"]
            deadline = time.monotonic() + args.timeout
            while (await client.get(f"/v2/tasks/{address}")).json().get("status") not in TERMINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up job {address} not finished after {args.timeout} s")
                await asyncio.sleep(0.2)
        elif r.status_code >= 300:
            raise RuntimeError(f"warm-up {kind} answered {r.status_code}: {r.text[:300]}")


async def load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.max_in_flight + 16, max_keepalive_connections=args.max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        if not args.no_warmup:
            await warm_up(client, args)
        run = Run(client, args)
        sending_s = await run.drive()
        wall_s = run.now()
    return summarize(run, sending_s, wall_s, args)


# --- memory mode -----------------------------------------------------------------------------------------------------

MEMORY_KINDS = ("a1111_sliver_2000", "a1111_sliver_100000", "openai_stitch", "a1111_largest_input")


def png_b64(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def memory_requests(size: int) -> dict[str, dict[str, Any]]:
    """kind -> httpx request arguments (path plus json or multipart). Bodies are built once and reused."""
    import base64

    img2img = {"prompt": "memory probe", "steps": 1, "width": size, "height": size, "seed": 1}
    sliver = {**img2img, "width": 512, "height": 512, "resize_mode": 1}  # the reported case: refused, never run
    big = png_b64(4096, 4096)
    return {
        "a1111_sliver_2000": {
            "url": "/sdapi/v1/img2img",
            "json": {**sliver, "init_images": [png_b64(1, 2000)]},
        },
        "a1111_sliver_100000": {
            "url": "/sdapi/v1/img2img",
            "json": {**sliver, "init_images": [png_b64(1, 100_000)]},
        },
        "openai_stitch": {
            "url": "/v1/images/edits",
            "data": {"prompt": "memory probe", "model": "demo-qwen-image-edit", "size": "512x512"},
            "files": [
                ("image[]", ("a.png", base64.b64decode(png_b64(1, 16_000)), "image/png")),
                ("image[]", ("b.png", base64.b64decode(big), "image/png")),
            ],
        },
        "a1111_largest_input": {"url": "/sdapi/v1/img2img", "json": {**img2img, "init_images": [big]}},
    }


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) on Linux; None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def memory_probe(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    proc = psutil.Process(pid)
    requests = memory_requests(args.size)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
        # Warm-up, not counted: the model load and the first request's allocations are not what is measured.
        warm = await client.post("/sdapi/v1/img2img", json={**requests["a1111_largest_input"]["json"]})
        baseline = proc.memory_info().rss
        hwm_before = peak_rss_bytes(pid)
        polled = baseline
        done = asyncio.Event()

        async def poll() -> None:
            nonlocal polled
            while not done.is_set():
                polled = max(polled, proc.memory_info().rss)
                await asyncio.sleep(0.01)

        async def one(kind: str) -> tuple[str, int | None]:
            try:
                r = await client.post(**requests[kind])
                return kind, r.status_code
            except httpx.HTTPError:
                return kind, None

        poller = asyncio.create_task(poll())
        started = time.monotonic()
        answers = await asyncio.gather(*(one(kind) for kind in MEMORY_KINDS for _ in range(args.copies)))
        wall_s = time.monotonic() - started
        done.set()
        await poller
    hwm = peak_rss_bytes(pid)
    # VmHWM counts since the process started: it is this burst's peak only if it grew during the burst.
    peak = max(polled, hwm if hwm is not None and hwm != hwm_before else 0)
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in MEMORY_KINDS}
    for kind, status in answers:
        by_kind[kind][str(status) if status is not None else "transport_error"] += 1
    mib = 1024 * 1024
    report = {
        "mode": "memory",
        "copies": args.copies,
        "requests": len(answers),
        "warmup_status": warm.status_code,
        "wall_s": round(wall_s, 3),
        "baseline_rss_mib": round(baseline / mib, 1),
        "peak_rss_mib": round(peak / mib, 1),
        "growth_mib": round((peak - baseline) / mib, 1),
        "answers": {kind: dict(sorted(c.items())) for kind, c in by_kind.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    bad = [f"{kind}: {status}" for kind, status in answers if status is None or status >= 500]
    report["problems"] = [f"{len(bad)} 5xx/transport error(s): {sorted(set(bad))}"] if bad else []
    if report["growth_mib"] > args.max_rss_growth_mib:
        report["problems"].append(f"peak RSS grew {report['growth_mib']} MiB > {args.max_rss_growth_mib} MiB")
    return report


def format_memory_report(report: dict[str, Any]) -> str:
    lines = [
        f"memory probe: {report['requests']} worst-case requests at once ({report['copies']} of each kind), "
        f"{report['wall_s']} s",
        f"  server RSS: baseline {report['baseline_rss_mib']} MiB, peak {report['peak_rss_mib']} MiB "
        f"(+{report['growth_mib']} MiB)",
    ]
    lines += [f"  {kind}: {answers}" for kind, answers in report["answers"].items()]
    lines.append("FAIL: " + "; ".join(report["problems"]) if report["problems"] else "PASS")
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------------------------------


def status_class(status: int | None) -> str:
    if status is None:
        return "transport_error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def summarize(run: Run, sending_s: float, wall_s: float, args: argparse.Namespace) -> dict[str, Any]:
    outcomes = run.outcomes
    classes = Counter(status_class(o.status) for o in outcomes)
    jobs = [o.job for o in outcomes if o.job is not None]
    job_states = Counter(j.state for j in jobs)
    lost = [j for j in jobs if j.state.startswith("lost")]
    failed_jobs = [j for j in jobs if j.state in ("failed", "cancelled")]
    sync_ok = [o for o in outcomes if o.kind != "gateway" and o.status is not None and 200 <= o.status < 300]
    done = len(sync_ok) + job_states["completed"]  # requests that produced their image
    per_kind: dict[str, Any] = {}
    for kind in args.mix:
        mine = [o for o in outcomes if o.kind == kind]
        ok = [o.latency_s for o in mine if o.status is not None and 200 <= o.status < 300]
        per_kind[kind] = {
            "sent": len(mine),
            "statuses": dict(Counter(str(o.status) for o in mine)),
            ("submit_latency" if kind == "gateway" else "latency"): latency_summary(ok),
        }
    report = {
        "command": " ".join(["scripts/loadtest.py", *sys.argv[1:]]),
        "target": args.url or "own easel serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("demo_models",)
        },
        "sent": len(outcomes),
        "dropped": run.dropped,
        "sending_s": sending_s + 1 / args.rate,  # request i leaves at i / rate: n requests fill n / rate seconds
        "wall_s": wall_s,
        "offered_rate_per_s": (len(outcomes) + run.dropped) / (sending_s + 1 / args.rate),
        "throughput_per_s": done / wall_s,
        "counts": {k: classes[k] for k in COUNTED},
        "other_statuses": {k: v for k, v in classes.items() if k not in COUNTED},
        "latency_sync_2xx": latency_summary([o.latency_s for o in sync_ok]),
        "latency_async_submit": latency_summary(
            [o.latency_s for o in outcomes if o.kind == "gateway" and o.status == 202]
        ),
        "latency_async_job": latency_summary(
            [j.latency_s for j in jobs if j.latency_s is not None and j.state == "completed"]
        ),
        "latency_429": latency_summary([o.latency_s for o in outcomes if o.status == 429]),
        "per_kind": per_kind,
        "jobs": {"accepted": len(jobs), **dict(job_states)},
        "lost_jobs": [asdict(j) for j in lost],
        "failed_jobs": [asdict(j) for j in failed_jobs],
        "malformed": sum(1 for o in outcomes if o.error and o.status is not None and o.status < 500),
        "errors": [asdict(o) for o in outcomes if o.error or (o.status or 0) >= 500][:20],
    }
    report["problems"] = problems(report)
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """Why the run fails R8 (an empty list: it passes)."""
    found = []
    counts = report["counts"]
    if counts["5xx"]:
        found.append(f"{counts['5xx']} answers were 5xx")
    if counts["transport_error"]:
        found.append(f"{counts['transport_error']} requests got no answer (timeout or dropped connection)")
    if report["other_statuses"]:
        found.append(f"unexpected statuses: {report['other_statuses']}")
    if report["lost_jobs"]:
        found.append(f"{len(report['lost_jobs'])} accepted jobs were lost")
    if report["failed_jobs"]:
        found.append(f"{len(report['failed_jobs'])} accepted jobs failed or were cancelled")
    if report["malformed"]:
        found.append(f"{report['malformed']} answers were malformed (2xx without an image, 429 without Retry-After)")
    return found


def format_report(report: dict[str, Any]) -> str:
    def lat(s: dict[str, Any]) -> str:
        if not s["n"]:
            return "n=0"
        quantiles = "  ".join(f"{q} {s[f'{q}_s']:.3f} s" for q in ("p50", "p95", "p99", "max"))
        return f"n={s['n']} {quantiles}"

    c = report["counts"]
    p = report["params"]
    lines = [
        f"target {report['target']}  rate {p['rate']}/s for {p['duration']} s (max {p['max_requests']} requests), "
        f"mix {p['mix']}, {p['size']}x{p['size']} {p['steps']} step(s)",
        f"sent {report['sent']} over {report['sending_s']:.1f} s ({report['offered_rate_per_s']:.2f}/s), "
        f"dropped {report['dropped']}, wall {report['wall_s']:.1f} s, throughput {report['throughput_per_s']:.2f} "
        "images/s",
        f"2xx {c['2xx']}  429 {c['429']}  other 4xx {c['4xx']}  5xx {c['5xx']}  transport errors {c['transport_error']}"
        + (f"  other {report['other_statuses']}" if report["other_statuses"] else ""),
        f"async jobs: {report['jobs']}  lost {len(report['lost_jobs'])}",
        f"latency sync 2xx:    {lat(report['latency_sync_2xx'])}",
        f"latency async submit: {lat(report['latency_async_submit'])}",
        f"latency async job:   {lat(report['latency_async_job'])}",
        f"latency 429:         {lat(report['latency_429'])}",
    ]
    for kind, k in report["per_kind"].items():
        lines.append(f"  {kind:<8} sent {k['sent']:<5} statuses {k['statuses']}")
    lines.append("PASS" if not report["problems"] else "FAIL: " + "; ".join(report["problems"]))
    for e in report["errors"][:5]:
        lines.append(f"  {e}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.strip().partition("=")
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown request kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            mix[kind] = float(weight or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} is not a number: {weight!r}") from None
        if mix[kind] <= 0:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} must be > 0")
    return mix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running loopback server (default: start one with the demo models)")
    p.add_argument("--rate", type=float, default=2.0, help="requests started per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    p.add_argument("--max-requests", type=int, default=10_000, help="stop sending after this many")
    p.add_argument("--mix", type=parse_mix, default="a1111=2,openai=1,gateway=1", help="kind=weight,...")
    p.add_argument("--size", type=int, default=64, help="width = height in pixels")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    p.add_argument("--grace", type=float, default=60.0, help="after the last send, how long jobs may take to finish")
    p.add_argument("--poll-interval", type=float, default=0.25, help="seconds between polls of an async job")
    p.add_argument(
        "--max-in-flight", type=int, default=256, help="open requests (and polled jobs) at most; more are dropped"
    )
    p.add_argument("--seed", type=int, default=0, help="of the request-kind sequence")
    p.add_argument("--no-warmup", action="store_true", help="skip the uncounted request of each kind first")
    p.add_argument("--queue-size", type=int, help="own server: EASEL_QUEUE_SIZE (admission queue; default 64)")
    p.add_argument("--server-env", action="append", default=[], metavar="EASEL_X=V", help="own server: a setting")
    p.add_argument("--demo-models", type=Path, default=DEFAULT_DEMO_MODELS, help="own server: demo-models folder")
    p.add_argument("--json-out", type=Path, help="write the report here as JSON")
    p.add_argument("--memory", action="store_true", help="send the worst-case requests for memory; report peak RSS")
    p.add_argument("--copies", type=int, default=4, help="--memory: requests of each worst-case kind sent at once")
    p.add_argument("--max-rss-growth-mib", type=float, default=2048.0, help="--memory: fail above this growth")
    p.add_argument("--server-pid", type=int, help="--memory with --url: the server's process id")
    args = p.parse_args(argv)
    if args.memory and args.url and not args.server_pid:
        p.error("--memory with --url needs --server-pid (the resident memory of that process is measured)")
    if args.url and not is_loopback_url(args.url):
        p.error(f"--url must be a loopback server (127.0.0.1, ::1, localhost), not {args.url}")
    if args.url and (args.queue_size or args.server_env):
        p.error("--queue-size and --server-env configure the server this script starts; not with --url")
    for name, value in (("--rate", args.rate), ("--duration", args.duration), ("--timeout", args.timeout)):
        if not value > 0:
            p.error(f"{name} must be > 0")
    if args.max_requests < 1 or args.max_in_flight < 1 or args.grace < 0 or args.poll_interval <= 0:
        p.error("--max-requests and --max-in-flight must be >= 1, --grace >= 0, --poll-interval > 0")
    for item in args.server_env:
        if "=" not in item or not item.startswith("EASEL_"):
            p.error(f"--server-env takes EASEL_NAME=VALUE, not {item!r}")
    return args


def main_memory(args: argparse.Namespace) -> int:
    if args.url:
        report = asyncio.run(memory_probe(args.url.rstrip("/"), args.server_pid, args))
    else:
        env = dict(item.split("=", 1) for item in args.server_env)
        with local_server(env, demo_models=args.demo_models) as server:
            print(f"easel serve on {server.url} (pid {server.pid}) {json.dumps(env)}", flush=True)
            report = asyncio.run(memory_probe(server.url, server.pid, args))
            report["server_env"] = env
    print(format_memory_report(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory:
        return main_memory(args)
    if args.url:
        report = asyncio.run(load(args.url.rstrip("/"), args))
    else:
        env = dict(item.split("=", 1) for item in args.server_env)
        if args.queue_size:
            env["EASEL_QUEUE_SIZE"] = str(args.queue_size)
        with local_server(env, demo_models=args.demo_models) as server:
            print(f"easel serve on {server.url} {json.dumps(env)}", flush=True)
            report = asyncio.run(load(server.url, args))
            report["server_env"] = env
    print(format_report(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
