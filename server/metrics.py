"""`GET /metrics`: Prometheus' text format (prometheus-client), one registry per app.

Three sources, none of them torch (the engine speaks `pipelines.telemetry`):
- the HTTP middleware (`HttpMetrics`, the outermost layer but one): every answer by route template, dialect and
  status, refusals of the access and admission layers (401, 429, 503) included;
- engine events pushed as they happen (`JobEnded`, `PipelineCall`) into histograms and counters;
- a collector that reads the engine's `metrics_snapshot()` at scrape time: queue, jobs by state, model loads,
  evictions, pipeline- and text-embedding-cache hits, device memory. An engine without it (a Ray ingress's remote
  engine, test fakes) shows the queue depth only.

Who may read it: anyone on an open server (no keys, loopback: like every other route); with API keys, admin keys
only (`easel keys create --admin`), others get 403. A scrape counts against the key's rate limit like any call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.telemetry import Event, JobEnded, PipelineCall
from server.access.principal import current
from server.errors import ApiError

log = logging.getLogger("easel.metrics")

METRICS_PATH = "/metrics"
UNMATCHED = "<unmatched>"  # paths no route serves: one label value, whatever was asked (bounded cardinality)

# Seconds: a queue wait can be ~0; tiny CPU demo jobs take ~0.1 s, FLUX/Qwen-Image on a GPU 5-20 s, big batches more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
STEPS_PER_S_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 200)


@lru_cache(maxsize=1)
def _dialect_prefixes() -> tuple[tuple[str, str], ...]:
    """(path prefix, dialect), longest prefix first. Imported late: the dialect packages import the app's modules."""
    from server.api.genpicz import GENPICZ_PREFIXES
    from server.api.openai_images.errors import PREFIXES as OPENAI_PREFIXES
    from server.errors import A1111_PREFIXES, GATEWAY_PREFIXES

    table = [
        *((p, "a1111") for p in A1111_PREFIXES),
        *((p, "gateway") for p in GATEWAY_PREFIXES),
        *((p, "openai") for p in OPENAI_PREFIXES),
        *((p, "genpicz") for p in GENPICZ_PREFIXES),
        ("/api/v1/", "indoxhub"),
        ("/image/", "genrex"),
        ("/v1/image/", "genrex"),
        *((p, "health") for p in ("/livez", "/readyz", METRICS_PATH)),
        *((p, "docs") for p in ("/docs", "/redoc", "/openapi.json")),
    ]
    return tuple(sorted(table, key=lambda pair: len(pair[0]), reverse=True))


def dialect_of(path: str) -> str:
    """Which API a path belongs to (a1111, gateway, openai, genpicz, indoxhub, genrex, health, docs, other)."""
    for prefix, dialect in _dialect_prefixes():
        if path.startswith(prefix):
            return dialect
    return "other"


def route_template(scope: Scope) -> str:
    """The path template that serves the request (`/v2/tasks/{task_address}`), never the raw path: the router's
    match, or, for answers given before routing (401, 413, 429 from the middleware), the route that would have."""
    context = scope.get("fastapi", {}).get("effective_route_context")  # FastAPI >= 0.16x: routers included lazily
    template = getattr(context, "path_format", None)
    if template:
        return template
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    return _RouteTable.of(app).match(scope) if app is not None else UNMATCHED


def _full_paths(app: Any) -> list[str]:
    """Every route's full path template, included routers' too."""
    try:  # FastAPI >= 0.16x keeps included routers whole: their routes' full paths come from their contexts
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes onto the app under their full paths
        return [r.path for r in app.router.routes if isinstance(getattr(r, "path", None), str)]
    return [c.path for c in iter_route_contexts(app.router.routes) if isinstance(c.path, str)]


class _RouteTable:
    """Every route's full template, compiled, for requests answered before the router ran. Built once per app."""

    def __init__(self, app: Any):
        self.plain = [r for r in app.router.routes if isinstance(getattr(r, "path", None), str)]
        known = {r.path for r in self.plain}
        templates = sorted({t for t in _full_paths(app) if t not in known})
        templates.sort(key=lambda t: (t.count("{"), -len(t)))  # literal segments win over parameters
        self.templates = [(compile_path(t)[0], t) for t in templates]

    @classmethod
    def of(cls, app: Any) -> _RouteTable:
        table = getattr(app.state, "route_table", None)
        if table is None:
            table = app.state.route_table = cls(app)
        return table

    def match(self, scope: Scope) -> str:
        for route in self.plain:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        path = scope["path"]
        for regex, template in self.templates:
            if regex.match(path):
                return template
        return UNMATCHED


