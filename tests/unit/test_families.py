"""Family adapters on the offline demo models: loading, tasks, seeds, scheduler isolation, from_pipe sharing."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image
from transformers.utils import is_torchvision_available

from pipelines import demo
from pipelines.families import adapter_for
from pipelines.families.base import LoadedModel, UnsupportedTask
from pipelines.families.qwen import load_edit_processor
from pipelines.registry import ModelSpec
from pipelines.request import GenerationRequest, Task
from tests.image_helpers import pixels

FAMILIES = demo.DEMO_KINDS
INPAINT_FAMILIES = FAMILIES  # the edit model inpaints through QwenImageEditInpaintPipeline
LONG_UNICODE_PROMPT = "a photo of a cat 猫 🐱 café, détaillé, " * 80  # past every tokenizer's max length

PIPELINE_CLASS = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
}


def _pattern(width: int, height: int) -> Image.Image:
    """A deterministic, non-flat RGB picture (VAE round trips of flat colours are too forgiving)."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _center_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def _req(family: str, task: Task | None = None, **kw) -> GenerationRequest:
    task = task or (Task.EDIT if family == "qwen-image-edit" else Task.TXT2IMG)
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    if task != Task.TXT2IMG:
        kw.setdefault("init_images", [_pattern(kw["width"], kw["height"])])
    # The edit model VAE-encodes its input at ~1 MP on every call: skip its CFG pass unless a test wants it.
    guidance = 1.0 if family == "qwen-image-edit" else 4.0
    defaults = dict(prompt="a red fox in the snow", steps=3, guidance=guidance, strength=0.6)
    return GenerationRequest(model=f"demo-{family}", task=task, **{**defaults, **kw})


def _run(family: str, loaded: LoadedModel, req: GenerationRequest, seeds: list[int], scheduler=None, on_step=None):
    steps: list[tuple[int, int]] = []

    def record(i: int, n: int) -> bool:
        steps.append((i, n))
        return bool(on_step and on_step(i, n))

    images = adapter_for(family).run(loaded, req, seeds, scheduler, record)
    return images, steps


# --- demo models ------------------------------------------------------------------------------------------------------


def test_adapter_for_maps_families() -> None:
    assert adapter_for("sd15") is adapter_for("sdxl")
    for family in FAMILIES:
        adapter = adapter_for(family)
        assert family in adapter.families
        assert adapter.size_multiple == (8 if family in ("sd15", "sdxl") else 16)
        assert adapter.flow_matching == (family not in ("sd15", "sdxl"))
    assert Task.EDIT in adapter_for("qwen-image-edit").tasks
    assert Task.TXT2IMG not in adapter_for("qwen-image-edit").tasks
    with pytest.raises(KeyError):
        adapter_for("sd3")


@pytest.mark.parametrize("kind", FAMILIES)
def test_demo_folder_loads_with_diffusion_pipeline(demo_root: Path, kind: str) -> None:
    path = demo.ensure_demo_model(kind, demo_root)
    assert (path / demo.MARKER).is_file()
    assert not list(demo_root.glob(f".{kind}.tmp-*"))
    kwargs = {}
    if kind == "qwen-image-edit" and not is_torchvision_available():
        # transformers' stock Qwen2VLProcessor can't be built without torchvision (its video processor needs it)
        kwargs["processor"] = load_edit_processor(path)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    # The real spatial factor of each family, so pixel multiples are the real ones.
    assert pipe.vae_scale_factor == 8


