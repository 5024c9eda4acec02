"""The A1111 dialect's own state: the current checkpoint and the options dict (A1111's `opts`).

Only this dialect has a "current model"; other dialects name their model per request. State lives on
`app.state.a1111` and is created on first use, so it is per app (tests build many apps).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from pipelines.registry import ModelSpec, Registry
from server.settings import Settings

log = logging.getLogger("easel.a1111")

# Option names that look like credentials are never stored, so GET /options can never hand one out.
# ("token_merging_ratio" is a real A1111 option, so only a trailing "token"/"auth" counts.)
SECRET_NAME = re.compile(
    r"(password|passwd|secret|credential|api_?key|access_?key|private_?key|(^|_)token$|(^|_)auth$)", re.IGNORECASE
)

# Read-only keys derived from the current checkpoint: POSTing them does nothing.
DERIVED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


def default_options(settings: Settings) -> dict[str, Any]:
    """The A1111 options clients read, with values describing what this server actually does."""
    return {
        "samples_format": "png",
        "jpeg_quality": 80,
        "webp_lossless": False,
        "enable_pnginfo": True,
        "add_model_hash_to_info": True,
        "add_model_name_to_info": True,
        "add_version_to_infotext": True,
        "return_grid": True,
        "grid_only_if_multiple": True,
        "n_rows": -1,
        "return_mask": False,
        "return_mask_composite": False,
        "sd_vae": "Automatic",
        "sd_checkpoints_limit": settings.cache_max_models,
        "sd_checkpoint_cache": 0,
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "randn_source": "GPU",
        "eta_ancestral": 1.0,
        "eta_ddim": 0.0,
        "s_churn": 0.0,
        "s_tmin": 0.0,
        "s_noise": 1.0,
        "k_sched_type": "Automatic",
        "sigma_min": 0.0,
        "sigma_max": 0.0,
        "rho": 0.0,
        "img2img_background_color": "#ffffff",
        "inpainting_mask_weight": 1.0,
        "initial_noise_multiplier": 1.0,
        "face_restoration": False,
        "face_restoration_model": None,
        "tiling": False,
        # Live previews (pipelines.previews, A1111's "Approx cheap"): /progress shows one every N steps while a job
        # runs; 0 or A1111's -1 ("after each batch") make none.
        "show_progress_every_n_steps": 10,
        "live_previews_enable": True,
        "api_enable_requests": False,
        "api_forbid_local_requests": True,
    }


@dataclass
class A1111State:
    registry: Registry
    current_model_id: str
    options: dict[str, Any] = field(default_factory=dict)
    interrupted_job_id: str | None = None
    skipped_job_id: str | None = None

    @property
    def current_model(self) -> ModelSpec:
        return self.registry.get(self.current_model_id)

    def options_view(self) -> dict[str, Any]:
        """GET /options: stored options plus the checkpoint keys, which always describe the current model."""
        spec = self.current_model
        return {**self.options, "sd_model_checkpoint": spec.title, "sd_checkpoint_hash": spec.sha256}

    def store_options(self, values: dict[str, Any]) -> None:
        """Keep any option a client sets (A1111 clients set many we do not use), except secrets and derived keys."""
        for key, value in values.items():
            if key in DERIVED_OPTIONS:
                continue
            if SECRET_NAME.search(key):
                log.warning("POST /options: option '%s' looks like a credential and was not stored", key)
                continue
            self.options[key] = value


def create_state(registry: Registry, settings: Settings) -> A1111State:
    return A1111State(registry=registry, current_model_id=registry.default_model, options=default_options(settings))


def get_state(request: Request) -> A1111State:
    """FastAPI dependency: the dialect state of this app, created on first use."""
    app_state = request.app.state
    state = getattr(app_state, "a1111", None)
    if state is None:
        state = create_state(app_state.registry, app_state.settings)
        app_state.a1111 = state
    return state