class EngineCollector(Collector):
    """Reads the engine's state at scrape time (`metrics_snapshot()`, `queued_count()`)."""

    def __init__(self, app: FastAPI):
        self.app = app

    def collect(self) -> Iterator[Any]:
        engine = self.app.state.engine
        if engine is None:
            return
        snapshot = getattr(engine, "metrics_snapshot", None)
        if snapshot is None:  # remote or fake engine: what every EngineClient can say
            depth = GaugeMetricFamily("easel_queue_depth", "Jobs admitted and waiting to start", labels=["device"])
            depth.add_metric([""], engine.queued_count())
            yield depth
            return
        try:
            snaps = snapshot()
        except Exception:  # a scrape must not fail because a device is in trouble; the HTTP series still go out
            log.exception("reading the engine's metrics failed")
            return
        yield from _engine_families(snaps)


def _engine_families(snaps: Iterable[Any]) -> Iterator[Any]:
    snaps = list(snaps)
    depth = GaugeMetricFamily("easel_queue_depth", "Jobs admitted and waiting to start", labels=["device"])
    free = GaugeMetricFamily("easel_queue_free_slots", "Admission slots left before 429 queue_full", labels=["device"])
    jobs = GaugeMetricFamily("easel_jobs", "Unfinished jobs by state", labels=["device", "state"])
    loaded = GaugeMetricFamily("easel_models_loaded", "Pipelines in the cache", labels=["device", "model"])
    per_model = ["device", "model"]
    loads = CounterMetricFamily("easel_model_loads", "Pipeline loads (cache misses that loaded)", labels=per_model)
    load_s = CounterMetricFamily("easel_model_load_seconds", "Time spent loading pipelines", labels=per_model)
    evictions = CounterMetricFamily(
        "easel_model_evictions", "Pipelines dropped from the cache (LRU, memory budget, unload)", labels=per_model
    )
    cache = CounterMetricFamily(
        "easel_cache_requests", "Cache lookups by cache and result", labels=["device", "cache", "model", "result"]
    )
    per_kind = ["device", "kind"]
    mem = GaugeMetricFamily("easel_device_memory_bytes", "CUDA memory in use now", labels=per_kind)
    peak = GaugeMetricFamily("easel_device_memory_peak_bytes", "CUDA memory peak since start", labels=per_kind)
    total = GaugeMetricFamily("easel_device_memory_total_bytes", "CUDA memory of the device", labels=["device"])
    model_mem = GaugeMetricFamily(
        "easel_model_memory_bytes",
        "Bytes of weights a loaded model holds, by where they are now (its device, or cpu when offloaded)",
        labels=["device", "model", "location"],
    )
    for s in snaps:
        d = s.device
        depth.add_metric([d], s.queued)
        free.add_metric([d], s.free_slots)
        jobs.add_metric([d, "queued"], s.queued)
        jobs.add_metric([d, "running"], s.running)
        for model in s.loaded_models:
            loaded.add_metric([d, model], 1)
        for model, where in s.model_memory.items():
            for location, n in where.items():
                model_mem.add_metric([d, model, location], n)
        for model, n in s.model_loads.items():
            loads.add_metric([d, model], n)
        for model, seconds in s.model_load_seconds.items():
            load_s.add_metric([d, model], seconds)
        for model, n in s.model_evictions.items():
            evictions.add_metric([d, model], n)
        cache.add_metric([d, "pipeline", "", "hit"], s.pipeline_cache.hits)
        cache.add_metric([d, "pipeline", "", "miss"], s.pipeline_cache.misses)
        for model, counts in s.text_cache.items():
            cache.add_metric([d, "text_embedding", model, "hit"], counts.hits)
            cache.add_metric([d, "text_embedding", model, "miss"], counts.misses)
        if s.memory is not None:
            mem.add_metric([d, "allocated"], s.memory.allocated)
            mem.add_metric([d, "reserved"], s.memory.reserved)
            peak.add_metric([d, "allocated"], s.memory.peak_allocated)
            peak.add_metric([d, "reserved"], s.memory.peak_reserved)
            if s.memory.total is not None:
                total.add_metric([d], s.memory.total)
    yield from (depth, free, jobs, loaded, loads, load_s, evictions, cache, model_mem)
    if any(s.memory is not None for s in snaps):
        yield from (mem, peak, total)


