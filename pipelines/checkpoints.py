"""Checkpoint files: the A1111 checkpoints directory, file hashes, and which architecture a file holds.

A1111 users keep `.safetensors` files in `models/Stable-diffusion` (and LoRAs in `models/Lora`). Scanning that
directory registers every file it can identify as a model, titled as A1111 titles it: `relpath [shorthash]`, where the
short hash is the first 10 hex digits of the file's sha256 (computed once, then cached by path, size and mtime, like
A1111's cache.json).

The architecture (SD1.5, SD2, SDXL, SDXL refiner, FLUX.1 dev/schnell/Fill/Kontext) is read from the safetensors header
alone, key names and shapes, never from the weights: a 20 GB file is identified in milliseconds. A file that cannot be
identified, or is a pickle (`.ckpt`/`.pt`/`.bin`/`.pth`, which runs code when loaded), is refused with the reason.

No torch import here: the HTTP side may scan and resolve names without touching the GPU side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from pipelines.registry import SINGLE_FILE_SUFFIX, ModelDefaults, ModelSpec, Registry, Variant

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PICKLE_REFUSAL = (
    "pickle checkpoints (.ckpt/.pt/.bin/.pth) can run arbitrary code when loaded and are not supported; "
    "convert the file to .safetensors (most models are published in that format too)"
)
HASH_CACHE_NAME = "hashes.json"
OUTSIDE_ROOT = (
    "a symlink to a file outside the checkpoints folder; not followed (point checkpoints_dir at the real folder, "
    "or add the file to models.yaml)"
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be served; the message names the file and says why."""


@dataclass(frozen=True)
class VariantInfo:
    family: str  # the registry family, i.e. the adapter that runs it
    label: str  # human-readable, for messages
    repo: str  # official diffusers repo whose configs/tokenizers/scheduler the variant needs
    defaults: dict[str, Any]  # ModelDefaults of a scanned file


# Variant -> family, official config repo, generation defaults (prefetch-configs goes through them in this order).
VARIANTS: dict[str, VariantInfo] = {
    "sd15": VariantInfo("sd15", "Stable Diffusion 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5", {}),
    # SD 2.x runs on the SD adapter; the 2-1 config is the 768px v-prediction model (diffusers' default for SD2 files
    # too). A 512px epsilon "base" file needs models.yaml `config:` pointing at stable-diffusion-2-1-base configs.
    "sd2": VariantInfo(
        "sd15", "Stable Diffusion 2.x", "stabilityai/stable-diffusion-2-1", {"width": 768, "height": 768}
    ),
    "sdxl": VariantInfo(
        "sdxl",
        "SDXL",
        "stabilityai/stable-diffusion-xl-base-1.0",
        {"width": 1024, "height": 1024, "cfg": 5.0, "steps": 30},
    ),
    "sdxl-refiner": VariantInfo(
        "sdxl", "SDXL refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", {"width": 1024, "height": 1024}
    ),
    "flux-dev": VariantInfo(
        "flux", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev", {"width": 1024, "height": 1024, "cfg": 3.5, "steps": 28}
    ),
    "flux-schnell": VariantInfo(
        "flux",
        "FLUX.1-schnell",
        "black-forest-labs/FLUX.1-schnell",
        {"width": 1024, "height": 1024, "cfg": 0.0, "steps": 4},
    ),
    "flux-fill": VariantInfo(
        "flux",
        "FLUX.1-Fill-dev",
        "black-forest-labs/FLUX.1-Fill-dev",
        {"width": 1024, "height": 1024, "cfg": 30.0, "steps": 28},
    ),
    "flux-kontext": VariantInfo(
        "flux",
        "FLUX.1-Kontext-dev",
        "black-forest-labs/FLUX.1-Kontext-dev",
        {"width": 1024, "height": 1024, "cfg": 2.5, "steps": 28},
    ),
}

# Variants whose base pipeline needs an input image (no text-to-image).
NO_TXT2IMG_VARIANTS = frozenset({"sdxl-refiner", "flux-fill"})

# --- reading the header and identifying the architecture ------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """Tensor names and shapes of a safetensors file, plus its `__metadata__`; no tensor data is read."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)


@dataclass(frozen=True)
class Detection:
    variant: Variant
    evidence: str  # which keys/shapes decided it, for logs and errors

    @property
    def family(self) -> str:
        return VARIANTS[self.variant].family

    @property
    def label(self) -> str:
        return VARIANTS[self.variant].label


