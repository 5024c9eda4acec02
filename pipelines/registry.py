"""models.yaml -> validated `ModelSpec`s.

A bad file fails at start-up with the file, the model id and the field named. No torch import here: the HTTP side
uses the registry to resolve names (ids, aliases, A1111 titles) without touching the GPU side.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Family = Literal["sd15", "sdxl", "flux", "qwen-image", "qwen-image-edit"]
# Architecture variants a single-file checkpoint can be (`pipelines.checkpoints.VARIANTS`): each picks a config folder
# and a pipeline class within its family (SD2 runs on the sd15 adapter, the refiner on sdxl, Fill/Kontext on flux).
Variant = Literal["sd15", "sd2", "sdxl", "sdxl-refiner", "flux-dev", "flux-schnell", "flux-fill", "flux-kontext"]
SINGLE_FILE_SUFFIX = ".safetensors"

# Pixel multiple each family needs (VAE factor x patch size).
SIZE_MULTIPLE: dict[str, int] = {"sd15": 8, "sdxl": 8, "flux": 16, "qwen-image": 16, "qwen-image-edit": 16}
DEMO_PREFIX = "demo:"
# Routes that models.yaml's `routes:` section maps to model ids: the /v2/image/* gateway routes, the default models
# of the OpenAI, IndoxHub and GenPicz dialects, and the Genrex model tiers.
GATEWAY_ROUTES = ("flux", "qwen", "qwen-edit", "gpt-image", "gpt-image-edit", "gemini-3")
DIALECT_ROUTES = (
    "openai",
    "openai-edit",
    "indoxhub",
    "genpicz",
    "genrex-basic",
    "genrex-standard",
    "genrex-advanced",
)
ROUTE_NAMES = GATEWAY_ROUTES + DIALECT_ROUTES


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
    """The CUDA fast path of one model (models.yaml `performance:`). Ignored on CPU, where none of it applies.
    `pipelines.optimize.plan_optimizations` turns it into steps for one model on one device."""

    model_config = ConfigDict(extra="forbid")

    # sdpa: PyTorch's scaled_dot_product_attention (picks flash/efficient kernels itself); xformers: the [cuda] extra;
    # flash / flash3 / sage: diffusers' attention backends for the FLUX/Qwen transformers when the flash-attn,
    # flash-attn 3 or sageattention package is installed; cudnn: PyTorch's cuDNN attention (no package).
    attention: Literal["sdpa", "xformers", "flash", "flash3", "sage", "cudnn"] = "sdpa"
    channels_last: bool = True  # UNet convolutions in NHWC (SD/SDXL)
    fuse_qkv: bool = True  # one matmul for Q, K and V in the denoiser's attention
    # torch.compile of the denoiser, warmed up at load time. auto: the whole UNet (SD/SDXL), the repeated transformer
    # blocks (FLUX/Qwen-Image: most of the gain for a fraction of the compile time).
    compile: Literal["auto", "off", "regional", "full"] = "auto"
    compile_mode: str | None = None  # torch.compile mode; set, it wins over cuda_graphs
    # CUDA graphs (compile mode "reduce-overhead", one graph per batch size and resolution): a step becomes one launch,
    # so small batches stop depending on how fast (and how busy) the host CPU is. None = auto: on for a full compile.
    cuda_graphs: bool | None = None
    # Shapes compiled at load time, so no request pays a compile: [width, height] pairs (default: the model's
    # default size) times batch sizes. Other shapes compile on first use, logged with what it cost.
    warmup_sizes: list[tuple[int, int]] | None = None
    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    # fp8: the denoiser's linear layers in FP8 with dynamic activation scales (torchao, the [cuda] extra), on cards
    # with FP8 compute (compute capability 8.9+: Ada, Hopper, Blackwell). auto: fp8 for FLUX/Qwen-Image where the
    # card and torchao allow it, none otherwise. none: the loaded dtype everywhere.
    # At load (`pipelines.optimize.quantize_at_load`): fp8 without FP8 compute (CPU, Ampere and older) stores the
    # weights in FP8 and computes in the model's dtype layer by layer; int8: torchao int8 weight-only (CPU too);
    # nf4: bitsandbytes 4-bit (the [nf4] extra, CUDA only). The denoiser only, unless quantize_text_encoders.
    quantization: Literal["none", "fp8", "int8", "nf4", "auto"] = "auto"
    quantize_text_encoders: bool = False
    vae_tiling_above_pixels: int | None = Field(2048 * 2048, ge=64 * 64)  # tiled VAE decode above this size
    vae_slicing_above_images: int | None = Field(4, ge=1)  # decode one image at a time above this batch
    # CPU offload for cards too small for the model. auto: chosen at load from the bytes the model holds and the
    # card's free memory (pipelines.placement): all resident, text encoders on the CPU, model, sequential.
    offload: Literal["auto", "none", "model", "sequential"] = "auto"
    # A GGUF denoiser (`denoiser: *.gguf`) is dequantized per layer on every call, which costs time. auto: dequantized
    # once at load to the model's dtype when the whole pipeline, so dequantized, still fits resident on the card's
    # free memory (no other model is evicted for it; CUDA only; never under offload: model or sequential); then the
    # fast path (QKV fusion, compile) applies as to any model. dequantize: always (placement then offloads if it
    # must); keep: never. A bitsandbytes 4-bit denoiser file follows the same rule (it loads decoded and goes back
    # into 4-bit layers where the decoded pipeline would not fit: optimize.requantize_4bit_file).
    gguf: Literal["auto", "dequantize", "keep"] = "auto"

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_ok(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is not None and any(not (64 <= w <= 16384 and 64 <= h <= 16384) for w, h in v):
            raise ValueError("each size must be [width, height] between 64 and 16384")
        return v

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _batches_ok(cls, v: list[int]) -> list[int]:
        if any(not 1 <= b <= 64 for b in v):
            raise ValueError("batch sizes must be between 1 and 64")
        return v


class ModelSpec(BaseModel):
    """One model entry of models.yaml, or a checkpoint file found in the checkpoints directory."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    family: Family
    # "demo:<family>" (built in code), a diffusers folder, or a single .safetensors file (A1111/ldm/BFL layout).
    source: str
    # Single files only: a local diffusers folder with the configs, tokenizers and scheduler of the architecture
    # (`easel prefetch-configs`); default <configs_dir>/<variant>.
    config: str | None = None
    # Single files only: the architecture; detected from the file's keys when unset (needed for FLUX.1 Kontext,
    # which has the same keys as FLUX.1-dev).
    variant: Variant | None = None
    # The file's real sha256 (A1111's hash); computed once and cached by the scanner, or pinned here.
    file_sha256: str | None = Field(None, alias="sha256", pattern=r"^[0-9a-fA-F]{64}$")
    # A1111's checkpoint name: the file's path relative to the checkpoints directory (set by the scanner).
    checkpoint_name: str | None = None
    # Components from their own files (pipelines.quantized), the rest from `source`: the UNet/transformer as
    # .safetensors (bf16/fp16/FP8, community or diffusers keys) or .gguf; text encoders as .safetensors.
    denoiser: str | None = None
    text_encoder: str | None = None
    text_encoder_2: str | None = None
    # Pickle weights (.bin/.ckpt/.pt) run code when loaded: a diffusers folder holding them is refused unless allowed.
    allow_pickle: bool = False
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
    def is_single_file(self) -> bool:
        return not self.is_demo and self.source.lower().endswith(SINGLE_FILE_SUFFIX)

    @property
    def short_hash(self) -> str:
        """10-hex id of A1111 titles (`v1-5-pruned-emaonly.safetensors [6ce0161689]`)."""
        return self.sha256[:10]

    @property
    def sha256(self) -> str:
        """The file's sha256 when known; otherwise a stable stand-in (a file's from its path, so a rename keeps it)."""
        if self.file_sha256:
            return self.file_sha256.lower()
        key = f"file|{self.source}" if self.is_single_file else f"{self.id}|{self.family}|{self.source}"
        return hashlib.sha256(key.encode()).hexdigest()

    @property
    def checkpoint_file_name(self) -> str | None:
        """A1111's `name` of a single file: its path relative to the checkpoints directory, else its file name."""
        if not self.is_single_file:
            return None
        return self.checkpoint_name or PurePosixPath(self.source.replace("\\", "/")).name

    @property
    def model_name(self) -> str:
        """A1111's `model_name`: the checkpoint name without extension, '/' as '_'; the id for other models."""
        name = self.checkpoint_file_name
        if name is None:
            return self.id
        return name.replace("/", "_").replace("\\", "_").rsplit(".", 1)[0]

    @property
    def title(self) -> str:
        return f"{self.checkpoint_file_name or self.id} [{self.short_hash}]"

    def names(self) -> Iterable[str]:
        """Every name this model answers to (A1111 accepts title, name, model_name, stem, hash, aliases)."""
        yield self.id
        yield self.title
        yield self.short_hash
        yield self.sha256
        name = self.checkpoint_file_name
        if name is not None:
            yield name
            yield self.model_name
            yield PurePosixPath(name).stem
        for alias in self.aliases:
            yield alias
            stem = alias.rsplit(".", 1)[0] if alias.endswith((".safetensors", ".ckpt")) else None
            if stem:
                yield stem
            yield f"{alias} [{self.short_hash}]"


