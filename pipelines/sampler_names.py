"""A1111 v1.10 sampler and schedule names, and how a request's names resolve. Plain data, no torch/diffusers import.

The one source of truth for both sides: the HTTP side lists the tables (`/sdapi/v1/samplers`, `/schedulers`) and the
GPU side (`pipelines/samplers.py`) maps a resolved `SamplerChoice` to a diffusers scheduler.

- `SAMPLERS` / `SCHEDULERS` are exactly what A1111 reports, in its order; the first sampler is A1111's fallback for
  unknown names (`sd_samplers.get_sampler_and_scheduler`).
- `resolve_sampler` turns what a client sent (`sampler_name`/`sampler_index`/`scheduler`, legacy names such as
  "DPM++ 2M Karras" included) into a `SamplerChoice`, following A1111 v1.10 `sd_samplers.get_sampler_and_scheduler`.
- `scheduler_label_for_info` is the "Schedule type" the engine reports for a choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AUTOMATIC = "automatic"

# --------------------------------------------------------------------------------------------------------------------
# The A1111 v1.10 tables, exactly as GET /sdapi/v1/samplers and /sdapi/v1/schedulers report them.
# Order: sd_samplers_kdiffusion.samplers_k_diffusion, sd_samplers_timesteps.samplers_timesteps, sd_samplers_lcm.
# --------------------------------------------------------------------------------------------------------------------

SAMPLERS: list[dict[str, Any]] = [
    {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}},
    {
        "name": "DPM++ SDE",
        "aliases": ["k_dpmpp_sde"],
        "options": {"scheduler": "karras", "second_order": True, "brownian_noise": True},
    },
    {
        "name": "DPM++ 2M SDE",
        "aliases": ["k_dpmpp_2m_sde"],
        "options": {"scheduler": "exponential", "brownian_noise": True},
    },
    {
        "name": "DPM++ 2M SDE Heun",
        "aliases": ["k_dpmpp_2m_sde_heun"],
        "options": {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
    },
    {
        "name": "DPM++ 2S a",
        "aliases": ["k_dpmpp_2s_a"],
        "options": {"scheduler": "karras", "uses_ensd": True, "second_order": True},
    },
    {
        "name": "DPM++ 3M SDE",
        "aliases": ["k_dpmpp_3m_sde"],
        "options": {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    },
    {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {"uses_ensd": True}},
    {"name": "Euler", "aliases": ["k_euler"], "options": {}},
    {"name": "LMS", "aliases": ["k_lms"], "options": {}},
    {"name": "Heun", "aliases": ["k_heun"], "options": {"second_order": True}},
    {
        "name": "DPM2",
        "aliases": ["k_dpm_2"],
        "options": {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True},
    },
    {
        "name": "DPM2 a",
        "aliases": ["k_dpm_2_a"],
        "options": {
            "scheduler": "karras",
            "discard_next_to_last_sigma": True,
            "uses_ensd": True,
            "second_order": True,
        },
    },
    {"name": "DPM fast", "aliases": ["k_dpm_fast"], "options": {"uses_ensd": True}},
    {"name": "DPM adaptive", "aliases": ["k_dpm_ad"], "options": {"uses_ensd": True}},
    {"name": "Restart", "aliases": ["restart"], "options": {"scheduler": "karras", "second_order": True}},
    {"name": "DDIM", "aliases": ["ddim"], "options": {}},
    {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}},
    {"name": "PLMS", "aliases": ["plms"], "options": {}},
    {"name": "UniPC", "aliases": ["unipc"], "options": {}},
    {"name": "LCM", "aliases": ["k_lcm"], "options": {}},
]

# sd_schedulers.schedulers (A1111 reports `aliases: null` where none are set).
SCHEDULERS: list[dict[str, Any]] = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    {"name": "exponential", "label": "Exponential", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {
        "name": "polyexponential",
        "label": "Polyexponential",
        "aliases": None,
        "default_rho": 1.0,
        "need_inner_model": False,
    },
    {
        "name": "sgm_uniform",
        "label": "SGM Uniform",
        "aliases": ["SGMUniform"],
        "default_rho": -1,
        "need_inner_model": True,
    },
    {"name": "kl_optimal", "label": "KL Optimal", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {
        "name": "align_your_steps",
        "label": "Align Your Steps",
        "aliases": None,
        "default_rho": -1,
        "need_inner_model": False,
    },
    {"name": "simple", "label": "Simple", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "normal", "label": "Normal", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "ddim", "label": "DDIM", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "beta", "label": "Beta", "aliases": None, "default_rho": -1, "need_inner_model": True},
]

DEFAULT_SAMPLER = SAMPLERS[0]["name"]  # A1111 falls back to samplers[0] for unknown names

_SAMPLER_BY_NAME: dict[str, dict[str, Any]] = {s["name"]: s for s in SAMPLERS}
_SCHEDULER_BY_NAME: dict[str, dict[str, Any]] = {s["name"]: s for s in SCHEDULERS}


def sampler_names() -> list[str]:
    return [s["name"] for s in SAMPLERS]


def scheduler_label(schedule: str) -> str:
    """Label of a schedule name ("karras" -> "Karras"); unknown names -> "Automatic"."""
    return _SCHEDULER_BY_NAME.get(schedule, _SCHEDULER_BY_NAME[AUTOMATIC])["label"]


# --------------------------------------------------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerChoice:
    """What a request resolved to.

    `schedule` is the schedule name that runs: the sampler's default when the request said Automatic (so
    "DPM++ 2M" -> "karras"), or "automatic" for samplers without a default (the model's own discretization).
    `schedule_label` is what A1111 echoes for the request: "Automatic" when none was given or it equals the
    sampler's default, else the label ("Exponential").
    """

    name: str
    schedule: str
    schedule_label: str


def _find_sampler(name: str) -> dict[str, Any] | None:
    """Exact name first (A1111), then aliases and a case-insensitive name match (A1111 is stricter than needed)."""
    if name in _SAMPLER_BY_NAME:
        return _SAMPLER_BY_NAME[name]
    folded = name.casefold()
    for s in SAMPLERS:
        if folded == s["name"].casefold() or folded in (a.casefold() for a in s["aliases"]):
            return s
    return None


def _find_scheduler(name: str | None) -> dict[str, Any] | None:
    """By name, label or alias, case-insensitively ("karras", "Karras", "SGMUniform", webuiapi's "automatic")."""
    if not name:
        return None
    folded = name.strip().casefold()
    for s in SCHEDULERS:
        if folded in (o.casefold() for o in _scheduler_name_options(s)):
            return s
    return None


def _scheduler_name_options(s: Mapping[str, Any]) -> list[str]:
    return [s["label"], s["name"], *(s["aliases"] or [])]


def _strip_schedule_suffix(name: str) -> tuple[str, dict[str, Any] | None]:
    """Legacy names: "DPM++ 2M Karras" -> ("DPM++ 2M", karras). A1111's loop, but the suffix match ignores case."""
    found = None
    for s in SCHEDULERS:
        for option in _scheduler_name_options(s):
            suffix = " " + option
            if name.casefold().endswith(suffix.casefold()):
                found = s
                name = name[: -len(suffix)]
                break
    return name, found


def resolve_sampler(
    sampler_name: str | None, sampler_index: str | None = "Euler", scheduler: str | None = None
) -> SamplerChoice:
    """A1111 `get_sampler_and_scheduler(sampler_name or sampler_index, scheduler)`, slightly more forgiving.

    Unknown samplers fall back to "DPM++ 2M" silently and unknown schedules to Automatic, as A1111 does.
    """
    name = (sampler_name or sampler_index or DEFAULT_SAMPLER).strip()
    found = _find_scheduler(scheduler) or _SCHEDULER_BY_NAME[AUTOMATIC]
    if _find_sampler(name) is None:  # a real sampler name is never cut (none ends in a schedule today anyway)
        name, from_suffix = _strip_schedule_suffix(name)
        found = from_suffix or found
    sampler = _find_sampler(name.strip()) or _SAMPLER_BY_NAME[DEFAULT_SAMPLER]
    default = sampler["options"].get("scheduler")
    if found["name"] == default:
        found = _SCHEDULER_BY_NAME[AUTOMATIC]
    effective = default if found["name"] == AUTOMATIC and default else found["name"]
    return SamplerChoice(name=sampler["name"], schedule=effective, schedule_label=found["label"])


def flow_schedule(choice: SamplerChoice) -> str:
    """The schedule a flow-matching model runs. Flow models run one solver, so a sampler's *default* schedule
    (DPM++ 2M -> Karras) means nothing there; only a schedule the request named explicitly is applied."""
    return AUTOMATIC if choice.schedule_label == "Automatic" else choice.schedule


def scheduler_label_for_info(choice: SamplerChoice, flow_matching: bool = False) -> str:
    """The infotext "Schedule type" A1111 writes: the schedule that ran ("DPM++ 2M" + Automatic -> "Karras").

    On flow-matching models a sampler's default schedule is not applied (see `flow_schedule`), so it is not shown.
    """
    return scheduler_label(flow_schedule(choice) if flow_matching else choice.schedule)
