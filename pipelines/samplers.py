"""A1111 sampler and schedule names -> diffusers schedulers.

The names themselves (tables, `resolve_sampler`, `SamplerChoice`, labels) live in the torch-free
`pipelines.sampler_names` and are re-exported here. This module is the diffusers side:

- `build_scheduler` makes a fresh diffusers scheduler for a resolved `SamplerChoice` from the model's own scheduler
  config (`Cls.from_config(config, **kwargs)`), so betas / prediction_type stay the model's. `plan_scheduler` is the
  pure part of it (class name, kwargs, notes on what had to be approximated).

A1111 and diffusers differ in places no kwarg can fix (k-diffusion's "discard penultimate sigma", DPM adaptive's
step-size control, Restart's restarts, CFG++). Those map to the nearest diffusers scheduler; `plan_scheduler(...).notes`
says which, and `build_scheduler` logs it once per (sampler, schedule).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.sampler_names import (
    AUTOMATIC,
    SAMPLERS,
    SCHEDULERS,
    SamplerChoice,
    flow_schedule,
    resolve_sampler,
    scheduler_label,
    scheduler_label_for_info,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "SamplerChoice",
    "SchedulerPlan",
    "align_your_steps_sigmas",
    "build_scheduler",
    "kl_optimal_sigmas",
    "plan_scheduler",
    "resolve_sampler",
    "scheduler_label",
    "scheduler_label_for_info",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# diffusers mapping
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Impl:
    cls: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
# Singlestep defaults to lower_order_final=False, which diffusers flips back (with a warning) for a zero final sigma.
_SINGLESTEP = {"lower_order_final": True}
_DPM_SOLVER_FAST = _Impl(
    "DPMSolverSinglestepScheduler",
    {"algorithm_type": "dpmsolver++", "solver_order": 3, "solver_type": "midpoint", **_SINGLESTEP},
    "approximated by singlestep DPM-Solver++ order 3 (fixed steps)",
)
# A1111's DDIM/PLMS/UniPC are "timesteps" samplers with their own leading discretization; LCM has its own too.
_KEEPS_MODEL_SPACING = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"})

# Candidates in order of preference; the first whose class is importable wins (LMS needs scipy).
_DISCRETE: dict[str, tuple[_Impl, ...]] = {
    "DPM++ 2M": (_Impl("DPMSolverMultistepScheduler", _DPMPP_2M),),
    # k-diffusion DPM++ SDE is a 2-stage singlestep SDE solver; diffusers' faithful port (DPMSolverSDEScheduler)
    # needs torchsde and seeds its Brownian tree outside the pipeline generator, so seeds would not reproduce.
    "DPM++ SDE": (
        _Impl(
            "DPMSolverSinglestepScheduler",
            {**_DPMPP_2M_SDE, **_SINGLESTEP},
            "approximated by singlestep SDE-DPM-Solver++ order 2 (k-diffusion's Brownian-tree noise not reproduced)",
        ),
    ),
    "DPM++ 2M SDE": (_Impl("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),),
    "DPM++ 2M SDE Heun": (_Impl("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, "solver_type": "heun"}),),
    "DPM++ 2S a": (
        _Impl(
            "DPMSolverSinglestepScheduler",
            {**_DPMPP_2M, **_SINGLESTEP},
            "approximated by singlestep DPM-Solver++ order 2 (no ancestral noise)",
        ),
    ),
    "DPM++ 3M SDE": (
        _Impl(
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "midpoint"},
            "penultimate sigma is not discarded",
        ),
    ),
    "Euler a": (_Impl("EulerAncestralDiscreteScheduler"),),
    "Euler": (_Impl("EulerDiscreteScheduler"),),
    "LMS": (
        _Impl("LMSDiscreteScheduler"),
        _Impl("DPMSolverMultistepScheduler", _DPMPP_2M, "LMSDiscreteScheduler needs scipy; ran DPM++ 2M instead"),
    ),
    "Heun": (_Impl("HeunDiscreteScheduler"),),
    "DPM2": (_Impl("KDPM2DiscreteScheduler", {}, "penultimate sigma is not discarded"),),
    "DPM2 a": (_Impl("KDPM2AncestralDiscreteScheduler", {}, "penultimate sigma is not discarded"),),
    "DPM fast": (_DPM_SOLVER_FAST,),
    "DPM adaptive": (_DPM_SOLVER_FAST,),
    "Restart": (_Impl("HeunDiscreteScheduler", {}, "approximated by Heun (no restart segments)"),),
    # Latent models never clip; A1111's DDIM uses alphas_cumprod[0] for the last step (set_alpha_to_one=False).
    "DDIM": (_Impl("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),),
    "DDIM CFG++": (
        _Impl("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, "approximated by DDIM (no CFG++)"),
    ),
    "PLMS": (_Impl("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),),
    # A1111 defaults to order 3, variant bh1; diffusers' bh1 turns NaN on the last step when the final sigma is 0.
    "UniPC": (
        _Impl("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "variant bh2 instead of bh1"),
    ),
    "LCM": (_Impl("LCMScheduler", {"clip_sample": False}),),
}

_FLAG_OF = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "polyexponential": "use_exponential_sigmas",  # k-diffusion polyexponential with its default rho 1 is exponential
    "beta": "use_beta_sigmas",
}
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
_CUSTOM_SIGMA_SCHEDULES = frozenset({"align_your_steps", "kl_optimal"})
# Classes whose set_timesteps takes custom `sigmas` (exact) or integer `timesteps` for the custom schedules above.
_TAKES_SIGMAS = frozenset({"EulerDiscreteScheduler"})
_TAKES_TIMESTEPS = frozenset({"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "HeunDiscreteScheduler"})


@dataclass(frozen=True)
class SchedulerPlan:
    """What `build_scheduler` will instantiate: `cls.from_config(config, **kwargs)`, plus an optional custom sigma
    schedule ("align_your_steps" / "kl_optimal") installed on the instance's `set_timesteps`."""

    cls: str
    kwargs: dict[str, Any]
    custom_sigmas: str | None = None
    notes: tuple[str, ...] = ()


