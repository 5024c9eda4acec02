"""Textual-inversion embedding files of `<checkpoints_dir>/embeddings`, read without torch (the HTTP side lists them).

Safetensors only (pickled `.pt`/`.bin` embeddings run code when loaded and are not read). The name is the file stem,
as in A1111. A file holds either one tensor (SD1.x: `emb_params` or any single key, (vectors, 768)) or `clip_l` and
`clip_g` (SDXL). The header gives the shapes, so listing never reads the weights.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAX_HEADER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class EmbeddingFile:
    name: str
    path: Path
    mtime_ns: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor name -> shape

    @property
    def is_sdxl(self) -> bool:
        return "clip_l" in self.shapes and "clip_g" in self.shapes

    @property
    def vectors(self) -> int:
        shape = self.shapes.get("clip_g") or next(iter(self.shapes.values()), (0,))
        return shape[0] if len(shape) > 1 else 1

    @property
    def width(self) -> int:
        """The vector size A1111 reports as `shape` (clip_l + clip_g for SDXL)."""
        if self.is_sdxl:
            return self.shapes["clip_l"][-1] + self.shapes["clip_g"][-1]
        return next(iter(self.shapes.values()), (0,))[-1]

    def fits(self, family: str) -> bool:
        """Whether a model of `family` can use it (A1111 lists the others under `skipped`)."""
        if family == "sdxl":
            return self.is_sdxl
        return family == "sd15" and len(self.shapes) == 1 and 1 <= len(next(iter(self.shapes.values()))) <= 2


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header. Raises ValueError for a file that is not one."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError("safetensors header too large")
        header = json.loads(f.read(n))
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}


def scan(folder: Path | None) -> list[EmbeddingFile]:
    """Every readable `*.safetensors` embedding in `folder` (subfolders included, as A1111), sorted by name."""
    if folder is None or not folder.is_dir():
        return []
    found: dict[str, EmbeddingFile] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        if not path.is_file():
            continue
        try:
            shapes = read_shapes(path)
        except (OSError, ValueError):
            continue
        if shapes:
            found.setdefault(path.stem, EmbeddingFile(path.stem, path, path.stat().st_mtime_ns, shapes))
    return sorted(found.values(), key=lambda e: e.name)


def listing(folder: Path | None, family: str | None) -> dict[str, dict]:
    """`GET /sdapi/v1/embeddings`: A1111's {"loaded": {...}, "skipped": {...}} for a model of `family` (the current
    checkpoint's). `step`/`sd_checkpoint*` describe training in A1111; safetensors files here carry none."""
    out: dict[str, dict] = {"loaded": {}, "skipped": {}}
    for emb in scan(folder):
        info = {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": emb.width,
            "vectors": emb.vectors,
        }
        out["loaded" if family and emb.fits(family) else "skipped"][emb.name] = info
    return out
