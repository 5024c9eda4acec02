"""A1111 sampler/schedule names (pipelines/sampler_names.py) -> diffusers schedulers (pipelines/samplers.py).

CPU only, no model weights.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from pipelines.sampler_names import (
    SAMPLERS,
    SCHEDULERS,
    SamplerChoice,
    resolve_sampler,
    scheduler_label_for_info,
)
from pipelines.samplers import align_your_steps_sigmas, build_scheduler, plan_scheduler

ROOT = Path(__file__).resolve().parents[2]

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# An SDXL-Lightning-style config: trailing spacing and a karras flag the request must be able to override.
LIGHTNING = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "use_karras_sigmas": True,
}
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _run_steps(scheduler, steps: int = 20) -> torch.Tensor:
    """A full denoising loop with a fake model, to prove the scheduler is usable end to end."""
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    extra = {"generator": torch.Generator().manual_seed(1)}
    if "generator" not in inspect.signature(scheduler.step).parameters:
        extra = {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(0.1 * model_in, t, x, **extra).prev_sample
    return x


# --- tables ----------------------------------------------------------------------------------------------------------


def test_sampler_table_is_a1111_v110():
    names = [s["name"] for s in SAMPLERS]
    assert names[:6] == ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE"]
    assert names[6:] == [
        "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
        "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
    ]  # fmt: skip
    assert all(set(s) == {"name", "aliases", "options"} for s in SAMPLERS)
    by_name = {s["name"]: s for s in SAMPLERS}
    assert by_name["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert by_name["DPM++ 2M SDE"]["options"]["scheduler"] == "exponential"
    assert by_name["Euler"]["options"] == {}


def test_scheduler_table_is_a1111_v110():
    assert [s["name"] for s in SCHEDULERS] == [
        "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "simple", "normal", "ddim", "beta",
    ]  # fmt: skip
    by_name = {s["name"]: s for s in SCHEDULERS}
    assert by_name["karras"] == {
        "name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False,
    }  # fmt: skip
    assert by_name["polyexponential"]["default_rho"] == 1.0
    assert by_name["automatic"]["default_rho"] == -1
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"] and by_name["sgm_uniform"]["label"] == "SGM Uniform"
    inner = {s["name"] for s in SCHEDULERS if s["need_inner_model"]}
    assert inner == {"uniform", "sgm_uniform", "simple", "normal", "ddim", "beta"}


def test_names_are_torch_free_and_shared_with_the_diffusers_side():
    import pipelines.samplers as gpu_side

    code = "import sys, pipelines.sampler_names; print(sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
    # one source of truth: the engine's imports from pipelines.samplers are the very same objects
    assert gpu_side.resolve_sampler is resolve_sampler and gpu_side.SamplerChoice is SamplerChoice
    assert gpu_side.scheduler_label_for_info is scheduler_label_for_info
    assert gpu_side.SAMPLERS is SAMPLERS and gpu_side.SCHEDULERS is SCHEDULERS


# --- name resolution -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "karras", "Automatic")),  # suffix equals the default -> Automatic
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential", "Automatic")),
        ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "karras", "Karras")),
        ("Euler a Karras", ("Euler a", "karras", "Karras")),
        ("DPM++ SDE Karras", ("DPM++ SDE", "karras", "Automatic")),
        ("Euler karras", ("Euler", "karras", "Karras")),  # suffix case-insensitive
        ("Euler SGMUniform", ("Euler", "sgm_uniform", "SGM Uniform")),  # alias suffix
        ("Euler Align Your Steps", ("Euler", "align_your_steps", "Align Your Steps")),
        ("DPM++ 2M", ("DPM++ 2M", "karras", "Automatic")),  # v1.9+: DPM++ 2M + Automatic == old DPM++ 2M Karras
        ("Euler", ("Euler", "automatic", "Automatic")),
        ("k_dpmpp_2m", ("DPM++ 2M", "karras", "Automatic")),  # aliases are accepted (A1111 would not)
        ("k_euler_a", ("Euler a", "automatic", "Automatic")),
        ("euler A", ("Euler a", "automatic", "Automatic")),  # case-insensitive name
        ("no such sampler", ("DPM++ 2M", "karras", "Automatic")),  # unknown -> samplers[0], silently
    ],
)
def test_resolve_names(name, expected):
    assert resolve_sampler(name) == SamplerChoice(*expected)


def test_resolve_uses_sampler_index_and_defaults():
    assert resolve_sampler(None).name == "Euler"  # sampler_index defaults to "Euler" as in the A1111 API model
    assert resolve_sampler("", "Heun").name == "Heun"
    assert resolve_sampler(None, None).name == "DPM++ 2M"
    assert resolve_sampler("DDIM", "Euler").name == "DDIM"  # sampler_name wins


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("Euler", "automatic", ("automatic", "Automatic")),  # webuiapi's default
        ("Euler", "Karras", ("karras", "Karras")),  # by label
        ("Euler", "KARRAS", ("karras", "Karras")),
        ("Euler", "sgm_uniform", ("sgm_uniform", "SGM Uniform")),  # by name
        ("Euler", "SGMUniform", ("sgm_uniform", "SGM Uniform")),  # by alias
        ("Euler", "bogus", ("automatic", "Automatic")),  # unknown -> Automatic
        ("DPM++ 2M", "karras", ("karras", "Automatic")),  # equals the sampler default -> reported Automatic
        ("DPM++ 2M", "Uniform", ("uniform", "Uniform")),
        ("DPM++ 2M Exponential", "Karras", ("exponential", "Exponential")),  # the name's suffix wins
    ],
)
def test_resolve_scheduler_argument(sampler, scheduler, expected):
    choice = resolve_sampler(sampler, scheduler=scheduler)
    assert (choice.schedule, choice.schedule_label) == expected


def test_schedule_label_for_infotext():
    assert scheduler_label_for_info(resolve_sampler("DPM++ 2M")) == "Karras"
    assert scheduler_label_for_info(resolve_sampler("Euler")) == "Automatic"
    assert scheduler_label_for_info(resolve_sampler("Euler", scheduler="beta")) == "Beta"
    # flow models ignore a sampler's default schedule, so they do not claim it either
    assert scheduler_label_for_info(resolve_sampler("DPM++ 2M"), flow_matching=True) == "Automatic"
    assert scheduler_label_for_info(resolve_sampler("Euler Karras"), flow_matching=True) == "Karras"


# --- discrete-time (SD / SDXL) schedulers ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [s["name"] for s in SAMPLERS])
def test_every_sampler_builds_and_runs_on_sd15(name):
    config = copy.deepcopy(SD15)
    scheduler = build_scheduler(resolve_sampler(name), config, flow_matching=False)
    assert config == SD15
    x = _run_steps(scheduler)
    assert torch.isfinite(x).all()
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("schedule", [s["name"] for s in SCHEDULERS])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun", "DDIM"])
def test_every_schedule_builds(sampler, schedule):
    scheduler = build_scheduler(resolve_sampler(sampler, scheduler=schedule), SD15, flow_matching=False)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps
    assert len(t) >= 20 and t[0] > t[-1]


def test_dpmpp_2m_karras_mapping():
    for name in ("DPM++ 2M Karras", "DPM++ 2M"):
        s = build_scheduler(resolve_sampler(name), SD15, flow_matching=False)
        assert isinstance(s, DPMSolverMultistepScheduler)
        assert s.config.use_karras_sigmas and s.config.algorithm_type == "dpmsolver++" and s.config.solver_order == 2
    plain = build_scheduler(resolve_sampler("DPM++ 2M", scheduler="uniform"), SD15, flow_matching=False)
    assert not plain.config.use_karras_sigmas and plain.config.timestep_spacing == "linspace"


def test_sde_and_order_mappings():
    sde = build_scheduler(resolve_sampler("DPM++ 2M SDE"), SD15, flow_matching=False)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_exponential_sigmas
    heun = build_scheduler(resolve_sampler("DPM++ 2M SDE Heun"), SD15, flow_matching=False)
    assert heun.config.solver_type == "heun"
    three = build_scheduler(resolve_sampler("DPM++ 3M SDE"), SD15, flow_matching=False)
    assert three.config.solver_order == 3 and three.config.algorithm_type == "sde-dpmsolver++"
    plms = build_scheduler(resolve_sampler("PLMS"), SD15, flow_matching=False)
    assert isinstance(plms, PNDMScheduler) and plms.config.skip_prk_steps
    euler_a = build_scheduler(resolve_sampler("Euler a"), SD15, flow_matching=False)
    assert type(euler_a).__name__ == "EulerAncestralDiscreteScheduler"
    assert euler_a.config.timestep_spacing == "linspace"  # A1111's uniform discretization, starts at t=999


def test_schedule_kwargs():
    def cfg(sampler, schedule):
        return build_scheduler(resolve_sampler(sampler, scheduler=schedule), SD15, flow_matching=False).config

    assert cfg("Euler", "sgm_uniform").timestep_spacing == "trailing"
    assert cfg("Euler", "simple").timestep_spacing == "trailing"
    assert cfg("Euler", "normal").timestep_spacing == "linspace"
    exp = cfg("Euler", "exponential")
    assert exp.use_exponential_sigmas and not exp.use_karras_sigmas and exp.timestep_spacing == "linspace"
    assert cfg("Euler", "polyexponential").use_exponential_sigmas  # rho 1 polyexponential == exponential
    ddim = cfg("Euler", "ddim")
    assert ddim.timestep_spacing == "leading" and ddim.steps_offset == 1


def test_base_config_is_never_mutated():
    frozen = PNDMScheduler.from_config(SD15).config  # what pipe.scheduler.config really is (a FrozenDict)
    snapshot = dict(frozen)
    for s in SAMPLERS:
        for schedule in ("karras", "align_your_steps", "sgm_uniform"):
            build_scheduler(resolve_sampler(s["name"], scheduler=schedule), frozen, flow_matching=False)
    assert dict(frozen) == snapshot


def test_request_overrides_model_flags_but_keeps_trailing_spacing():
    euler = build_scheduler(resolve_sampler("Euler"), LIGHTNING, flow_matching=False)
    assert isinstance(euler, EulerDiscreteScheduler)
    assert euler.config.timestep_spacing == "trailing" and not euler.config.use_karras_sigmas
    sde = build_scheduler(resolve_sampler("DPM++ 2M SDE"), LIGHTNING, flow_matching=False)
    assert sde.config.use_exponential_sigmas and not sde.config.use_karras_sigmas  # diffusers refuses two flags


def test_align_your_steps_uses_the_a1111_table():
    sigmas = align_your_steps_sigmas(11)  # A1111 uses the 11-entry table as is only for 11 steps
    assert sigmas[0] == pytest.approx(14.615) and sigmas[1] == pytest.approx(6.475)
    assert align_your_steps_sigmas(11, sdxl=True)[1] == pytest.approx(6.315)
    other = align_your_steps_sigmas(25)  # else log-linear interpolation between the same end points
    assert len(other) == 25 and np.all(np.diff(other) < 0) and other[-1] == pytest.approx(0.029)

    euler = build_scheduler(resolve_sampler("Euler", scheduler="align_your_steps"), SD15, flow_matching=False)
    euler.set_timesteps(10)
    assert euler.sigmas[:10].numpy() == pytest.approx(align_your_steps_sigmas(10), rel=1e-4)
    assert float(euler.sigmas[-1]) == 0.0

    dpm = build_scheduler(resolve_sampler("DPM++ 2M", scheduler="Align Your Steps"), SD15, flow_matching=False)
    assert not dpm.config.use_karras_sigmas
    dpm.set_timesteps(20)
    t = dpm.timesteps.tolist()
    assert len(t) == 20 and t[0] == 999 and all(a > b for a, b in zip(t, t[1:], strict=False))
    dpm.set_timesteps(timesteps=[999, 500, 1])  # explicit custom timesteps still pass through
    assert dpm.timesteps.tolist() == [999, 500, 1]

    clone = copy.deepcopy(dpm)  # the hook is bound per instance; a copy drives its own timesteps
    clone.set_timesteps(5)
    assert len(clone.timesteps) == 5 and len(dpm.timesteps) == 3


def test_kl_optimal_is_tan_of_a_linear_ramp():
    euler = build_scheduler(resolve_sampler("Euler", scheduler="kl_optimal"), SD15, flow_matching=False)
    euler.set_timesteps(8)
    angles = np.arctan(euler.sigmas[:-1].numpy().astype(np.float64))
    assert np.diff(angles) == pytest.approx(np.full(7, angles[1] - angles[0]), rel=1e-3)


def test_approximations_are_reported():
    notes = plan_scheduler(resolve_sampler("Restart"), SD15, flow_matching=False).notes
    assert any("Heun" in n for n in notes)
    assert plan_scheduler(resolve_sampler("DPM++ 2M"), SD15, flow_matching=False).notes == ()
    euler_a = plan_scheduler(resolve_sampler("Euler a Karras"), SD15, flow_matching=False)
    assert euler_a.notes and "use_karras_sigmas" not in euler_a.kwargs


# --- flow matching (FLUX, Qwen-Image) --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [s["name"] for s in SAMPLERS] + ["DPM++ 2M Karras", "bogus"])
def test_flow_matching_always_builds_flow_euler(name):
    config = copy.deepcopy(FLUX)
    scheduler = build_scheduler(resolve_sampler(name), config, flow_matching=True)
    assert config == FLUX
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.shift == 3.0
    assert scheduler.config.max_image_seq_len == 4096
    scheduler.set_timesteps(20, mu=0.8)
    assert len(scheduler.timesteps) == 20


def test_flow_matching_schedules():
    default = build_scheduler(resolve_sampler("DPM++ 2M"), FLUX, flow_matching=True)
    assert not default.config.use_karras_sigmas  # the sampler's default schedule is not forced on FLUX
    karras = build_scheduler(resolve_sampler("Euler", scheduler="karras"), FLUX, flow_matching=True)
    assert karras.config.use_karras_sigmas
    exp = build_scheduler(resolve_sampler("Euler Exponential"), FLUX, flow_matching=True)
    assert exp.config.use_exponential_sigmas and not exp.config.use_karras_sigmas
    choice = resolve_sampler("DPM++ 2M")
    assert choice.name == "DPM++ 2M"  # reported as requested; plan notes say it ran as flow Euler
    assert plan_scheduler(choice, FLUX, flow_matching=True).notes