class Metrics:
    """The app's registry and the series that are pushed to (HTTP answers, engine events)."""

    def __init__(self, app: FastAPI):
        self.registry = CollectorRegistry(auto_describe=True)
        # Process RSS, CPU, open files (Linux): on a CPU-only server the memory figure that matters.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.http_requests = Counter(
            "easel_http_requests", "HTTP answers", ["method", "route", "dialect", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "easel_http_request_duration_seconds",
            "Time to the end of each HTTP answer",
            ["method", "route", "dialect"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        labels = ["model", "kind"]
        self.jobs_finished = Counter("easel_jobs_finished", "Jobs ended, by status", [*labels, "status"], registry=r)
        self.queued_seconds = Histogram(
            "easel_job_queued_seconds",
            "Wait before a job started (or ended unstarted)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running_seconds = Histogram(
            "easel_job_running_seconds", "Start to end of completed jobs", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.total_seconds = Histogram(
            "easel_job_total_seconds", "Submit to end of completed jobs", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "easel_batch_images", "Images per pipeline call", ["model", "device"], buckets=BATCH_BUCKETS, registry=r
        )
        self.steps = Counter("easel_denoising_steps", "Denoising steps run", ["model", "device"], registry=r)
        self.steps_per_s = Histogram(
            "easel_denoising_steps_per_second",
            "Denoising steps per second of each pipeline call",
            ["model", "device"],
            buckets=STEPS_PER_S_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(app))
        self._attached: set[int] = set()

    def attach(self, engine: Any) -> None:
        """Listen to an engine's events (an engine without `add_observer` has none to give)."""
        add = getattr(engine, "add_observer", None)
        if add is not None and id(engine) not in self._attached:
            self._attached.add(id(engine))
            add(self.observe)

    def observe(self, event: Event) -> None:
        if isinstance(event, JobEnded):
            self.jobs_finished.labels(event.model, event.kind, event.status).inc()
            self.queued_seconds.labels(event.model, event.kind).observe(event.queued_s)
            if event.status == "completed" and event.running_s is not None:
                self.running_seconds.labels(event.model, event.kind).observe(event.running_s)
                self.total_seconds.labels(event.model, event.kind).observe(event.total_s)
        elif isinstance(event, PipelineCall):
            self.batch_images.labels(event.model, event.device).observe(event.images)
            self.steps.labels(event.model, event.device).inc(event.steps)
            if event.steps_per_s is not None:
                self.steps_per_s.labels(event.model, event.device).observe(event.steps_per_s)

    def count_http(self, scope: Scope, status: int, seconds: float) -> None:
        route, dialect = route_template(scope), dialect_of(scope["path"])
        method = scope["method"]
        self.http_requests.labels(method, route, dialect, str(status)).inc()
        self.http_seconds.labels(method, route, dialect).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetrics:
    """Pure ASGI middleware: count every answer (status 500 for an exception that escapes before one starts)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_http(scope, status, time.perf_counter() - started)


def install_metrics(app: FastAPI) -> Metrics:
    """The registry (`app.state.metrics`), its middleware and `GET /metrics`. Call after the other middleware, so
    that the count sees their answers too; attach the engine with `app.state.metrics.attach(engine)`."""
    metrics = Metrics(app)
    app.state.metrics = metrics
    app.add_middleware(HttpMetrics, metrics=metrics)

    @app.get(METRICS_PATH, tags=["health"], response_class=Response)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format. With API keys configured, admin keys only."""
        principal = current(request)
        if principal is not None and not principal.admin:
            raise ApiError(403, "/metrics is for admin keys (easel keys create --admin)", code="forbidden")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
