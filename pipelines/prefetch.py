"""`easel prefetch-configs DIR`: the small files single-file checkpoints need, fetched once for air-gapped machines.

A `.safetensors` checkpoint holds weights only. To build a pipeline from it, diffusers also needs each component's
config, the tokenizers and the scheduler config of its architecture; SD.Next ships such folders in its repo. This
command downloads exactly those files from the official repos into `DIR/<variant>` (`snapshot_download` with
`allow_patterns`, a few MB per variant), on a machine with internet; the server then reads them from `configs_dir`
and never contacts a hub. Nothing here runs in tests (no network): they check the plan.

FLUX.1 checkpoint files hold only the transformer, so a FLUX model also needs the VAE and text encoders' weights
(~10 GB). `--flux-encoders` downloads them once from FLUX.1-schnell (Apache-2.0, not gated; every FLUX.1 variant uses
the same ones) and links them into the other FLUX folders. FLUX.1-dev, Fill and Kontext are gated repos: accept their
licence on huggingface.co and set HF_TOKEN before running.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.checkpoints import VARIANTS, config_dir_for

# Configs, tokenizers and the scheduler config: everything a pipeline needs besides weights. `*` matches across `/`
# (fnmatch), so `*/config.json` is every component's config. Weight-index files are left out on purpose: an index
# without its shards would make transformers look for weights that are not there.
CONFIG_PATTERNS: tuple[str, ...] = (
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "feature_extractor/preprocessor_config.json",
)
FLUX_ENCODER_SOURCE = "flux-schnell"
FLUX_ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2")
FLUX_ENCODER_PATTERNS: tuple[str, ...] = tuple(
    f"{c}/{p}" for c in FLUX_ENCODER_COMPONENTS for p in ("*.safetensors", "*.safetensors.index.json")
)


# Single-file ControlNets hold weights only: their config.json comes from one diffusers ControlNet per family
# (every ControlNet of a family has the same architecture; pipelines.controlnet reads these folders).
CONTROLNET_CONFIG_REPOS: dict[str, str] = {
    "controlnet-sd15": "lllyasviel/control_v11p_sd15_canny",
    "controlnet-sdxl": "diffusers/controlnet-canny-sdxl-1.0",
}
CONTROLNET_PATTERNS: tuple[str, ...] = ("config.json",)


@dataclass(frozen=True)
class PrefetchItem:
    variant: str
    repo: str
    patterns: tuple[str, ...]
    local_dir: Path


def prefetch_plan(
    dest: str | Path, variants: Iterable[str] | None = None, flux_encoders: bool = False
) -> list[PrefetchItem]:
    """What `prefetch-configs` downloads: one item per variant (all by default), in VARIANTS order, then the
    ControlNet configs (`controlnet-sd15`, `controlnet-sdxl`)."""
    known = [*VARIANTS, *CONTROLNET_CONFIG_REPOS]
    wanted = list(known) if variants is None else list(dict.fromkeys(variants))
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if flux_encoders and FLUX_ENCODER_SOURCE not in wanted:
        wanted.append(FLUX_ENCODER_SOURCE)  # the one place the shared FLUX weights are downloaded to
    plan = []
    for variant in sorted(wanted, key=known.index):
        if variant in CONTROLNET_CONFIG_REPOS:
            repo = CONTROLNET_CONFIG_REPOS[variant]
            plan.append(PrefetchItem(variant, repo, CONTROLNET_PATTERNS, config_dir_for(variant, dest)))
            continue
        patterns = CONFIG_PATTERNS
        if flux_encoders and variant == FLUX_ENCODER_SOURCE:
            patterns += FLUX_ENCODER_PATTERNS
        plan.append(PrefetchItem(variant, VARIANTS[variant].repo, patterns, config_dir_for(variant, dest)))
    return plan


def link_flux_encoders(plan: list[PrefetchItem]) -> list[Path]:
    """Symlink the shared FLUX VAE/text-encoder weights into every other FLUX folder of the plan (relative links)."""
    source = next((i.local_dir for i in plan if i.variant == FLUX_ENCODER_SOURCE), None)
    if source is None:
        return []
    made = []
    for item in plan:
        info = VARIANTS.get(item.variant)  # None: a ControlNet config
        if info is None or info.family != "flux" or item.local_dir == source:
            continue
        for component in FLUX_ENCODER_COMPONENTS:
            for src in sorted((source / component).glob("*.safetensors*")):
                dst = item.local_dir / component / src.name
                if dst.exists() or dst.is_symlink():
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(src, dst.parent), dst)
                made.append(dst)
    return made


def run_prefetch(
    plan: list[PrefetchItem],
    *,
    download: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[tuple[PrefetchItem, str]]:
    """Download each item (configs only, unless the plan adds FLUX encoders); returns the items that failed."""
    if download is None:
        from huggingface_hub import snapshot_download as download  # only this command ever talks to the hub
    failed: list[tuple[PrefetchItem, str]] = []
    for item in plan:
        log(f"{item.variant}: {item.repo} -> {item.local_dir}")
        try:
            download(repo_id=item.repo, allow_patterns=list(item.patterns), local_dir=str(item.local_dir))
        except Exception as e:  # gated repo without a token, network trouble: report it and go on with the rest
            failed.append((item, f"{type(e).__name__}: {e}"))
            log(f"{item.variant}: FAILED ({type(e).__name__}: {e})")
    if any(FLUX_ENCODER_PATTERNS[0] in i.patterns for i in plan):
        for path in link_flux_encoders(plan):
            log(f"linked {path}")
    return failed
