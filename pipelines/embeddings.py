"""Textual-inversion embeddings in prompts (SD1.5, SDXL), as A1111's `modules/textual_inversion` does it.

An embedding is used where the tokens of its name (the file stem, tokenized like the prompt) appear in a prompt: those
tokens are replaced by the embedding's vectors at the text encoder's token-embedding layer (A1111's
`EmbeddingsWithFixes`). `pipelines.prompt_embeds` finds the names while it fills chunks and records each use as a
fix (position, vectors); `fixes_applied` swaps the vectors in while the encoder runs. SDXL files hold `clip_l` (first
encoder) and `clip_g` (second) vectors; SD1.x files one tensor. Files whose vectors do not fit the encoder are not
used (their names stay plain words), as A1111 skips them.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines.embedding_files import EmbeddingFile, scan


@dataclass(frozen=True)
class Embedding:
    """One embedding's vectors for one encoder; `ident` names it in text-cache keys (file and version)."""

    ids: tuple[int, ...]  # the tokens of its name
    vectors: torch.Tensor  # (n, dim)
    ident: Hashable


class TokenTable:
    """The embeddings usable with one tokenizer/encoder, looked up by the token that starts their name."""

    def __init__(self, embeddings: list[Embedding]):
        self._by_first: dict[int, list[Embedding]] = {}
        for emb in sorted(embeddings, key=lambda e: len(e.ids), reverse=True):  # longest name first, as A1111
            self._by_first.setdefault(emb.ids[0], []).append(emb)

    def find(self, tokens: list[int], position: int) -> Embedding | None:
        for emb in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(emb.ids)]) == emb.ids:
                return emb
        return None

    def __bool__(self) -> bool:
        return bool(self._by_first)


class TextualInversions:
    """The embeddings folder of one server; files are rescanned on every use (a listing, cheap) and loaded once per
    version. Thread-safe."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._tensors: dict[tuple[Path, int], dict[str, torch.Tensor]] = {}
        self._tables: dict[Hashable, TokenTable] = {}

    def table(self, tokenizer, key: str | None, dim: int) -> TokenTable | None:
        """The embeddings for an encoder of width `dim` whose vectors are under `key` (None: single-tensor SD1.x
        files), or None when there are none."""
        files = scan(self.folder)
        if not files:
            return None
        versions = tuple((f.path, f.mtime_ns) for f in files)
        cache_key = (id(tokenizer), key, dim, versions)
        with self._lock:
            table = self._tables.get(cache_key)
            if table is None:
                table = TokenTable([e for f in files if (e := self._embedding(f, tokenizer, key, dim)) is not None])
                self._tables = {k: v for k, v in self._tables.items() if k[:3] != cache_key[:3]}
                self._tables[cache_key] = table
        return table if table else None

    def _embedding(self, file: EmbeddingFile, tokenizer, key: str | None, dim: int) -> Embedding | None:
        name = key if key is not None and file.is_sdxl else None
        if key is None and file.is_sdxl or key is not None and not file.is_sdxl:
            return None
        version = (file.path, file.mtime_ns)
        if version not in self._tensors:
            try:
                self._tensors[version] = load_file(str(file.path))
            except Exception:  # a broken file is skipped, as A1111 does
                return None
        tensors = self._tensors[version]
        if name is None and len(tensors) != 1:  # A1111: "embedding file has multiple terms in it"
            return None
        vectors = tensors[name] if name is not None else next(iter(tensors.values()))
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[-1] != dim or vectors.shape[0] < 1:
            return None
        ids = tokenizer([file.name], add_special_tokens=False)["input_ids"][0]
        if not ids:
            return None
        return Embedding(tuple(ids), vectors.float(), (file.name, file.mtime_ns, key))


@contextmanager
def fixes_applied(encoder, fixes: list[list[tuple[int, Embedding]]]) -> Iterator[None]:
    """While inside, row j of the encoder's input has each fix's vectors at (offset + 1) on (after BOS)."""
    if not any(fixes):
        yield
        return

    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, emb in row_fixes:
                n = min(output.shape[1] - offset - 1, emb.vectors.shape[0])
                output[row, offset + 1 : offset + 1 + n] = emb.vectors[:n].to(output)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
