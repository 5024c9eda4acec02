"""LoRAs: a registry over an A1111-style `models/Lora` directory, and per-model adapter management.

`LoraRegistry` lists the `.safetensors` files under a directory (subfolders allowed; the name is the file stem,
the alias the `ss_output_name` metadata, as A1111). `list()` has the shape of A1111's `GET /sdapi/v1/loras`.
Importing this module does not import torch, so the HTTP side can list and refresh LoRAs.

`LoraManager` belongs to one loaded pipeline. Per call it loads each requested LoRA once with diffusers'
`load_lora_weights(path, adapter_name=...)` (PEFT backend; diffusers-format and kohya/A1111-format keys both load),
activates exactly the requested set with `set_adapters(names, adapter_weights)` and disables LoRA after the call, so
a request without LoRAs runs the bare weights. Adapters stay loaded for the next request (no reload when the same
LoRA comes back) up to `max_loaded`; beyond that the least recently used ones are deleted (`delete_adapters`), so
memory does not grow with the number of distinct LoRAs served. LoRAs are never fused into the weights: switching sets
costs nothing, at the price of the small LoRA matmuls at every step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import InvalidRequest
from pipelines.prompts import merge_loras, request_loras
from pipelines.request import LoraRef

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from pipelines.families.base import BatchItem, LoadedModel

log = logging.getLogger("easel.lora")

EXTENSIONS = (".safetensors",)  # A1111 also reads .pt/.ckpt (pickles); we never unpickle user files
MAX_HEADER_BYTES = 100 * 2**20
DEFAULT_MAX_LOADED = 8


class LoraNotFound(InvalidRequest):
    def __init__(self, name: str):
        super().__init__("loras", f"LoRA '{name}' not found in the Lora directory")
        self.name = name


@dataclass
class LoraInfo:
    name: str  # file stem: what `<lora:name:w>` refers to
    alias: str  # `ss_output_name` from the metadata, else the name (A1111 accepts both)
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    mtime_ns: int = 0
    size: int = 0

    def a1111(self) -> dict[str, Any]:
        """One entry of A1111's `GET /sdapi/v1/loras`."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def read_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file, JSON-looking values decoded (as A1111 does). Raises ValueError."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if not 2 < n <= MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ValueError(f"{path} has an unreadable safetensors header: {e}") from None
    raw = header.get("__metadata__") if isinstance(header, dict) else None
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        out[key] = value
        if isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(ValueError):
                out[key] = json.loads(value)
    return out


def addnet_hash(path: Path) -> str:
    """sha256 of the tensor data (the file after its header): A1111's LoRA hash; its first 12 hex digits are the
    short hash shown in the infotext ("Lora hashes")."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _walk(root: Path) -> Iterator[Path]:
    """Files under root, sorted, following symlinked folders once (no loops), skipping hidden entries. Symlinks that
    lead out of root (folders or files) are not followed: a LoRA name can only ever open a file inside it."""
    top = os.path.realpath(root)
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not Path(real).is_relative_to(top):
            if real not in seen:
                log.warning("not following %s: a symlink out of the Lora folder", dirpath)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                path = Path(dirpath) / name
                if Path(os.path.realpath(path)).is_relative_to(top):
                    yield path
                else:
                    log.warning("not following %s: a symlink out of the Lora folder", path)


class LoraRegistry:
    """The LoRA files of one directory. Thread-safe: the HTTP side lists/refreshes while the worker resolves."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._lock = threading.Lock()
        self._by_path: dict[Path, LoraInfo] = {}
        self._by_name: dict[str, LoraInfo] = {}
        self._by_alias: dict[str, LoraInfo] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._scanned = False

    def scan(self) -> list[LoraInfo]:
        """Re-read the directory (A1111's refresh-loras). Metadata of unchanged files is reused."""
        found: dict[Path, LoraInfo] = {}
        if self.root is not None and self.root.is_dir():
            for path in _walk(self.root):
                try:
                    st = path.stat()
                except OSError:
                    continue
                old = self._by_path.get(path)
                if old is not None and (old.mtime_ns, old.size) == (st.st_mtime_ns, st.st_size):
                    found[path] = old
                    continue
                try:
                    metadata = read_metadata(path)
                except (OSError, ValueError) as e:
                    log.warning("skipping LoRA file %s: %s", path, e)
                    continue
                alias = metadata.get("ss_output_name")
                found[path] = LoraInfo(
                    name=path.stem,
                    alias=alias if isinstance(alias, str) and alias else path.stem,
                    path=path,
                    metadata=metadata,
                    mtime_ns=st.st_mtime_ns,
                    size=st.st_size,
                )
        by_name: dict[str, LoraInfo] = {}
        by_alias: dict[str, LoraInfo] = {}
        for info in found.values():
            if info.name in by_name:
                shadowed = by_name[info.name].path
                log.warning("LoRA name '%s' is used twice: %s wins over %s", info.name, info.path, shadowed)
            by_name[info.name] = info
            by_alias.setdefault(info.alias, info)
        with self._lock:
            self._by_path, self._by_name, self._by_alias, self._scanned = found, by_name, by_alias, True
        return list(found.values())

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self.scan()

    def infos(self) -> list[LoraInfo]:
        self._ensure_scanned()
        with self._lock:
            return list(self._by_path.values())

    def list(self) -> list[dict[str, Any]]:
        """A1111's `GET /sdapi/v1/loras` body: `[{name, alias, path, metadata}]`."""
        return [info.a1111() for info in self.infos()]

    def get(self, name: str, *, rescan: bool = True) -> LoraInfo | None:
        """By name (file stem), then by alias. An unknown name triggers one rescan, so a file dropped into the
        directory works without a refresh call."""
        self._ensure_scanned()
        with self._lock:
            info = self._by_name.get(name) or self._by_alias.get(name)
        if info is None and rescan:
            self.scan()
            return self.get(name, rescan=False)
        return info

    def shorthash(self, name: str) -> str | None:
        """A1111's short LoRA hash (12 hex digits), computed once per file version."""
        info = self.get(name, rescan=False)
        if info is None:
            return None
        key = (info.path, info.mtime_ns, info.size)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            cached = addnet_hash(info.path)[:12]
            with self._lock:
                self._hashes[key] = cached
        return cached