class BackgroundRemovalSpec(BaseModel):
    """models.yaml `background_removal:`: the model that gives generated images an alpha channel (`background:
    transparent`). A local transformers folder holding a semantic-segmentation (or matting) model that answers
    per-pixel class logits (AutoModelForSemanticSegmentation: SegFormer, DPT, BEiT, MobileViT, UperNet...) and its
    image processor; alpha = 1 - P(`background_label`) per pixel, resized to the image."""

    model_config = ConfigDict(extra="forbid")

    source: str  # the folder (absolute, or relative to models.yaml); safetensors weights only
    background_label: int = Field(0, ge=0)  # the class index that means background
    device: str = "auto"  # auto (the engine's device) | cpu | cuda | cuda:N


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    models: dict[str, dict]
    routes: dict[str, str] = Field(default_factory=dict)  # used by the /v2 gateway
    background_removal: BackgroundRemovalSpec | None = None


class Registry:
    """Validated model table with name resolution.

    models.yaml entries are fixed at start-up; checkpoint files found in the checkpoints directory are swapped in and
    out by `replace_scanned` (A1111's refresh-checkpoints). Every change builds a new table and installs it in one
    assignment, so request threads resolving names never see a half-updated one.
    """

    def __init__(
        self,
        models: list[ModelSpec],
        default_model: str | None = None,
        source: Path | None = None,
        routes: dict[str, str] | None = None,
        background_removal: BackgroundRemovalSpec | None = None,
    ):
        if not models:
            raise RegistryError(f"{source or 'models.yaml'}: no models defined")
        self.source = source
        self.background_removal = background_removal
        self._scanned: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # serialises changes (two rescans at once); readers never take it
        self._install(models)
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

    def _install(self, models: list[ModelSpec]) -> None:
        table: dict[str, ModelSpec] = {}
        names: dict[str, str] = {}
        for m in models:
            if m.id in table:
                raise RegistryError(f"{self.source}: model '{m.id}': defined twice")
            table[m.id] = m
            for name in m.names():
                owner = names.setdefault(name.lower(), m.id)
                if owner != m.id and name == m.id:
                    raise RegistryError(f"{self.source}: model '{m.id}': id clashes with an alias of '{owner}'")
        self._state = (table, names)

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self._state[0]

    @property
    def scanned_ids(self) -> frozenset[str]:
        """Ids of the models that came from the checkpoints directory (not models.yaml)."""
        return self._scanned

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def get(self, model_id: str) -> ModelSpec:
        return self.models[model_id]

    def add(self, specs: Iterable[ModelSpec]) -> None:
        """Add models with new ids. Raises RegistryError if an id is taken (as an id or another model's name)."""
        with self._lock:
            self._install([*self.models.values(), *specs])

    def update(self, specs: Iterable[ModelSpec]) -> None:
        """Replace models by id (e.g. with their real file hashes filled in)."""
        with self._lock:
            table = dict(self.models)
            for spec in specs:
                if spec.id not in table:
                    raise RegistryError(f"{self.source}: model '{spec.id}': unknown id, cannot update")
                table[spec.id] = spec
            self._install(list(table.values()))

    def replace_scanned(self, specs: Iterable[ModelSpec]) -> list[ModelSpec]:
        """Swap the previously scanned models for `specs`; returns those installed (ids may get a hash suffix).

        models.yaml wins every conflict: a file it already serves is skipped, and a scanned id that clashes with one
        of its names gets `-<shorthash>` appended.
        """
        with self._lock:
            base = [m for m in self.models.values() if m.id not in self._scanned]
            served = {_real(m.source) for m in base}
            taken = {n.lower() for m in base for n in m.names()}
            added: list[ModelSpec] = []
            for spec in specs:
                if _real(spec.source) in served:
                    continue
                if spec.id.lower() in taken:
                    spec = spec.model_copy(update={"id": f"{spec.id}-{spec.short_hash}"})
                    if spec.id.lower() in taken:
                        continue  # the same file twice (e.g. a symlink): keep the first
                served.add(_real(spec.source))
                taken.update(n.lower() for n in spec.names())
                added.append(spec)
            self._install(base + added)
            self._scanned = frozenset(m.id for m in added)
            if self.default_model not in self.models:
                self.default_model = next(iter(self.models))
            return added

    def route_model(self, route: str) -> ModelSpec | None:
        """The model a gateway route is mapped to in models.yaml's `routes:`, or None if unmapped."""
        model_id = self.routes.get(route)
        return self.models[model_id] if model_id else None

    def resolve(self, name: str | None) -> ModelSpec | None:
        """Find a model by id, alias, A1111 title or hash (case-insensitive); None if unknown."""
        if not name:
            return None
        table, names = self._state
        key = names.get(name.strip().lower())
        if key is None:
            # A1111 titles carry "[hash]" suffixes we may not know (another hash): match the part before it.
            base = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name.strip()).lower()
            key = names.get(base)
        return table.get(key) if key else None


def _real(source: str) -> str:
    """A source as a canonical path (symlinks resolved), so one file reached two ways is recognised."""
    return source if source.startswith(DEMO_PREFIX) else os.path.realpath(source)


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
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise RegistryError(f"{path}: invalid YAML{where}: {problem}") from e
    except OSError as e:
        raise RegistryError(f"{path}: cannot be read ({e.strerror or e})") from e
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
        # Paths (weights, a single file's config folder, component files) are relative to models.yaml.
        fields = ["config", "denoiser", "text_encoder", "text_encoder_2"] + ([] if spec.is_demo else ["source"])
        update = {
            field: str((path.parent / value).resolve())
            for field in fields
            if (value := getattr(spec, field)) is not None and not Path(value).is_absolute()
        }
        if update:
            spec = spec.model_copy(update=update)
        specs.append(spec)
    removal = top.background_removal
    if removal is not None and not Path(removal.source).is_absolute():
        removal = removal.model_copy(update={"source": str((path.parent / removal.source).resolve())})
    return Registry(specs, top.default_model, source=path, routes=top.routes, background_removal=removal)
