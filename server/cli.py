"""`easel serve | make-demo-models | prefetch-configs`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.registry import Registry, RegistryError, load_registry
from server.settings import Settings


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
    import uvicorn

    from server.app import create_app

    settings = _settings_from_args(args)
    registry = _registry_or_none(settings)
    if registry is None:
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, registry=registry)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="easel", description="Self-hosted image-generation server")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the HTTP server")
    p_serve.add_argument("--host", help="bind address (EASEL_HOST; default 127.0.0.1)")
    p_serve.add_argument("--port", type=int, help="port (EASEL_PORT; default 7860)")
    _add_common(p_serve)
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p_serve.set_defaults(func=serve)

    p_demo = sub.add_parser("make-demo-models", help="build the tiny offline demo models into the data directory")
    _add_common(p_demo)
    p_demo.set_defaults(func=make_demo_models, host=None, port=None)

    p_pre = sub.add_parser(
        "prefetch-configs",
        help="download the configs, tokenizers and scheduler files single-file checkpoints need into DIR",
    )
    p_pre.add_argument("dir", type=Path, metavar="DIR", help="destination; one folder per variant (configs_dir)")
    p_pre.add_argument(
        "--variant", action="append", help="only this variant (repeatable): sd15, sd2, sdxl, sdxl-refiner, flux-*"
    )
    p_pre.add_argument(
        "--flux-encoders", action="store_true", help="also the FLUX.1 VAE and text encoder weights (~10 GB, once)"
    )
    p_pre.add_argument("--dry-run", action="store_true", help="print what would be downloaded, download nothing")
    p_pre.set_defaults(func=prefetch_configs)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