def check_suffix(path: Path) -> None:
    """Refuse pickle files and anything that is not `.safetensors`, naming the file."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: {PICKLE_REFUSAL}")
    if suffix != SINGLE_FILE_SUFFIX:
        raise CheckpointError(f"{path}: not a .safetensors checkpoint")


def read_header(path: str | Path) -> Header:
    """Keys, shapes and metadata of a safetensors file via `safe_open`: the header only, never the weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return Header(shapes, metadata)


UNET = "model.diffusion_model."
_FLUX_PROBE = "double_blocks.0.img_attn.qkv.weight"
_CROSS_ATTN_K = re.compile(
    r"^model\.diffusion_model\.input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$"
)


def detect_checkpoint(path: str | Path) -> Detection:
    """The architecture of a `.safetensors` checkpoint, from its header. Raises CheckpointError naming the file."""
    path = Path(path)
    check_suffix(path)
    try:
        return detect_header(read_header(path), path.name)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def detect_header(header: Header, filename: str = "") -> Detection:
    """Identify SD1.5 / SD2 / SDXL / SDXL refiner / FLUX.1 dev, schnell, Fill, Kontext from key names and shapes.

    Decisions rest on which sub-models are present (text encoders, guidance embedder) and on shape *ratios*, not on
    absolute widths, so small test models are identified the same way as full-size ones.
    """
    s = header.shapes
    for prefix in ("", UNET):
        if prefix + _FLUX_PROBE in s:
            return _detect_flux(header, prefix, filename)
    if UNET + "input_blocks.0.0.weight" in s:
        return _detect_unet(header)
    raise CheckpointError(_unidentified(header))


def _detect_flux(header: Header, p: str, filename: str) -> Detection:
    s = header.shapes
    if p + "distilled_guidance_layer.in_proj.bias" in s:
        raise CheckpointError("a Chroma checkpoint (FLUX-derived); not supported")
    try:
        in_features = s[p + "img_in.weight"][1]
        out_features = s[p + "final_layer.linear.weight"][0]
    except (KeyError, IndexError):
        raise CheckpointError("FLUX-like keys but no img_in/final_layer weights; incomplete file?") from None
    # Fill concatenates the masked image and the 8x8-packed mask to the latents (64 -> 384 input channels); Depth and
    # Canny concatenate a control latent (64 -> 128).
    ratio = in_features / out_features
    guidance = p + "guidance_in.in_layer.weight" in s
    if ratio == 6:
        return Detection("flux-fill", f"img_in takes {in_features} channels for {out_features} out (Fill)")
    if ratio == 2:
        raise CheckpointError("a FLUX.1 Depth/Canny (structural control) checkpoint; not supported")
    if ratio != 1:
        raise CheckpointError(f"a FLUX-like transformer with {in_features} input channels; not a known FLUX.1 model")
    if not guidance:
        return Detection("flux-schnell", "FLUX transformer without guidance_in (schnell)")
    # Kontext-dev has exactly FLUX.1-dev's keys and shapes: only its name or metadata can tell them apart.
    named = "kontext" in filename.lower() or any("kontext" in str(v).lower() for v in header.metadata.values())
    if named:
        return Detection("flux-kontext", "FLUX transformer with guidance_in, named Kontext")
    return Detection("flux-dev", "FLUX transformer with guidance_in (dev)")


def _detect_unet(header: Header) -> Detection:
    s = header.shapes
    if header.has_prefix(UNET + "joint_blocks."):
        raise CheckpointError("a Stable Diffusion 3 checkpoint; not supported")
    if "edm_mean" in s:
        raise CheckpointError("a Playground v2.5 checkpoint; not supported")
    in_channels = s[UNET + "input_blocks.0.0.weight"][1]
    out_channels = s.get(UNET + "out.2.weight", (in_channels,))[0]
    if in_channels != out_channels:
        kind = "an inpainting" if in_channels == 2 * out_channels + 1 else "an instruct-pix2pix or other"
        raise CheckpointError(
            f"{kind} UNet ({in_channels} input channels); only text-to-image checkpoints are supported"
        )
    # The text encoders say which model this is (and their layout is what the loader converts).
    if header.has_prefix("conditioner.embedders.1.model."):
        return Detection("sdxl", "CLIP-L + OpenCLIP-G text encoders (conditioner.embedders.0/1)")
    if header.has_prefix("conditioner.embedders.0.model."):
        return Detection("sdxl-refiner", "OpenCLIP-G text encoder only (conditioner.embedders.0.model)")
    if header.has_prefix("cond_stage_model.model."):
        return Detection("sd2", "OpenCLIP-H text encoder (cond_stage_model.model)")
    if header.has_prefix("cond_stage_model.transformer."):
        return Detection("sd15", "CLIP-L text encoder (cond_stage_model.transformer)")
    # No text encoder in the file: fall back on the UNet's conditioning widths (only real sizes are known here).
    label = s.get(UNET + "label_emb.0.0.weight")
    if label is not None:
        if label[1] == 2816:
            return Detection("sdxl", "UNet only; 2816-wide size/pooled-text embedding (SDXL)")
        if label[1] == 2560:
            return Detection("sdxl-refiner", "UNet only; 2560-wide aesthetic embedding (SDXL refiner)")
    context = next((shape[1] for k, shape in s.items() if _CROSS_ATTN_K.match(k)), None)
    if context == 768:
        return Detection("sd15", "UNet only; 768-wide cross-attention (SD1.x)")
    if context == 1024:
        return Detection("sd2", "UNet only; 1024-wide cross-attention (SD2.x)")
    raise CheckpointError("an SD-style UNet whose model (SD1.5/SD2/SDXL) cannot be told from its keys")