_REGISTRIES: dict[str, LoraRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()


def registry_for(root: str | Path) -> LoraRegistry:
    """The shared registry of a directory: the engine's managers and the HTTP listing see the same scan."""
    key = os.path.realpath(root)
    with _REGISTRIES_LOCK:
        if key not in _REGISTRIES:
            _REGISTRIES[key] = LoraRegistry(root)
        return _REGISTRIES[key]


class _NoMissingPartNotice(logging.Filter):
    """diffusers warns on every load of a LoRA that has no weights for some component ("No LoRA keys associated to
    CLIPTextModel ..."): normal for UNet-only LoRAs, noise in a server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No LoRA keys associated to")


def _quiet_diffusers_lora_logs() -> None:
    for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoMissingPartNotice) for f in logger.filters):
            logger.addFilter(_NoMissingPartNotice())


def _adapter_name(info: LoraInfo) -> str:
    """A PEFT adapter name: module-dict keys may not contain dots, and two files may share a stem."""
    digest = hashlib.sha1(str(info.path).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', info.name)[:48]}_{digest}"


class LoraManager:
    """The LoRA adapters of one pipeline (and of the task pipelines derived from it, which share its modules).

    Used by one worker thread at a time (the engine runs one call per device at a time).
    """

    def __init__(self, pipe: DiffusionPipeline, registry: LoraRegistry, max_loaded: int = DEFAULT_MAX_LOADED):
        self.pipe = pipe
        self.registry = registry
        self.max_loaded = max(1, max_loaded)
        # (path, mtime, size) -> adapter name, least recently used first. A changed file is a new key.
        self._loaded: collections.OrderedDict[tuple[Path, int, int], str] = collections.OrderedDict()
        self._enabled = False
        self.loads = 0  # adapters loaded from disk so far (tests and metrics: cache hits do not count)
        _quiet_diffusers_lora_logs()

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded.values())

    @contextlib.contextmanager
    def applied(self, refs: Sequence[LoraRef]) -> Iterator[None]:
        """Exactly `refs` active inside the block, no LoRA after it (also when activation or the call fails)."""
        try:
            self.activate(refs)
            yield
        finally:
            self.deactivate()

    def activate(self, refs: Sequence[LoraRef]) -> None:
        import torch  # lazily: the module stays importable without torch

        if not refs:
            self.deactivate()
            return
        resolved: dict[Path, tuple[LoraInfo, LoraRef]] = {}
        for ref in refs:
            info = self.registry.get(ref.name)
            if info is None:
                raise LoraNotFound(ref.name)
            if info.path in resolved:  # the same file by name and by alias: the weights add up
                first = resolved[info.path][1]
                ref = merge_loras([first, dataclasses.replace(ref, name=first.name)])[0]
            resolved[info.path] = (info, ref)
        infos = [info for info, _ in resolved.values()]
        # Parameters made under the engine's inference_mode would be inference tensors that PEFT cannot touch
        # later (delete_adapters, set_adapter); adapters are created and switched with autograd merely disabled.
        with torch.inference_mode(False), torch.no_grad():
            names = [self._ensure_loaded(info, keep=infos) for info in infos]
            present = self.pipe.get_list_adapters()  # component -> adapter names
            weights = [self._weights(n, ref, present) for n, (_, ref) in zip(names, resolved.values(), strict=True)]
            self._enabled = True  # before enabling: a failure below still gets disabled by deactivate()
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=weights)

    def deactivate(self) -> None:
        if self._enabled:
            self.pipe.disable_lora()
            self._enabled = False

    def clear(self) -> None:
        """Delete every adapter (e.g. before the model is dropped or when the Lora directory changes)."""
        import torch

        with torch.inference_mode(False), torch.no_grad():
            if self._loaded:
                self._delete(list(self._loaded.values()))
        self._loaded.clear()
        self._enabled = False

    @staticmethod
    def _weights(name: str, ref: LoraRef, present: dict[str, list[str]]) -> float | dict[str, float]:
        if ref.te_weight is None or ref.te_weight == ref.weight:
            return float(ref.weight)
        # Separate text-encoder and denoiser multipliers (A1111 `<lora:name:te:unet>`), only for the components
        # this adapter has weights in (diffusers warns about the others).
        return {
            comp: float(ref.te_weight if comp.startswith("text_encoder") else ref.weight)
            for comp, adapters in present.items()
            if name in adapters
        }

    def _ensure_loaded(self, info: LoraInfo, keep: list[LoraInfo]) -> str:
        key = (info.path, info.mtime_ns, info.size)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        keep_paths = {k.path for k in keep}
        while len(self._loaded) >= self.max_loaded:
            victim = next((k for k in self._loaded if k[0] not in keep_paths), None)
            if victim is None:
                break  # every loaded adapter is needed by this call: go over the limit for now
            self._delete([self._loaded.pop(victim)])
        # A file that changed on disk since it was loaded: drop the stale adapter.
        for stale in [k for k in self._loaded if k[0] == info.path]:
            self._delete([self._loaded.pop(stale)])
        self._unfuse_qkv()
        name = _adapter_name(info)
        try:
            with warnings.catch_warnings():
                # PEFT warns that a model gets a second adapter: that is the point here.
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                self.pipe.load_lora_weights(str(info.path), adapter_name=name)
        except Exception as e:
            with contextlib.suppress(Exception):  # remove whatever part of it got attached
                if any(name in a for a in self.pipe.get_list_adapters().values()):
                    self._delete([name])
            raise InvalidRequest("loras", f"LoRA '{info.name}' cannot be applied to this model: {e}") from e
        self._loaded[key] = name
        self.loads += 1
        log.info("loaded LoRA %s (%s) as adapter %s", info.name, info.path, name)
        return name

    def _delete(self, names: list[str]) -> None:
        with warnings.catch_warnings():
            # PEFT warns when the deleted adapter was the last active one; LoRA is disabled between calls anyway.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.pipe.delete_adapters(names)

    def _unfuse_qkv(self) -> None:
        """LoRAs target to_q/to_k/to_v; with fused QKV projections (a load-time optimisation) they would be silently
        skipped, so the unfused attention processors come back before the first LoRA."""
        model = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        processors = getattr(model, "attn_processors", None) or {}
        if any("Fused" in type(p).__name__ for p in processors.values()) and hasattr(model, "unfuse_qkv_projections"):
            log.warning("unfusing QKV projections: LoRAs apply to the separate q/k/v projections")
            model.unfuse_qkv_projections()


def lora_scope(loaded: LoadedModel, items: Sequence[BatchItem]) -> contextlib.AbstractContextManager[None]:
    """Around one pipeline call (text encoding included): the LoRAs of the call's requests active, none after.

    The LoRAs of a request are its `loras` plus the `<lora:...>` tags of its prompt (`prompts.request_loras`); the
    batcher only puts requests with the same set into one call.
    """
    first = items[0].request
    refs = request_loras(first)
    if any(request_loras(it.request) != refs for it in items[1:]):
        raise ValueError("requests with different LoRAs cannot share a pipeline call")
    if first.skip_missing_loras and refs:  # A1111: a missing network is left out, the image is still made
        registry = loaded.loras.registry if loaded.loras is not None else None
        missing = [ref.name for ref in refs if registry is None or registry.get(ref.name) is None]
        if missing:
            log.warning("Lora not found: %s (generating without)", ", ".join(missing))
            refs = tuple(ref for ref in refs if ref.name not in missing)
    if loaded.loras is None:
        if refs:
            raise InvalidRequest("loras", "LoRAs are not available on this server (no Lora directory is configured)")
        return contextlib.nullcontext()
    return loaded.loras.applied(refs)