def test_demo_weights_are_deterministic(tmp_path: Path) -> None:
    a = demo.build_demo_model("flux", tmp_path / "a")
    b = demo.build_demo_model("flux", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_ensure_demo_model_builds_once_across_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    real_build = demo.build_demo_model

    def counting_build(kind: str, out_dir: Path) -> Path:
        builds.append(kind)
        time.sleep(0.2)  # make sure the other threads arrive while this build runs
        return real_build(kind, out_dir)

    monkeypatch.setattr(demo, "build_demo_model", counting_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(demo.ensure_demo_model("flux", tmp_path))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["flux"]
    assert results == [tmp_path / "flux"] * 4
    # Already built: no rebuild. A folder without its marker (a crash mid-build) is rebuilt.
    demo.ensure_demo_model("flux", tmp_path)
    assert builds == ["flux"]
    (tmp_path / "flux" / demo.MARKER).unlink()
    demo.ensure_demo_model("flux", tmp_path)
    assert builds == ["flux", "flux"]
    assert (tmp_path / "flux" / demo.MARKER).is_file()


_BUILD_ONCE_SCRIPT = """
import sys, time
from pathlib import Path
from pipelines import demo

real_build = demo.build_demo_model

def counting_build(kind, out_dir):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(1.0)  # the other process reaches the lock while this one builds
    return real_build(kind, out_dir)

demo.build_demo_model = counting_build
print(demo.ensure_demo_model("flux", Path(sys.argv[1])))
"""


def test_ensure_demo_model_builds_once_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    cmd = [sys.executable, "-c", _BUILD_ONCE_SCRIPT, str(tmp_path / "models"), str(log)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == str(tmp_path / "models" / "flux")
    assert log.read_text().count("built") == 1
    assert (tmp_path / "models" / "flux" / demo.MARKER).is_file()


def test_unknown_demo_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo model kind"):
        demo.build_demo_model("sd3", tmp_path / "x")


# --- generation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img_size_count_and_seeds(load, family: str) -> None:
    loaded = load(family)
    # Non-square so a width/height swap shows; multiples of 16 suit every family.
    req = _req(family, width=96, height=64)
    batch, steps = _run(family, loaded, req, [7, 8])
    assert len(batch) == 2
    assert all(im.size == (96, 64) for im in batch)
    assert steps[-1][0] == steps[-1][1] == len(steps)
    single, _ = _run(family, loaded, req, [8])
    again, _ = _run(family, loaded, req, [8])
    assert np.array_equal(pixels(single[0]), pixels(again[0])), "same seed, different pixels"
    # Image i of a batch equals a single run with its seed (A1111's seed + i rule).
    assert np.abs(pixels(batch[1]) - pixels(single[0])).max() <= 2
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 10, "different seeds gave the same picture"


@pytest.mark.parametrize("family", FAMILIES)
def test_long_unicode_prompt_is_truncated(load, family: str) -> None:
    req = _req(family, prompt=LONG_UNICODE_PROMPT, negative_prompt="blurry, 低质量 " * 50, steps=1)
    images, _ = _run(family, load(family), req, [1])
    assert images[0].size == (64, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_changes_input_keeps_size(load, family: str) -> None:
    loaded = load(family)
    req = _req(family, Task.IMG2IMG, width=64, height=80 if family in ("sd15", "sdxl") else 96, steps=4)
    images, steps = _run(family, loaded, req, [3, 4])
    assert len(images) == 2
    assert all(im.size == (req.width, req.height) for im in images)
    assert np.abs(pixels(images[0]) - pixels(req.init_images[0])).mean() > 5
    assert 0 < len(steps) < req.steps or family == "sd15"  # strength 0.6 runs fewer steps (PNDM adds one)


@pytest.mark.parametrize("family", INPAINT_FAMILIES)
def test_inpaint_repaints_masked_region(load, family: str) -> None:
    loaded = load(family)
    req = _req(family, Task.INPAINT, mask=_center_mask(64, 64), strength=0.9, steps=4)
    images, _ = _run(family, loaded, req, [11])
    assert images[0].size == (64, 64)
    inside = (slice(16, 48), slice(16, 48))
    assert np.abs(pixels(images[0])[inside] - pixels(req.init_images[0])[inside]).mean() > 5


def test_edit_task(load) -> None:
    loaded = load("qwen-image-edit")
    req = _req(
        "qwen-image-edit",
        Task.EDIT,
        prompt="make the sky purple",
        width=80,
        height=64,
        guidance=4.0,
        negative_prompt="ugly",
    )
    images, steps = _run("qwen-image-edit", loaded, req, [5])
    assert images[0].size == (80, 64)
    assert len(steps) == req.steps


@pytest.mark.parametrize(
    ("family", "task"),
    [("sd15", Task.EDIT), ("sdxl", Task.EDIT), ("flux", Task.EDIT), ("qwen-image", Task.EDIT)]
    + [("qwen-image-edit", Task.TXT2IMG)],
)
def test_unsupported_task(load, family: str, task: Task) -> None:
    with pytest.raises(UnsupportedTask):
        adapter_for(family).pipeline_for(load(family), task)


# --- shared state -----------------------------------------------------------------------------------------------------


def _other_scheduler(loaded: LoadedModel):
    config = loaded.base.scheduler.config
    if isinstance(loaded.base.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=True)
    return EulerAncestralDiscreteScheduler.from_config(config)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "qwen-image"])
def test_scheduler_never_leaks_into_cached_pipelines(load, family: str) -> None:
    loaded = load(family)
    adapter = adapter_for(family)
    cached = {task: adapter.pipeline_for(loaded, task) for task in (Task.TXT2IMG, Task.IMG2IMG)}
    before = {task: (p.scheduler, dict(p.scheduler.config), p.config["scheduler"]) for task, p in cached.items()}
    for task in cached:
        scheduler = _other_scheduler(loaded)
        _run(family, loaded, _req(family, task), [1], scheduler=scheduler)
        assert scheduler.timesteps is not None and len(scheduler.timesteps) > 0, "the given scheduler did not run"
    for task, p in cached.items():
        sched, config, entry = before[task]
        assert p.scheduler is sched
        assert dict(p.scheduler.config) == config
        assert p.config["scheduler"] == entry


def test_scheduler_none_uses_a_fresh_copy(load) -> None:
    loaded = load("sd15")
    sched = loaded.base.scheduler
    _run("sd15", loaded, _req("sd15"), [1])
    assert loaded.base.scheduler is sched
    assert sched.num_inference_steps is None  # never set_timesteps'd: each call got its own instance


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_shares_weights(load, family: str) -> None:
    loaded = load(family)
    adapter = adapter_for(family)
    base = loaded.base
    denoiser = "unet" if family in ("sd15", "sdxl") else "transformer"
    for task in adapter.tasks - {Task.TXT2IMG, Task.EDIT}:
        derived = adapter.pipeline_for(loaded, task)
        assert derived is not base
        assert adapter.pipeline_for(loaded, task) is derived, "derived pipeline not cached"
        assert getattr(derived, denoiser) is getattr(base, denoiser)
        assert derived.vae is base.vae and derived.text_encoder is base.text_encoder


def test_from_pipe_keeps_the_loaded_dtype(demo_root: Path) -> None:
    spec = ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15")
    adapter = adapter_for("sd15")
    loaded = adapter.load(spec, str(demo.ensure_demo_model("sd15", demo_root)), torch.device("cpu"), torch.bfloat16)
    adapter.pipeline_for(loaded, Task.INPAINT)
    assert loaded.base.unet.dtype == torch.bfloat16
    assert loaded.base.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_interrupt_stops_early_and_does_not_stick(load, family: str) -> None:
    loaded = load(family)
    req = _req(family, steps=5)
    images, steps = _run(family, loaded, req, [2], on_step=lambda i, n: i >= 2)
    assert [i for i, _ in steps] == [1, 2]
    assert images[0].size == (64, 64)  # the partially denoised latents are still decoded
    # The interrupt flag lives on the per-call view: the next call on the same cached pipeline runs every step.
    _, steps = _run(family, loaded, req, [2])
    assert len(steps) == steps[-1][1] >= 5


def test_sd_scheduler_swap_runs_euler(load) -> None:
    loaded = load("sd15")
    scheduler = EulerDiscreteScheduler.from_config(loaded.base.scheduler.config)
    _, steps = _run("sd15", loaded, _req("sd15", steps=4), [1], scheduler=scheduler)
    assert len(steps) == 4  # Euler: exactly `steps` timesteps (PNDM's PLMS adds one)


@pytest.mark.parametrize(
    ("task", "steps", "strength", "expected"),
    [
        (Task.IMG2IMG, 1, 0.75, 2),  # 1 x 0.75 would leave no denoising step
        (Task.INPAINT, 2, 0.3, 4),
        (Task.IMG2IMG, 10, 0.75, 10),  # enough already
        (Task.IMG2IMG, 1, 1.0, 1),
        (Task.TXT2IMG, 1, 0.5, 1),
    ],
)
def test_schedule_keeps_at_least_one_denoising_step(task: Task, steps: int, strength: float, expected: int) -> None:
    from pipelines.families import schedule_steps

    image = Image.new("RGB", (64, 64))
    req = GenerationRequest(model="m", prompt="x", task=task, steps=steps, strength=strength, init_images=[image])
    assert schedule_steps(req) == expected
    assert task == Task.TXT2IMG or strength == 1.0 or int(schedule_steps(req) * strength) >= 1
