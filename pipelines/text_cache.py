"""An LRU cache of text-encoder outputs, per loaded model: a prompt seen before (a chat bot's regenerate, a batch of
seeds, the negative prompt nearly every request repeats) skips its text encoder.

Entries are keyed by everything the output depends on: the encoder, the layer read, the LoRAs active on the text
encoders (their weights change the output) and the exact tokens and emphasis weights. The cache lives in
`LoadedModel`, so it goes when the model is unloaded, and is bounded in bytes (device memory it holds).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

DEFAULT_MAX_BYTES = 64 * 2**20  # ~550 SD1.5 or ~200 SDXL 77-token chunks


def _nbytes(value: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in value if t is not None)


class TextEmbeddingCache:
    """Bounded LRU of encoder outputs (tuples of tensors). Thread-safe; hits and misses are counted for tests and
    logs."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor | None, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> tuple[torch.Tensor | None, ...] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: tuple[torch.Tensor | None, ...]) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
