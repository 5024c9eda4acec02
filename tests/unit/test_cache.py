"""PipelineCache: one load under concurrency, LRU eviction, load errors reach every waiter."""

import threading
import time

import pytest
import torch

from pipelines.cache import PipelineCache
from pipelines.errors import ModelLoadError
from pipelines.families.base import LoadedModel
from pipelines.registry import ModelSpec


def spec(i: str) -> ModelSpec:
    return ModelSpec(id=i, family="sd15", source="demo:sd15")


class CountingLoader:
    def __init__(self, delay: float = 0.0, fail: set[str] | None = None):
        self.calls: list[str] = []
        self.delay = delay
        self.fail = fail or set()
        self.lock = threading.Lock()

    def __call__(self, s: ModelSpec) -> LoadedModel:
        with self.lock:
            self.calls.append(s.id)
        time.sleep(self.delay)
        if s.id in self.fail:
            raise OSError(f"no weights for {s.id}")
        return LoadedModel(spec=s, base=object(), device=torch.device("cpu"), dtype=torch.float32)


def test_concurrent_requests_load_a_model_once():
    loader = CountingLoader(delay=0.3)
    cache = PipelineCache(loader, max_models=2)
    results: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(spec("a")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["a"]
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_lru_eviction_by_count():
    loader = CountingLoader()
    cache = PipelineCache(loader, max_models=2)
    cache.get(spec("a"))
    cache.get(spec("b"))
    cache.get(spec("a"))  # a is now most recently used
    cache.get(spec("c"))  # evicts b
    assert cache.loaded_ids() == ["a", "c"]
    cache.get(spec("b"))
    assert loader.calls == ["a", "b", "c", "b"]


def test_load_error_reaches_every_waiter_and_is_not_cached():
    loader = CountingLoader(delay=0.2, fail={"bad"})
    cache = PipelineCache(loader, max_models=2)
    errors: list[BaseException] = []

    def get():
        try:
            cache.get(spec("bad"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(errors) == 4 and all(isinstance(e, ModelLoadError) for e in errors)
    assert "bad" in str(errors[0]) and "no weights" in str(errors[0])
    assert loader.calls == ["bad"]
    with pytest.raises(ModelLoadError):
        cache.get(spec("bad"))
    assert loader.calls == ["bad", "bad"]  # a failure is retried on the next request, not remembered


def test_unload():
    cache = PipelineCache(CountingLoader(), max_models=3)
    cache.get(spec("a"))
    cache.get(spec("b"))
    assert cache.unload("a") == ["a"]
    assert cache.unload() == ["b"]
    assert cache.loaded_ids() == []


def test_memory_budget_evicts_least_recently_used_cuda_models():
    """The budget counts CUDA-resident weights; a device object is enough to exercise it without a GPU."""

    def loader(s: ModelSpec) -> LoadedModel:
        base = type("P", (), {"components": {"unet": torch.nn.Linear(1000, 1000)}})()  # ~4 MB of fp32
        return LoadedModel(spec=s, base=base, device=torch.device("cuda"), dtype=torch.float32)

    cache = PipelineCache(loader, max_models=10, memory_budget_bytes=6 * 2**20)
    cache.get(spec("a"))
    assert cache.loaded_ids() == ["a"]
    cache.get(spec("b"))
    assert cache.loaded_ids() == ["b"]


def test_controlnet_weights_count_in_the_budget():
    """ControlNets loaded next to a model (pipelines.controlnet) grow it; enforce_budget evicts others for them."""

    def loader(s: ModelSpec) -> LoadedModel:
        base = type("P", (), {"components": {"unet": torch.nn.Linear(700, 1000)}})()  # ~2.7 MB of fp32
        return LoadedModel(spec=s, base=base, device=torch.device("cuda"), dtype=torch.float32)

    cache = PipelineCache(loader, max_models=10, memory_budget_bytes=6 * 2**20)
    cache.get(spec("a"))
    b = cache.get(spec("b"))
    assert cache.loaded_ids() == ["a", "b"]
    before = b.approx_bytes()
    b.controlnets["demo:sd15"] = torch.nn.Linear(700, 1000)
    assert b.approx_bytes() == 2 * before
    assert cache.enforce_budget("b") == ["a"] and cache.loaded_ids() == ["b"]


def test_metrics_counters_survive_evictions_and_unloads():
    cache = PipelineCache(CountingLoader(), max_models=1)
    a = cache.get(spec("a"))
    a.text_cache.get("prompt")  # miss
    a.text_cache.put("prompt", (torch.zeros(2),))
    a.text_cache.get("prompt")  # hit
    assert cache.get(spec("a")) is a
    cache.get(spec("b"))  # evicts a: its text-cache counts are kept
    cache.get(spec("a"))  # loads a again, with a fresh text cache
    cache.unload("b")
    cache.unload("a")
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.load_count == {"a": 2, "b": 1} and set(cache.load_seconds) == {"a", "b"}
    assert cache.evictions == {"a": 2, "b": 1}
    counts = cache.text_cache_counts()
    assert (counts["a"].hits, counts["a"].misses) == (1, 1) and (counts["b"].hits, counts["b"].misses) == (0, 0)
