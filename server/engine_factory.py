"""The GPU-side engine the settings describe: the composition root's one place for it (`easel serve` and the Ray
worker replicas). Torch is imported only when an engine is built, never by the HTTP package."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.engine_api import EngineClient
from pipelines.registry import Registry
from server.settings import Settings


def engine_config(settings: Settings, **overrides: Any) -> Any:
    """The `EngineConfig` the settings describe, with `overrides`."""
    from pipelines.engine import EngineConfig

    values: dict[str, Any] = dict(
        data_dir=settings.data_dir,
        device=settings.device,
        queue_size=settings.queue_size,
        cache_max_models=settings.cache_max_models,
        cache_memory_budget_gb=settings.cache_memory_budget_gb,
        max_batch=settings.max_batch,
        max_batch_by_family=settings.max_batch_by_family,
        max_wait_ms=settings.max_wait_ms,
        configs_dir=settings.configs_dir,
        allow_pickle=settings.allow_pickle,
        lora_dir=settings.lora_dir,
        embeddings_dir=settings.embeddings_dir,
        request_timeout_s=settings.request_timeout_s,
        max_consecutive_ooms=settings.max_consecutive_ooms,
        cuda_memory_fraction=settings.cuda_memory_fraction,
        max_work_pixels=settings.max_work_pixels,
    )
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in values.items() if k in known})


def build_engine(registry: Registry, settings: Settings, **overrides: Any) -> EngineClient:
    """One engine on `device`, or a pool with one engine per device of `devices`. Not started."""
    from pipelines.device_pool import build_engine as build

    config = engine_config(settings, **overrides)
    return build(registry, config, settings.devices, affinity_slack=settings.device_affinity_slack)