def _unidentified(header: Header) -> str:
    keys = list(header.shapes)
    if not keys:
        return "holds no tensors"
    if any("lora_" in k or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "looks like a LoRA, not a checkpoint (LoRAs belong in models/Lora)"
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return "looks like a standalone VAE, not a checkpoint"
    if any(k.startswith(("transformer_blocks.", "down_blocks.", "unet.", "transformer.")) for k in keys):
        return "is in diffusers' layout (a component file); use the whole diffusers folder as the model source"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        return "looks like a textual-inversion embedding, not a checkpoint"
    sample = ", ".join(sorted(keys)[:3])
    return f"cannot identify the model: no SD1.5/SD2/SDXL/FLUX.1 keys found (first keys: {sample})"


# --- hashing ----------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of files, computed once and kept in a JSON file keyed by absolute path, valid while size and mtime match.

    Hashing a 7 GB checkpoint takes seconds; A1111 keeps the same kind of cache (cache.json) for the same reason.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self._entries = data["files"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # a corrupt cache only costs re-hashing
            log.warning("ignoring unreadable hash cache %s: %s", self.path, e)

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> HashCache:
        return cls(Path(data_dir) / HASH_CACHE_NAME)

    def cached(self, path: str | Path) -> str | None:
        """The cached sha256 if the file is unchanged since it was hashed, else None (never hashes)."""
        path = Path(path).resolve()
        st = path.stat()
        with self._lock:
            entry = self._entries.get(str(path))
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return str(entry["sha256"])
        return None

    def sha256(self, path: str | Path) -> str:
        path = Path(path).resolve()
        hit = self.cached(path)
        if hit is not None:
            return hit
        st = path.stat()
        digest = file_sha256(path)
        with self._lock:
            self._entries[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            self._save()
        return digest

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "files": self._entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # readers see the old or the new file, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- the checkpoints directory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class ScanResult:
    specs: list[ModelSpec] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def config_dir_for(variant: str, configs_dir: str | Path) -> Path:
    """Where `easel prefetch-configs` puts the configs of a variant."""
    return Path(configs_dir) / variant


def checkpoint_id(checkpoint_name: str) -> str:
    """A registry id for a checkpoint name (`sub/My Model v2.safetensors` -> `sub_My_Model_v2`)."""
    stem = checkpoint_name.replace("\\", "/").rsplit(".", 1)[0].replace("/", "_")
    ident = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return ident if ident and ident[0].isalnum() else f"ckpt_{ident}"


def spec_for_checkpoint(
    path: Path,
    checkpoint_name: str,
    detection: Detection,
    sha256: str | None,
    configs_dir: str | Path | None = None,
) -> ModelSpec:
    info = VARIANTS[detection.variant]
    return ModelSpec(
        id=checkpoint_id(checkpoint_name),
        family=info.family,  # type: ignore[arg-type]
        source=str(path.resolve()),
        variant=detection.variant,
        config=str(config_dir_for(detection.variant, configs_dir)) if configs_dir else None,
        file_sha256=sha256,
        checkpoint_name=checkpoint_name,
        defaults=ModelDefaults(**info.defaults),
        description=f"{info.label} checkpoint ({detection.evidence})",
    )


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, every symlink resolved, lies under `root` (resolved too): a link cannot lead out of it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _walk(root: Path) -> list[Path]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix().lower())


def scan_checkpoints(
    root: str | Path,
    *,
    cache: HashCache | None = None,
    configs_dir: str | Path | None = None,
) -> ScanResult:
    """Every `.safetensors` checkpoint under `root` (recursively) as a ModelSpec, plus the files refused and why.

    With a `cache`, each spec carries the file's real sha256 (hashed once per file version); without, titles use a
    stand-in hash. A missing directory is an empty result: nothing to serve is not an error.
    """
    root = Path(root)
    result = ScanResult()
    if not root.is_dir():
        return result
    for path in _walk(root):
        suffix = path.suffix.lower()
        if not is_inside(path, root):
            result.skipped.append(Skipped(path, OUTSIDE_ROOT))
            continue
        if suffix in PICKLE_SUFFIXES:
            result.skipped.append(Skipped(path, PICKLE_REFUSAL))
            continue
        if suffix != SINGLE_FILE_SUFFIX:
            continue  # previews, model cards, yaml configs A1111 keeps next to checkpoints
        try:
            detection = detect_header(read_header(path), path.name)
            sha256 = cache.sha256(path) if cache is not None else None
        except CheckpointError as e:
            result.skipped.append(Skipped(path, str(e).removeprefix(f"{path}: ")))
            continue
        except OSError as e:
            result.skipped.append(Skipped(path, f"cannot read: {e}"))
            continue
        name = path.relative_to(root).as_posix()
        result.specs.append(spec_for_checkpoint(path, name, detection, sha256, configs_dir))
    for s in result.skipped:
        log.warning("checkpoint %s skipped: %s", s.path, s.reason)
    return result


def refresh_registry(
    registry: Registry,
    root: str | Path | None,
    *,
    cache: HashCache | None = None,
    configs_dir: str | Path | None = None,
) -> ScanResult:
    """Rescan the checkpoints directory into `registry` (start-up and POST /sdapi/v1/refresh-checkpoints)."""
    result = scan_checkpoints(root, cache=cache, configs_dir=configs_dir) if root else ScanResult()
    result.specs = registry.replace_scanned(result.specs)
    return result


def hash_single_files(registry: Registry, cache: HashCache) -> list[ModelSpec]:
    """Fill in the real sha256 of models.yaml single-file entries that do not pin one (their A1111 title hash)."""
    updated = []
    for spec in registry:
        if spec.is_single_file and spec.file_sha256 is None and Path(spec.source).is_file():
            updated.append(spec.model_copy(update={"file_sha256": cache.sha256(spec.source)}))
    if updated:
        registry.update(updated)
    return updated


# --- loading-time checks ----------------------------------------------------------------------------------------------


def resolve_single_file(spec: ModelSpec, configs_dir: str | Path | None = None) -> ModelSpec:
    """The spec of a single-file model, ready to load: variant detected (or checked), config folder found.

    Raises CheckpointError naming the file: a pickle, an unidentifiable file, a family that contradicts models.yaml,
    or no local config folder (nothing is ever fetched from a hub at run time).
    """
    path = Path(spec.source)
    check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    variant = spec.variant or detect_checkpoint(path).variant
    info = VARIANTS[variant]
    if info.family != spec.family:
        raise CheckpointError(
            f"{path}: the file is {info.label} (family '{info.family}') but model '{spec.id}' says family "
            f"'{spec.family}'; fix models.yaml"
        )
    if spec.config:
        config = Path(spec.config)
    elif configs_dir:
        config = config_dir_for(variant, configs_dir)
    else:
        raise CheckpointError(
            f"{path}: no config folder for this {info.label} checkpoint: set configs_dir (EASEL_CONFIGS_DIR) to a "
            f"folder filled by `easel prefetch-configs`, or give the model a `config:` diffusers folder in models.yaml"
        )
    if not (config / "model_index.json").is_file():
        raise CheckpointError(
            f"{path}: config folder {config} has no model_index.json; run `easel prefetch-configs {config.parent}` "
            f"on a machine with internet and copy the folder here (it holds the {info.label} configs from {info.repo})"
        )
    return spec.model_copy(update={"variant": variant, "config": str(config)})


def find_pickle_weights(folder: str | Path) -> list[Path]:
    """Pickle weight files a diffusers folder would load: in component folders that hold no safetensors instead."""
    folder = Path(folder)
    found: list[Path] = []
    for directory in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        names = [p for p in directory.iterdir() if p.is_file()]
        pickles = [p for p in names if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix.lower() == SINGLE_FILE_SUFFIX for p in names):
            found.extend(sorted(pickles))
    return found
