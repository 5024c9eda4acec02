"""PipelineCache: each model is loaded once, however many requests ask for it at the same moment; least recently
used models are evicted above a count limit and (on CUDA) a memory budget."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch

from pipelines import placement
from pipelines.errors import ModelLoadError
from pipelines.families.base import LoadedModel
from pipelines.registry import ModelSpec
from pipelines.telemetry import CacheCounts

log = logging.getLogger("easel.cache")

Loader = Callable[[ModelSpec], LoadedModel]

# Loading is not thread-safe: diffusers/transformers build modules under accelerate's `init_empty_weights`, which
# patches torch.nn.Module for the whole process, so two loads at once (two devices' caches, or a request and an A1111
# /options preload) can leave "meta" tensors behind. Loads in one process run one at a time, whichever cache asks.
_LOAD_LOCK = threading.Lock()


def load_lock() -> threading.Lock:
    """The process-wide loading lock, for loads outside `PipelineCache.get` (a ControlNet next to its model)."""
    return _LOAD_LOCK


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PipelineCache:
    def __init__(self, loader: Loader, max_models: int = 3, memory_budget_bytes: int | None = None):
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self._loader = loader
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, Future[LoadedModel]] = {}
        self.load_count: dict[str, int] = {}  # how many times each model was really loaded (tests, metrics)
        # Metrics (pipelines.telemetry), monotonic for the process: read at scrape time.
        self.load_seconds: dict[str, float] = {}
        self.evictions: dict[str, int] = {}  # LRU evictions and unloads per model
        self.hits = 0
        self.misses = 0  # the model was not loaded: this request loaded it or waited for another's load
        self._retired_text: dict[str, CacheCounts] = {}  # text-cache counts of models no longer loaded

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model; loads it (once, even under concurrency) if absent. Raises ModelLoadError."""
        with self._lock:
            entry = self._entries.get(spec.id)
            if entry is not None:
                self._entries.move_to_end(spec.id)
                self.hits += 1
                return entry
            self.misses += 1
            pending = self._loading.get(spec.id)
            owner = pending is None
            if owner:
                pending = Future()
                self._loading[spec.id] = pending
        if not owner:
            return pending.result()  # another thread is loading it: share its result or its error
        started = time.perf_counter()
        try:
            loaded = self._load(spec)
        except BaseException as e:
            with self._lock:
                self._loading.pop(spec.id, None)
            pending.set_exception(e)
            raise
        with self._lock:
            self._loading.pop(spec.id, None)
            self._entries[spec.id] = loaded
            self.load_count[spec.id] = self.load_count.get(spec.id, 0) + 1
            self.load_seconds[spec.id] = self.load_seconds.get(spec.id, 0.0) + time.perf_counter() - started
            evicted = self._evict_locked(keep=spec.id)
        if evicted:
            log.info("evicted %s", ", ".join(evicted))
            free_device_memory()
        pending.set_result(loaded)
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        try:
            # offload auto (pipelines.placement) may evict least-recently-used pipelines to make room.
            with _LOAD_LOCK, placement.room_maker(lambda: self._evict_for_room(spec.id)):
                return self._loader(spec)
        except ModelLoadError:
            raise
        except Exception as e:
            log.exception("loading model %s failed", spec.id)
            raise ModelLoadError(f"model '{spec.id}' failed to load: {type(e).__name__}: {e}") from e

    def _evict_for_room(self, loading: str) -> bool:
        """Evict the least recently used pipeline (not the one loading); False when there is none."""
        with self._lock:
            victim = next((k for k in self._entries if k != loading), None)
            if victim is None:
                return False
            self._retire_locked(victim)
        log.info("evicted %s to make room for %s", victim, loading)
        free_device_memory()
        return True

    def _evict_locked(self, keep: str) -> list[str]:
        evicted: list[str] = []

        def over_budget() -> bool:
            if len(self._entries) > self.max_models:
                return True
            if self.memory_budget_bytes is None:
                return False
            used = sum(e.device_resident_bytes() for e in self._entries.values() if e.device.type == "cuda")
            return used > self.memory_budget_bytes

        while len(self._entries) > 1 and over_budget():
            victim = next(k for k in self._entries if k != keep)
            self._retire_locked(victim)
            evicted.append(victim)
        return evicted

    def enforce_budget(self, keep: str) -> list[str]:
        """Evict least recently used models if `keep` grew past the budget after it was loaded (ControlNets)."""
        with self._lock:
            evicted = self._evict_locked(keep=keep) if keep in self._entries else []
        if evicted:
            log.info("evicted %s", ", ".join(evicted))
            free_device_memory()
        return evicted

    def unload(self, model_id: str | None = None) -> list[str]:
        """Drop one model (or all); memory is returned once running jobs release their references."""
        with self._lock:
            ids = [model_id] if model_id else list(self._entries)
            dropped = [i for i in ids if i in self._entries]
            for i in dropped:
                self._retire_locked(i)
        if dropped:
            free_device_memory()
        return dropped

    def model_memory(self) -> dict[str, dict[str, int]]:
        """Bytes of weights each loaded model holds, per device where they are now ("cuda:0", "cpu")."""
        with self._lock:
            entries = list(self._entries.items())
        return {model_id: entry.device_bytes() for model_id, entry in entries}

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _retire_locked(self, model_id: str) -> None:
        """Drop an entry, keeping its text-cache counts so the totals never go down."""
        entry = self._entries.pop(model_id)
        old, text = self._retired_text.get(model_id, CacheCounts()), entry.text_cache
        self._retired_text[model_id] = CacheCounts(old.hits + text.hits, old.misses + text.misses)
        self.evictions[model_id] = self.evictions.get(model_id, 0) + 1

    def text_cache_counts(self) -> dict[str, CacheCounts]:
        """Text-embedding cache hits and misses per model, over every load of it since the process started."""
        with self._lock:
            counts = dict(self._retired_text)
            for model_id, entry in self._entries.items():
                old = counts.get(model_id, CacheCounts())
                counts[model_id] = CacheCounts(old.hits + entry.text_cache.hits, old.misses + entry.text_cache.misses)
        return counts
