"""models.yaml -> validated `ModelSpec`s.

A bad file fails at start-up with the file, the model id and the field named. No torch import here: the HTTP side
uses the registry to resolve names (ids, aliases, A1111 titles) without touching the GPU side.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Family = Literal["sd15", "sdxl", "flux", "qwen-image", "qwen-image-edit"]

# Pixel multiple each family needs (VAE factor x patch size).
SIZE_MULTIPLE: dict[str, int] = {"sd15": 8, "sdxl": 8, "flux": 16, "qwen-image": 16, "qwen-image-edit": 16}
DEMO_PREFIX = "demo:"
# Gateway routes (/v2/image/*) that models.yaml's `routes:` section maps to model ids.
ROUTE_NAMES = ("flux", "qwen", "qwen-edit", "gpt-image", "gpt-image-edit", "gemini-3")


class RegistryError(ValueError):
    """models.yaml could not be read or is invalid; the message names file, model and field."""


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, le=1000)
    cfg: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=64, le=16384)
    height: int = Field(512, ge=64, le=16384)
    sampler: str | None = None


class PerformanceSpec(BaseModel):
    """The CUDA fast path of one model (models.yaml `performance:`). Ignored on CPU, where none of it applies."""

    model_config = ConfigDict(extra="forbid")

    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers only when installed (the [cuda] extra)
    channels_last: bool = True  # UNet convolutions in NHWC (SD/SDXL)
    fuse_qkv: bool = True  # one matmul for Q, K and V in the denoiser's attention
    compile: Literal["off", "regional", "full"] = "off"  # torch.compile of the denoiser, warmed up at load time
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    vae_tiling_above_pixels: int | None = Field(2048 * 2048, ge=64 * 64)  # tiled VAE decode above this size
    vae_slicing_above_images: int | None = Field(4, ge=1)  # decode one image at a time above this batch
    offload: Literal["none", "model", "sequential"] = "none"  # CPU offload for cards too small for the model


class ModelSpec(BaseModel):
    """One model entry of models.yaml."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    family: Family
    # "demo:<family>" (built in code), a diffusers folder, or (later) a single .safetensors file.
    source: str
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    aliases: list[str] = Field(default_factory=list)
    description: str = ""

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @property
    def is_demo(self) -> bool:
        return self.source.startswith(DEMO_PREFIX)

    @property
    def demo_kind(self) -> str:
        return self.source[len(DEMO_PREFIX) :]

    @property
    def size_multiple(self) -> int:
        return SIZE_MULTIPLE[self.family]

    @property
    def short_hash(self) -> str:
        """Stable 10-hex id for A1111 titles (`demo-sd15 [abcdef0123]`); content hashing comes with single files."""
        return self.sha256[:10]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.id}|{self.family}|{self.source}".encode()).hexdigest()

    @property
    def title(self) -> str:
        return f"{self.id} [{self.short_hash}]"

    def names(self) -> Iterable[str]:
        """Every name this model answers to (A1111 accepts title, name, hash, aliases)."""
        yield self.id
        yield self.title
        yield self.short_hash
        yield self.sha256
        for alias in self.aliases:
            yield alias
            stem = alias.rsplit(".", 1)[0] if alias.endswith((".safetensors", ".ckpt")) else None
            if stem:
                yield stem
            yield f"{alias} [{self.short_hash}]"


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    models: dict[str, dict]
    routes: dict[str, str] = Field(default_factory=dict)  # used by the /v2 gateway


class Registry:
    """Validated model table with name resolution."""

    def __init__(
        self,
        models: list[ModelSpec],
        default_model: str | None = None,
        source: Path | None = None,
        routes: dict[str, str] | None = None,
    ):
        if not models:
            raise RegistryError(f"{source or 'models.yaml'}: no models defined")
        self.models: dict[str, ModelSpec] = {m.id: m for m in models}
        self.source = source
        self._names: dict[str, str] = {}
        for m in models:
            for name in m.names():
                owner = self._names.setdefault(name.lower(), m.id)
                if owner != m.id and name == m.id:
                    raise RegistryError(f"{source}: model '{m.id}': id clashes with an alias of '{owner}'")
        if default_model is not None and default_model not in self.models:
            raise RegistryError(f"{source}: default_model: unknown model id '{default_model}'")
        self.default_model = default_model or models[0].id
        self.routes: dict[str, str] = {}
        for route, name in (routes or {}).items():
            if route not in ROUTE_NAMES:
                raise RegistryError(f"{source}: field 'routes.{route}': unknown route; known: {', '.join(ROUTE_NAMES)}")
            spec = self.resolve(name)
            if spec is None:
                raise RegistryError(f"{source}: field 'routes.{route}': unknown model '{name}'")
            self.routes[route] = spec.id

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def get(self, model_id: str) -> ModelSpec:
        return self.models[model_id]

    def route_model(self, route: str) -> ModelSpec | None:
        """The model a gateway route is mapped to in models.yaml's `routes:`, or None if unmapped."""
        model_id = self.routes.get(route)
        return self.models[model_id] if model_id else None

    def resolve(self, name: str | None) -> ModelSpec | None:
        """Find a model by id, alias, A1111 title or hash (case-insensitive); None if unknown."""
        if not name:
            return None
        key = self._names.get(name.strip().lower())
        if key is None:
            # A1111 titles carry "[hash]" suffixes we may not know (another hash): match the part before it.
            base = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name.strip()).lower()
            key = self._names.get(base)
        return self.models.get(key) if key else None


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def load_registry(path: str | Path) -> Registry:
    """Read and validate models.yaml. Raises RegistryError naming file, model id and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise RegistryError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping with a 'models' key")
    try:
        top = RegistryFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise RegistryError(f"{path}: field '{_format_loc(err['loc'])}': {err['msg']}") from e

    specs: list[ModelSpec] = []
    for model_id, entry in top.models.items():
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: model '{model_id}': expected a mapping of fields")
        try:
            spec = ModelSpec.model_validate({"id": model_id, **entry})
        except ValidationError as e:
            err = e.errors()[0]
            raise RegistryError(f"{path}: model '{model_id}': field '{_format_loc(err['loc'])}': {err['msg']}") from e
        if not spec.is_demo:
            src = Path(spec.source)
            if not src.is_absolute():
                spec = spec.model_copy(update={"source": str((path.parent / src).resolve())})
        specs.append(spec)
    return Registry(specs, top.default_model, source=path, routes=top.routes)
