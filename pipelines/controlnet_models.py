"""The ControlNet models this server can run, named as the sd-webui-controlnet extension lists them (torch-free).

Models come from the `ControlNet` folder of the A1111 models directory: `.safetensors` single files (the original
layouts people download; their config comes from the local config folders of `easel prefetch-configs`) and
diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors`). The demo models get a tiny random-weight
ControlNet each (`demo:sd15`, `demo:sdxl`, `demo:flux`, `demo:qwen-image`), built with them on first use
(pipelines.demo).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEMO_CONTROLNET_FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")
DEMO_IP_ADAPTER_FAMILIES = ("sd15", "sdxl")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ControlNetEntry:
    """One listed model: `title` is what clients send and see ("name [hash]"), `source` where its weights are."""

    name: str
    title: str
    source: str


def a1111_model_hash(path: Path) -> str:
    """A1111's `sd_models.model_hash` (what the extension puts in brackets): sha256 of the 64 KiB at offset 1 MiB."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            fh.seek(0x100000)
            digest.update(fh.read(0x10000))
    except FileNotFoundError:
        return "NOFILE"
    return digest.hexdigest()[:8]


def demo_entry(family: str) -> ControlNetEntry:
    name = f"control_demo-{family}"
    return ControlNetEntry(name, f"{name} [{hashlib.sha256(name.encode()).hexdigest()[:8]}]", f"demo:{family}")


def demo_ip_adapter_entry(family: str) -> ControlNetEntry:
    """The demo model's tiny IP-Adapter (pipelines.ip_adapter), listed with the ControlNets as the extension does."""
    name = f"ip-adapter_demo-{family}"
    return ControlNetEntry(name, f"{name} [{hashlib.sha256(name.encode()).hexdigest()[:8]}]", f"demo-ip:{family}")


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / WEIGHTS_FILE).is_file()


def scan(folder: Path | None, demo_families: tuple[str, ...] = ()) -> list[ControlNetEntry]:
    """Every model, sorted by name as the extension sorts them by default; demo ones first."""
    entries = [demo_entry(f) for f in DEMO_CONTROLNET_FAMILIES if f in demo_families]
    entries += [demo_ip_adapter_entry(f) for f in DEMO_IP_ADAPTER_FAMILIES if f in demo_families]
    if folder is None or not folder.is_dir():
        return entries
    found: list[ControlNetEntry] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        for d in list(dirs):
            if _is_diffusers_folder(here / d):  # a diffusers folder is one model: don't descend into it
                dirs.remove(d)
                found.append(ControlNetEntry(d, f"{d} [{a1111_model_hash(here / d / WEIGHTS_FILE)}]", str(here / d)))
        for f in files:
            path = here / f
            if path.suffix.lower() == ".safetensors" and path.stem != "None":
                found.append(ControlNetEntry(path.stem, f"{path.stem} [{a1111_model_hash(path)}]", str(path)))
    return entries + sorted(found, key=lambda e: e.name)


def resolve(entries: list[ControlNetEntry], name: str) -> ControlNetEntry | None:
    """The extension's `find_closest_lora_model_name`: the exact title, else the name without hash (any case),
    else the shortest name containing it."""
    if not name:
        return None
    for e in entries:
        if e.title == name:
            return e
    wanted = name.lower()
    bare = wanted.split(" [", 1)[0] if wanted.endswith("]") else wanted
    for e in entries:
        if e.name.lower() in (wanted, bare):
            return e
    matches = sorted((e for e in entries if bare in e.name.lower()), key=lambda e: len(e.name))
    return matches[0] if matches else None
