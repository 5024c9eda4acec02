"""`easel serve | make-demo-models | prefetch-configs | quantize`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from pipelines.registry import Registry, RegistryError, load_registry
from server.http_protocol import with_header_timeout
from server.logs import LEVELS, LOG_FORMATS, LogFormat, configure_logging, debugging
from server.preflight import StartupProblem, check_startup
from server.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("easel")

DRAIN_GRACE_S = 15  # beyond drain_timeout_s: a running step (or VAE decode) stopping, answers going out

# pipelines.quantize.FORMATS, written out: the CLI does not import torch to parse its arguments.
QUANTIZE_FORMATS = ("fp8", "fp8-scaled", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q5_0", "gguf-q4_k", "gguf-q4_0")


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "models": args.models}.items() if v}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, help="models.yaml to serve (EASEL_MODELS; default: the repo's)")
    p.add_argument("--data-dir", type=Path, help="data directory (EASEL_DATA_DIR; default ./data)")


def _registry_or_none(settings: Settings) -> Registry | None:
    """models.yaml, or None after printing what is wrong with it (file, model id, field)."""
    try:
        return load_registry(settings.models)
    except RegistryError as e:
        print(f"easel: {e}", file=sys.stderr)
        return None


def serve(args: argparse.Namespace) -> int:
    from server.app import create_app

    settings = _settings_from_args(args)
    registry = _registry_or_none(settings)
    if registry is None:
        return 2
    if args.insecure_no_auth:
        settings.insecure_no_auth = True
    try:
        check_startup(settings)  # data directory, job database, port: one line each, before anything starts
    except StartupProblem as e:
        if debugging():
            log.debug("start-up check failed", exc_info=e)
        print(f"easel: {e}", file=sys.stderr)
        return 2
    refusal = open_server_refusal(settings)
    if refusal:
        print(f"easel: {refusal}", file=sys.stderr)
        return 2
    if getattr(args, "ray", False):
        return serve_ray(args, settings)
    app = create_app(settings, registry=registry)
    # On SIGTERM uvicorn stops accepting, waits for open requests (their jobs drain meanwhile), then runs the app's
    # shutdown (the rest of the drain): the wait covers the drain and the grace for a running step to stop.
    server = DrainingServer(uvicorn_config(app, settings, args.log_level), app)
    # uvicorn re-raises the signal it shut down on once it is done; a drained shutdown is a clean exit (0) instead.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return server.exit_code if server.started else 3  # 3: start-up failed (uvicorn's STARTUP_FAILURE)


def uvicorn_config(app: FastAPI, settings: Settings, log_level: str | None = None) -> uvicorn.Config:
    """How `easel serve` runs uvicorn. No `Server: uvicorn` banner: what runs here is nobody else's business."""
    graceful_s = math.ceil(settings.drain_timeout_s) + DRAIN_GRACE_S
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,  # uvicorn's lines go through the root logger's format (server.logs)
        timeout_graceful_shutdown=graceful_s,
        server_header=False,
        # h11 with a deadline for the request headers (slowloris); uvicorn itself has none.
        http=with_header_timeout(settings.header_timeout_s),
    )


def _add_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: ingress replicas over GPU worker replicas (pip install -e '.[ray]'; README "
        "'Scaling out')",
    )
    p.add_argument(
        "--ray-address",
        help="with --ray: join this Ray cluster ('auto', or ray://head:10001; EASEL_RAY_ADDRESS) instead of starting "
        "a local Ray instance",
    )


def serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    """`easel serve --ray`: deploy the Ray Serve application and serve until SIGINT/SIGTERM."""
    try:
        from server.ray_serve import app as ray_app
    except ImportError as e:
        print(f"easel: --ray needs Ray Serve: pip install -e '.[ray]' ({e})", file=sys.stderr)
        return 2
    if args.ray_address:
        settings.ray_address = args.ray_address
    return ray_app.run(settings)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining from the moment the signal arrives: /readyz turns 503 and the engine starts to
    finish (or, at the deadline, cancel) its jobs while uvicorn still waits for open requests."""

    exit_code = 0  # 1 once the engine has died

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app
        self.announced = False  # the "ready" line has been logged

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from server.app import begin_draining

        begin_draining(self.app)
        super().handle_exit(sig, frame)

    def engine_dead(self) -> bool:
        """The engine died (device fault, repeated OOM, worker crash) and no shutdown is under way."""
        state = self.app.state
        return not state.draining and state.engine is not None and not getattr(state.engine, "alive", True)

    def announce_when_ready(self) -> None:
        """One line once the socket is bound and the engine runs with its default model loaded."""
        from server.app import not_ready_reason

        if self.announced or not self.started or not_ready_reason(self.app) is not None:
            return
        self.announced = True
        settings: Settings = self.app.state.settings
        engine = self.app.state.engine
        loaded = engine.loaded_models() if hasattr(engine, "loaded_models") else []
        log.info(
            "ready at %s (API docs at /docs; engine on %s; loaded: %s)",
            public_url(settings.host, settings.port),
            getattr(engine, "device", "?"),
            ", ".join(loaded) or "none yet",
        )

    async def on_tick(self, counter: int) -> bool:
        self.announce_when_ready()
        should_exit = await super().on_tick(counter)
        if not should_exit and counter % 10 == 0 and self.engine_dead():
            # vLLM's model: a dead engine cannot recover in-process; exit non-zero so the supervisor restarts us.
            log.critical(
                "the engine is dead (%s): exiting to be restarted", getattr(self.app.state.engine, "failure", None)
            )
            self.exit_code = 1
            return True
        return should_exit


def open_server_refusal(settings: Settings) -> str | None:
    """Why the server must not start: bound beyond loopback with no way to authenticate anyone."""
    from server.access.keys import KeyStore
    from server.jobs.db import create_tables, make_engine

    if settings.insecure_no_auth or is_loopback(settings.host) or settings.api_auth is not None:
        return None
    engine = make_engine(settings.resolved_database_url)
    try:
        create_tables(engine)
        if KeyStore(engine).any_keys():
            return None
    finally:
        engine.dispose()
    return (
        f"refusing to serve {settings.host} without authentication: create an API key first "
        "(`easel keys create --name NAME`), set EASEL_API_AUTH, or pass --insecure-no-auth to serve it open"
    )


def public_url(host: str, port: int) -> str:
    """The URL to print for a bind address (all interfaces: the loopback URL, saying so)."""
    if host in ("0.0.0.0", "::", ""):
        return f"http://127.0.0.1:{port} (listening on all interfaces)"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys(args: argparse.Namespace) -> int:
    from server.access import cli as keys_cli

    return keys_cli.run(args, _settings_from_args(args))


def make_demo_models(args: argparse.Namespace) -> int:
    from pipelines import demo  # torch-side; only this command needs it

    settings = _settings_from_args(args)
    registry = _registry_or_none(settings)
    if registry is None:
        return 2
    root = settings.data_dir / "demo-models"
    kinds = sorted({m.demo_kind for m in registry if m.is_demo}) or list(demo.DEMO_KINDS)
    for kind in kinds:
        path = demo.ensure_demo_model(kind, root)
        print(f"{kind}: {path}")
    return 0


def prefetch_configs(args: argparse.Namespace) -> int:
    """Download the configs/tokenizers/scheduler files single-file checkpoints need (run where there is internet)."""
    from pipelines.prefetch import prefetch_plan, run_prefetch

    try:
        plan = prefetch_plan(args.dir, args.variant, flux_encoders=args.flux_encoders)
    except ValueError as e:
        print(f"easel: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for item in plan:
            print(f"{item.variant}: {item.repo} [{', '.join(item.patterns)}] -> {item.local_dir}")
        return 0
    failed = run_prefetch(plan)
    for item, why in failed:
        print(f"easel: {item.variant} ({item.repo}) failed: {why}", file=sys.stderr)
    if failed:
        print("easel: gated repos (FLUX.1-dev/Fill/Kontext) need their licence accepted and HF_TOKEN", file=sys.stderr)
    print(f"done: set EASEL_CONFIGS_DIR={Path(args.dir).resolve()} on the server")
    return 1 if failed else 0


def quantize_model(args: argparse.Namespace) -> int:
    """Write a registered model's denoiser as one FP8 or GGUF file (pipelines.quantize)."""
    from pipelines import quantize  # torch-side; only this command needs it
    from pipelines.checkpoints import CheckpointError

    settings = _settings_from_args(args)
    registry = _registry_or_none(settings)
    if registry is None:
        return 2
    spec = registry.resolve(args.model)
    if spec is None:
        print(f"easel: unknown model '{args.model}' (not in {settings.models})", file=sys.stderr)
        return 2
    if args.out.exists() and not args.force:  # before minutes of loading
        print(f"easel: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        device = quantize.writer_device(args.device)
        model = quantize.source_denoiser(spec, settings.data_dir / "demo-models", settings.configs_dir)
        result = quantize.write_denoiser(model, spec.family, args.format, args.out, force=args.force, device=device)
    except (quantize.QuantizeError, CheckpointError) as e:
        print(f"easel: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.path}: {result.bytes / 2**20:.1f} MiB ({result.bytes} bytes), {result.quantized} tensors "
        f"in {args.format}, {result.kept} kept in float, in {result.seconds:.1f} s"
    )
    return 0


def _log_format(args: argparse.Namespace) -> LogFormat:
    chosen = getattr(args, "log_format", None)
    if chosen:
        return chosen
    try:
        return Settings().log_format
    except ValueError:  # an invalid setting: the command itself reports it
        return "text"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="easel", description="Self-hosted image-generation server")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the HTTP server")
    p_serve.add_argument("--host", help="bind address (EASEL_HOST; default 127.0.0.1)")
    p_serve.add_argument("--port", type=int, help="port (EASEL_PORT; default 7860)")
    _add_common(p_serve)
    p_serve.add_argument(
        "--log-level", default="info", choices=LEVELS, help="debug also shows tracebacks of start-up failures"
    )
    p_serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address without API keys (anyone who can reach it can use it)",
    )
    p_serve.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text, or json: one JSON object per line (EASEL_LOG_FORMAT)"
    )
    _add_ray_arguments(p_serve)
    p_serve.set_defaults(func=serve)

    from server.access import cli as keys_cli

    keys_cli.add_parser(sub, _add_common)
    sub.choices["keys"].set_defaults(func=keys, host=None, port=None)

    p_demo = sub.add_parser("make-demo-models", help="build the tiny offline demo models into the data directory")
    _add_common(p_demo)
    p_demo.set_defaults(func=make_demo_models, host=None, port=None)

    p_pre = sub.add_parser(
        "prefetch-configs",
        help="download the configs, tokenizers and scheduler files single-file checkpoints need into DIR",
    )
    p_pre.add_argument("dir", type=Path, metavar="DIR", help="destination; one folder per variant (configs_dir)")
    p_pre.add_argument(
        "--variant",
        action="append",
        help="only this variant (repeatable): sd15, sd2, sdxl, sdxl-refiner, flux-*, controlnet-sd15, controlnet-sdxl",
    )
    p_pre.add_argument(
        "--flux-encoders", action="store_true", help="also the FLUX.1 VAE and text encoder weights (~10 GB, once)"
    )
    p_pre.add_argument("--dry-run", action="store_true", help="print what would be downloaded, download nothing")
    p_pre.set_defaults(func=prefetch_configs)

    p_quant = sub.add_parser("quantize", help="write a model's denoiser as one FP8 or GGUF file (for `denoiser:`)")
    p_quant.add_argument("model", metavar="MODEL_ID", help="a model of models.yaml (id, alias or title)")
    p_quant.add_argument("--format", required=True, choices=QUANTIZE_FORMATS)
    p_quant.add_argument("--out", required=True, type=Path, metavar="FILE", help=".safetensors for fp8, else .gguf")
    p_quant.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p_quant.add_argument(
        "--device",
        default="cpu",
        help="where the GGUF K-quants are computed, one tensor at a time: cpu (default) or cuda (much faster)",
    )
    _add_common(p_quant)
    p_quant.set_defaults(func=quantize_model, host=None, port=None)

    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), _log_format(args))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # anything unforeseen at start-up: one line, the traceback only when debugging
        if debugging():
            log.exception("easel %s failed", args.command)
        else:
            detail = " ".join(str(e).split()) or "no details"
            print(f"easel: {args.command} failed: {type(e).__name__}: {detail} (--log-level debug shows the traceback)",
                  file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
