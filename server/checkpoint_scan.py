"""Serve the A1111 checkpoints folder next to models.yaml: scan at start-up and on refresh-checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipelines.checkpoints import HashCache, ScanResult, hash_single_files, refresh_registry
from pipelines.registry import Registry
from server.settings import Settings

log = logging.getLogger("easel.checkpoints")


def checkpoint_rescanner(settings: Settings, registry: Registry) -> Callable[[], ScanResult]:
    """A function that rescans `<checkpoints_dir>/Stable-diffusion` into the registry (hashes cached on disk)."""
    cache = HashCache.in_data_dir(settings.data_dir)

    def rescan() -> ScanResult:
        result = refresh_registry(
            registry, settings.stable_diffusion_dir, cache=cache, configs_dir=settings.configs_dir
        )
        hash_single_files(registry, cache)
        for skipped in result.skipped:
            log.warning("checkpoint not served: %s", skipped)
        if result.specs:
            log.info("checkpoints: %s", ", ".join(s.title for s in result.specs))
        return result

    return rescan