@functools.cache
def _scheduler_class(name: str) -> type | None:
    """The diffusers class, or None when its optional backend (scipy, torchsde) is missing."""
    import diffusers
    from diffusers.utils import DummyObject

    cls = getattr(diffusers, name, None)
    if cls is None or isinstance(cls, DummyObject):
        return None
    return cls


@functools.cache
def _init_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


@functools.cache
def _scipy_available() -> bool:
    from diffusers.utils import is_scipy_available

    return bool(is_scipy_available())


def _pick_impl(sampler: str) -> tuple[_Impl, type]:
    for impl in _DISCRETE[sampler]:
        cls = _scheduler_class(impl.cls)
        if cls is not None:
            return impl, cls
    raise RuntimeError(f"no diffusers scheduler available for sampler {sampler!r}")


def _spacing_kwargs(schedule: str, sampler: str, base_config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Discrete-time schedule -> (spacing kwargs, the sigma flag to switch on)."""
    if schedule == AUTOMATIC:
        # A1111's "model discretization" for k-diffusion samplers is uniform in t (linspace from 999). Timestep
        # samplers keep the model's spacing, and so does a config that asks for "trailing": distilled models
        # (Lightning, Turbo, Hyper) ship that on purpose.
        if sampler in _KEEPS_MODEL_SPACING or base_config.get("timestep_spacing") == "trailing":
            return {}, None
        return {"timestep_spacing": "linspace"}, None
    if schedule == "karras":
        return {}, _FLAG_OF[schedule]  # Karras sigmas span the whole trained range whatever the spacing
    if schedule in _FLAG_OF:
        return {"timestep_spacing": "linspace"}, _FLAG_OF[schedule]
    if schedule in ("uniform", "normal"):
        return {"timestep_spacing": "linspace"}, None
    if schedule in ("sgm_uniform", "simple"):
        return {"timestep_spacing": "trailing"}, None
    if schedule == "ddim":
        return {"timestep_spacing": "leading", "steps_offset": 1}, None
    return {}, None  # custom sigma schedules: flags off, set_timesteps is replaced


def _flag_kwargs(flag: str | None, accepted: frozenset[str]) -> dict[str, Any]:
    """Every sigma flag the class knows, set explicitly: a base config with use_karras_sigmas=True must not leak
    into another schedule (and diffusers refuses two flags at once)."""
    return {f: f == flag for f in _SIGMA_FLAGS if f in accepted}


def plan_scheduler(choice: SamplerChoice, base_config: Mapping[str, Any], flow_matching: bool) -> SchedulerPlan:
    """Pure mapping from a resolved choice to a diffusers class + kwargs; never touches `base_config`."""
    if flow_matching:
        return _plan_flow(choice)
    impl, cls = _pick_impl(choice.name)
    accepted = _init_params(cls)
    notes = [impl.note] if impl.note else []
    schedule, note = _runnable_schedule(choice.schedule, cls.__name__, accepted)
    notes += note
    spacing, flag = _spacing_kwargs(schedule, choice.name, base_config)
    if "timestep_spacing" in spacing and "timestep_spacing" not in accepted and schedule != AUTOMATIC:
        notes.append(f"{cls.__name__} has no timestep_spacing; {scheduler_label(schedule)} ran as its default")
    kwargs = {**impl.kwargs, **spacing, **_flag_kwargs(flag, accepted)}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    custom = schedule if schedule in _CUSTOM_SIGMA_SCHEDULES else None
    return SchedulerPlan(cls=cls.__name__, kwargs=kwargs, custom_sigmas=custom, notes=tuple(notes))


def _runnable_schedule(schedule: str, cls_name: str, accepted: frozenset[str]) -> tuple[str, list[str]]:
    """Swap a schedule this class (or this install) cannot run for the nearest one it can, and say so."""
    reason = None
    if schedule == "beta" and not _scipy_available():
        reason = "needs scipy"
    elif schedule in _CUSTOM_SIGMA_SCHEDULES and cls_name not in _TAKES_SIGMAS | _TAKES_TIMESTEPS:
        reason = f"cannot be given to {cls_name}"
    elif schedule in _FLAG_OF and _FLAG_OF[schedule] not in accepted:
        reason = f"is not supported by {cls_name}"
    if reason is None:
        return schedule, []
    if schedule != "karras" and "use_karras_sigmas" in accepted:
        return "karras", [f"{scheduler_label(schedule)} {reason}; ran Karras"]
    return AUTOMATIC, [f"{scheduler_label(schedule)} {reason}; ran the sampler's default spacing"]


def _plan_flow(choice: SamplerChoice) -> SchedulerPlan:
    """FLUX / Qwen-Image: one solver exists (flow-matching Euler); only the sigma spacing can follow the request."""
    cls = _scheduler_class("FlowMatchEulerDiscreteScheduler")
    assert cls is not None
    accepted = _init_params(cls)
    schedule = flow_schedule(choice)
    notes = [] if choice.name == "Euler" else [f"{choice.name} ran as flow-matching Euler"]
    flag = _FLAG_OF.get(schedule)
    if flag and (flag not in accepted or (flag == "use_beta_sigmas" and not _scipy_available())):
        notes.append(f"{scheduler_label(schedule)} is not available here; ran the model's default sigmas")
        flag = None
    elif not flag and schedule not in (AUTOMATIC, "uniform", "simple", "normal", "sgm_uniform"):
        notes.append(f"{scheduler_label(schedule)} has no flow-matching equivalent; ran the model's default sigmas")
    kwargs = {f: f == flag for f in _SIGMA_FLAGS if f in accepted}
    return SchedulerPlan(cls=cls.__name__, kwargs=kwargs, notes=tuple(notes))


def build_scheduler(
    choice: SamplerChoice, base_config: Mapping[str, Any], flow_matching: bool, *, sdxl: bool = False
) -> Any:
    """A new scheduler for `choice`, built from the model's scheduler config (`pipe.scheduler.config`).

    `sdxl` only selects the SDXL table for Align Your Steps. Nothing shared is mutated: `from_config` copies the
    config, and the Align Your Steps / KL Optimal hook is bound to the new instance only.
    """
    plan = plan_scheduler(choice, base_config, flow_matching)
    if plan.notes:
        _log_notes(choice, plan.notes)
    cls = _scheduler_class(plan.cls)
    assert cls is not None
    # Only what this class takes: diffusers warns about foreign keys (a PNDM config's skip_prk_steps for LCM).
    accepted = _init_params(cls)
    config = {k: v for k, v in base_config.items() if k in accepted or k.startswith("_")}
    scheduler = cls.from_config(config, **plan.kwargs)
    if plan.custom_sigmas:
        _install_custom_sigmas(scheduler, plan.custom_sigmas, sdxl)
    return scheduler


@functools.cache
def _log_notes(choice: SamplerChoice, notes: tuple[str, ...]) -> None:
    log.info("sampler %s / %s: %s", choice.name, scheduler_label(choice.schedule), "; ".join(notes))


# --------------------------------------------------------------------------------------------------------------------
# Custom sigma schedules (A1111 sd_schedulers.py), applied through set_timesteps(sigmas=|timesteps=)
# --------------------------------------------------------------------------------------------------------------------

_AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
_AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def align_your_steps_sigmas(n: int, sdxl: bool = False) -> np.ndarray:
    """n sigmas (no trailing zero): NVIDIA's 10-step table, log-linearly interpolated as A1111 does."""
    table = np.asarray(_AYS_SDXL if sdxl else _AYS_SD15, dtype=np.float64)
    if n == len(table):
        return table
    xs = np.linspace(0, 1, len(table))
    ys = np.log(table[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas (no trailing zero) of A1111's kl_optimal: tan of a linear ramp from atan(max) to atan(min)."""
    a_min, a_max = np.arctan(sigma_min), np.arctan(sigma_max)
    steps = np.arange(n + 1) / n
    return np.tan(steps * a_min + (1.0 - steps) * a_max)[:n]


def _train_sigmas(scheduler: Any) -> np.ndarray:
    ac = np.asarray(scheduler.alphas_cumprod, dtype=np.float64)
    return np.sqrt((1 - ac) / ac)


def _sigmas_to_timesteps(sigmas: np.ndarray, train_sigmas: np.ndarray) -> list[int]:
    """Nearest integer timesteps (log-sigma interpolation), strictly decreasing."""
    t = np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(len(train_sigmas)))
    out: list[int] = []
    for v in np.rint(t).astype(int):
        if not out or v < out[-1]:
            out.append(int(v))
    return out


def _install_custom_sigmas(scheduler: Any, schedule: str, sdxl: bool) -> None:
    """Make `scheduler.set_timesteps(n)` (what every pipeline calls) use the custom schedule.

    Bound with MethodType to this instance only; deepcopy rebinds it to the copy.
    """
    original: Callable[..., Any] = type(scheduler).set_timesteps
    takes_sigmas = type(scheduler).__name__ in _TAKES_SIGMAS

    def set_timesteps(self: Any, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> Any:
        if num_inference_steps is None or kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            return original(self, num_inference_steps, device=device, **kwargs)
        train = _train_sigmas(self)
        if schedule == "align_your_steps":
            sigmas = align_your_steps_sigmas(num_inference_steps, sdxl)
        else:
            sigmas = kl_optimal_sigmas(num_inference_steps, float(train[0]), float(train[-1]))
        if takes_sigmas:
            return original(self, None, device=device, sigmas=[*sigmas.tolist(), 0.0], **kwargs)
        return original(self, None, device=device, timesteps=_sigmas_to_timesteps(sigmas, train), **kwargs)

    scheduler.set_timesteps = types.MethodType(set_timesteps, scheduler)
    scheduler.easel_custom_sigmas = schedule
