"""ControlNet on the demo SD models, each checked by its mechanism: the control image changes the picture, weight 0
and a guidance window outside the steps leave it pixel-identical, control modes scale the residuals and (for
"ControlNet is more important") keep the control off the unconditional half of CFG, several units add up, the
batcher keeps units' models apart and each image keeps its seed. Plus the torch-free helpers (listing, hashes,
fitting maps)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines import controlnet, controlnet_models, demo, ip_adapter
from pipelines.batching import batch_key
from pipelines.control_units import (
    ControlMode,
    ControlResize,
    ControlUnit,
    HiresOption,
    first_pass_units,
    fit_control_image,
    guidance_stopped,
    second_pass_units,
    soft_injection_scales,
)
from pipelines.errors import InvalidRequest
from pipelines.families import adapter_for
from pipelines.families.base import BatchItem
from pipelines.hires import HiresOptions
from pipelines.request import GenerationRequest, Task
from pipelines.sampler_names import resolve_sampler


def square(size: int = 64, inverted: bool = False) -> Image.Image:
    fg, bg = ("black", "white") if inverted else ("white", "black")
    image = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=fg)
    return image


def unit(family: str = "sd15", **kw) -> ControlUnit:
    base = dict(model=f"control_demo-{family}", source=f"demo:{family}", image=square())
    return ControlUnit(**{**base, **kw})


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def run(load, demo_root: Path):
    """`run(family, units, **request fields)`: one 64px image of seed 1 through the family adapter."""

    def _run(family: str, units: list[ControlUnit], seeds: tuple[int, ...] = (1,), **kw) -> list[Image.Image]:
        loaded = load(family)
        fields = dict(model=f"demo-{family}", prompt="a cat", width=64, height=64, steps=2, guidance=5.0, seed=1)
        req = GenerationRequest(**{**fields, **kw}, control_units=units)
        controlnet.ensure_loaded(loaded, units, demo_root, None)
        ip_adapter.ensure_loaded(loaded, [u for u in units if u.is_ip_adapter], demo_root)

        def scheduler():
            return type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)

        adapter = adapter_for(family)
        with torch.inference_mode():
            if req.hires is not None:
                return adapter.run_hires(loaded, req, list(seeds), scheduler, lambda step, total: False)
            return adapter.run(loaded, req, list(seeds), scheduler(), lambda step, total: False)

    return _run


# Mechanism on the pipelines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_control_image_changes_the_picture_and_weight_zero_does_not(run, family: str) -> None:
    plain = px(run(family, [])[0])
    controlled = px(run(family, [unit(family)])[0])
    other_image = px(run(family, [unit(family, image=square(inverted=True))])[0])
    assert np.abs(controlled - plain).mean() > 2
    assert np.abs(controlled - other_image).mean() > 1  # it is the control image that steers it
    assert np.array_equal(px(run(family, [unit(family, weight=0.0)])[0]), plain)


def test_qwen_image_control_and_weight_zero(run) -> None:
    plain = px(run("qwen-image", [])[0])
    assert np.abs(px(run("qwen-image", [unit("qwen-image")])[0]) - plain).mean() > 2
    assert np.array_equal(px(run("qwen-image", [unit("qwen-image", weight=0.0)])[0]), plain)


def test_guidance_window_limits_the_steps_with_control(run) -> None:
    plain = px(run("sd15", [], steps=4)[0])
    # Steps 0-3 of 4 are at 0, 0.25, 0.5, 0.75: a window from 0.9 on covers none of them.
    assert np.array_equal(px(run("sd15", [unit(guidance_start=0.9, guidance_end=1.0)], steps=4)[0]), plain)
    full = px(run("sd15", [unit()], steps=4)[0])
    first_half = px(run("sd15", [unit(guidance_start=0.0, guidance_end=0.5)], steps=4)[0])
    assert np.abs(first_half - plain).mean() > 1 and np.abs(first_half - full).mean() > 0.5


def test_control_modes_change_the_picture(run) -> None:
    pictures = {mode: px(run("sd15", [unit(control_mode=mode)])[0]) for mode in ControlMode}
    assert np.abs(pictures[ControlMode.BALANCED] - pictures[ControlMode.PROMPT]).mean() > 1
    assert np.abs(pictures[ControlMode.PROMPT] - pictures[ControlMode.CONTROL]).mean() > 1
    # Without CFG there is no unconditional half: "ControlNet is more important" is then the soft injection alone.
    no_cfg = {mode: px(run("sd15", [unit(control_mode=mode)], guidance=1.0)[0]) for mode in ControlMode}
    assert np.array_equal(no_cfg[ControlMode.PROMPT], no_cfg[ControlMode.CONTROL])


def test_several_units_add_up(run) -> None:
    one = px(run("sd15", [unit()])[0])
    two = px(run("sd15", [unit(), unit(image=square(inverted=True), weight=0.7)])[0])
    assert np.abs(two - one).mean() > 1
    # A second unit at weight 0 adds nothing.
    assert np.array_equal(px(run("sd15", [unit(), unit(image=square(inverted=True), weight=0.0)])[0]), one)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_img2img_and_inpainting_with_control(run, family: str) -> None:
    init = Image.new("RGB", (64, 64), "gray")
    fields = dict(task=Task.IMG2IMG, init_images=[init], strength=0.75, steps=4)
    plain = px(run(family, [], **fields)[0])
    controlled = run(family, [unit(family)], **fields)[0]
    assert controlled.size == (64, 64) and np.abs(px(controlled) - plain).mean() > 1
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainted = run(family, [unit(family)], **{**fields, "task": Task.INPAINT, "mask": mask})[0]
    assert inpainted.size == (64, 64)


def test_flux_batch_keeps_each_seeds_picture(run) -> None:
    # The FLUX pipeline VAE-encodes control images with the images' generators: the noise is drawn first, so an
    # image is its seed's picture whatever shares the call.
    alone = px(run("flux", [unit("flux")], seeds=(2,))[0])
    together = run("flux", [unit("flux")], seeds=(1, 2))
    assert np.abs(px(together[1]) - alone).max() <= 2


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_applies_units_to_the_passes_their_hr_option_names(run, upscaler: str) -> None:
    hires = HiresOptions(scale=1.5, upscaler=upscaler, denoising_strength=0.6)
    fields = dict(hires=hires, steps=3)
    pictures = {
        name: px(run("sd15", units, **fields)[0])
        for name, units in {
            "none": [],
            "both": [unit()],
            "low": [unit(hr_option=HiresOption.LOW_RES_ONLY)],
            "high": [unit(hr_option=HiresOption.HIGH_RES_ONLY)],
        }.items()
    }
    assert pictures["both"].shape == (96, 96, 3)
    for a, b in [("none", "both"), ("none", "low"), ("none", "high"), ("low", "both"), ("high", "both")]:
        assert np.abs(pictures[a] - pictures[b]).mean() > 0.5, (a, b)


def test_second_pass_units_as_the_extension() -> None:
    units = [
        unit(module="canny"),
        unit(hr_option=HiresOption.LOW_RES_ONLY),
        unit(control_mode=ControlMode.CONTROL, module="mlsd"),
        unit(),
    ]
    second = second_pass_units(units, 96, 80)
    assert [u.control_mode for u in second] == [ControlMode.PROMPT, ControlMode.CONTROL, ControlMode.BALANCED]
    assert all(u.image.size == (96, 80) for u in second)
    assert first_pass_units([unit(hr_option=HiresOption.HIGH_RES_ONLY), unit()]) == [unit()]


def test_batched_images_keep_their_own_control_image_and_seed(run, load, demo_root: Path) -> None:
    loaded = load("sd15")
    fields = dict(model="demo-sd15", prompt="a cat", width=64, height=64, steps=2, guidance=5.0)
    a = GenerationRequest(**fields, seed=3, control_units=[unit()])
    b = GenerationRequest(**fields, seed=8, control_units=[unit(image=square(inverted=True))])
    scheduler = type(loaded.base.scheduler).from_config(loaded.base.scheduler.config)
    with torch.inference_mode():
        together = adapter_for("sd15").run_batch(
            loaded, [BatchItem(a, [3]), BatchItem(b, [8])], scheduler, lambda s, t: False
        )
    alone_b = run("sd15", b.control_units, seeds=(8,))[0]
    assert np.abs(px(together[1][0]) - px(alone_b)).max() <= 2
    assert np.abs(px(together[0][0]) - px(together[1][0])).mean() > 1


# IP-Adapter ----------------------------------------------------------------------------------------------------------


def ip_unit(family: str = "sd15", **kw) -> ControlUnit:
    base = dict(model=f"ip-adapter_demo-{family}", source=f"demo-ip:{family}", image=square())
    return ControlUnit(**{**base, "image_encoder": f"demo-ip:{family}", **kw})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ip_adapter_image_prompt_steers_and_leaves_the_unet_as_it_was(run, load, family: str) -> None:
    unet = load(family).base.unet
    processors = dict(unet.attn_processors)
    plain = px(run(family, [])[0])
    prompted = px(run(family, [ip_unit(family)])[0])
    other = px(run(family, [ip_unit(family, image=square(inverted=True))])[0])
    assert np.abs(prompted - plain).mean() > 2 and np.abs(prompted - other).mean() > 1
    assert np.array_equal(px(run(family, [ip_unit(family, weight=0.0)])[0]), plain)
    # Taken out after the call: the same processors, no image projection, the plain picture again.
    assert dict(unet.attn_processors) == processors and unet.encoder_hid_proj is None
    assert np.array_equal(px(run(family, [])[0]), plain)
    # With a ControlNet unit in the same request.
    controlled = px(run(family, [unit(family)])[0])
    both = px(run(family, [unit(family), ip_unit(family)])[0])
    assert np.abs(both - controlled).mean() > 1


# The extension's arithmetic, on the wrapper itself -----------------------------------------------------------------


class FixedNet(torch.nn.Module):
    """Stands in for a ControlNet: 12 down residuals and a middle one, all ones."""

    config = {"global_pool_conditions": False}

    def forward(self, sample, *args, conditioning_scale=1.0, **kwargs):
        ones = torch.ones_like(sample)
        return [ones.clone() for _ in range(12)], ones.clone()


def residuals(mode: ControlMode, batch: int, n_images: int = 1, weight: float = 1.0) -> list[torch.Tensor]:
    wrapper = controlnet.UnitControlNet(FixedNet(), unit(control_mode=mode, weight=weight), n_images, lambda: 10)
    down, mid = wrapper(torch.zeros(batch, 1, 1, 1), 0, conditioning_scale=1.0)
    return [*down, mid]


def test_soft_injection_and_cfg_injection_as_the_extension() -> None:
    balanced = residuals(ControlMode.BALANCED, batch=2, weight=0.5)
    assert all(torch.equal(r, torch.full_like(r, 0.5)) for r in balanced)
    prompt = residuals(ControlMode.PROMPT, batch=2)
    assert [round(float(r[1]), 6) for r in prompt] == [round(0.825 ** (12 - i), 6) for i in range(13)]
    assert all(float(r[0]) == float(r[1]) for r in prompt)  # both CFG halves get it
    control = residuals(ControlMode.CONTROL, batch=2)
    assert all(float(r[0]) == 0.0 for r in control)  # the unconditional half gets none
    assert [float(r[1]) for r in control] == [float(r[1]) for r in prompt]
    assert soft_injection_scales(10) == soft_injection_scales(13)[:10]  # SDXL: the first 10, as the extension


def test_off_steps_skip_the_controlnet_pass() -> None:
    net = FixedNet()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    window = unit(guidance_start=0.5, guidance_end=1.0)
    wrapper = controlnet.UnitControlNet(net, window, 1, lambda: 4)
    outputs = [wrapper(torch.zeros(2, 1, 1, 1), 0) for _ in range(4)]
    assert len(calls) == 3  # step 1 (off) runs once to learn the shapes, step 2 reuses them; steps 3-4 are on
    assert all(float(r.abs().sum()) == 0 for r in [*outputs[1][0], outputs[1][1]])
    assert float(outputs[2][1].abs().sum()) > 0


def test_guidance_window_is_a1111s_rule() -> None:
    # percent = step / total; off when below start or above end (the end itself is still on).
    assert [guidance_stopped(s, 4, 0.0, 0.5) for s in range(4)] == [False, False, False, True]
    assert [guidance_stopped(s, 4, 0.5, 1.0) for s in range(4)] == [True, True, False, False]


# Engine: validation, loading, batching ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from pipelines.engine import Engine, EngineConfig
    from tests.engine_helpers import yaml_registry

    registry = yaml_registry(
        tmp_path_factory,
        "models:\n"
        "  demo-sd15:\n    family: sd15\n    source: demo:sd15\n"
        "  demo-sdxl:\n    family: sdxl\n    source: demo:sdxl\n"
        "  demo-flux:\n    family: flux\n    source: demo:flux\n"
        "  demo-qwen-image:\n    family: qwen-image\n    source: demo:qwen-image\n",
    )
    config = EngineConfig(data_dir=data_dir, max_batch=8, max_wait_ms=0, preload_default=False)
    eng = Engine(registry, config)
    eng.start()
    yield eng
    eng.stop()


def request(model: str = "demo-sd15", **kw) -> GenerationRequest:
    base = dict(model=model, prompt="a cat", width=64, height=64, steps=2, seed=1, control_units=[unit()])
    return GenerationRequest(**{**base, **kw})


def test_engine_runs_units_and_counts_the_controlnet_in_the_models_memory(engine) -> None:
    result = engine.submit(request()).wait_sync(120)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    loaded = engine.cache.get(engine.registry.get("demo-sd15"))
    assert "demo:sd15" in loaded.controlnets
    weights = sum(p.numel() * p.element_size() for p in loaded.controlnets["demo:sd15"].parameters())
    base = sum(
        p.numel() * p.element_size()
        for c in loaded.base.components.values()
        if isinstance(c, torch.nn.Module)
        for p in c.parameters()
    )
    assert loaded.approx_bytes() >= base + weights
    # The ControlNet pipeline shares the base's UNet (from_pipe), it does not copy it.
    assert loaded.control_derived[Task.TXT2IMG].unet is loaded.base.unet


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"model": "demo-qwen-image", "control_units": [unit("qwen-image")] * 2}, "alwayson_scripts.controlnet"),
        (
            {"model": "demo-qwen-image", "task": Task.IMG2IMG, "init_images": [square()]},
            "alwayson_scripts.controlnet",
        ),
        (
            {"model": "demo-flux", "control_units": [unit("flux", control_mode=ControlMode.CONTROL)]},
            "alwayson_scripts.controlnet.args.0.control_mode",
        ),
        ({"refiner": "demo-sdxl"}, "refiner_checkpoint"),
        ({"prompt": "a cat AND a dog"}, "prompt"),
        ({"model": "demo-flux", "control_units": [ip_unit("sd15")]}, "alwayson_scripts.controlnet.args.0.model"),
        ({"control_units": [ip_unit(guidance_end=0.5)]}, "alwayson_scripts.controlnet.args.0.guidance_start"),
        ({"model": "demo-qwen-image", "control_units": [unit("qwen-image")], "hires": HiresOptions()}, "enable_hr"),
        ({"control_units": [unit(image=square(32))]}, "alwayson_scripts.controlnet.args.0.image"),
    ],
)
def test_engine_refuses_what_it_cannot_run(engine, kw, field) -> None:
    with pytest.raises(InvalidRequest) as e:
        engine.submit(request(**kw))
    assert e.value.field == field


def test_engine_refuses_a_controlnet_of_another_family(engine) -> None:
    job = engine.submit(request(model="demo-sdxl"))  # the SD1.5 demo ControlNet on SDXL
    with pytest.raises(InvalidRequest) as e:
        job.wait_sync(120)
    assert e.value.field == "alwayson_scripts.controlnet.args.0.model" and "sd15" in e.value.message
    assert "demo:sd15" not in engine.cache.get(engine.registry.get("demo-sdxl")).controlnets  # not kept


def test_batch_key_keeps_units_models_and_settings_apart() -> None:
    choice = resolve_sampler(None, None, "sd15")
    key = batch_key("a", request(), choice)
    assert batch_key("b", request(control_units=[unit(image=square(inverted=True))]), choice) == key
    assert batch_key("b", request(control_units=[unit(source="/models/ControlNet/x.safetensors")]), choice) != key
    assert batch_key("b", request(control_units=[unit(weight=0.5)]), choice) != key
    assert batch_key("b", request(control_units=[]), choice) != key
    ip = request(control_units=[ip_unit()])
    assert batch_key("b", ip, choice) != batch_key("c", ip, choice)  # an image prompt runs alone


# Torch-free helpers -----------------------------------------------------------------------------------------------


def test_model_listing_names_and_hashes_as_the_extension(tmp_path: Path) -> None:
    folder = tmp_path / "ControlNet"
    (folder / "sub").mkdir(parents=True)
    big = bytes(range(256)) * 4608  # 1.125 MiB: the hash reads 64 KiB from 1 MiB on
    (folder / "sub" / "control_v11p_sd15_canny.safetensors").write_bytes(big)
    (folder / "notes.txt").write_text("not a model")
    diffusers_folder = folder / "controlnet-depth-sdxl"
    diffusers_folder.mkdir()
    (diffusers_folder / "config.json").write_text("{}")
    (diffusers_folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    entries = controlnet_models.scan(folder, ("sd15", "flux"))
    expected = hashlib.sha256(big[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    empty = hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB: A1111 hashes nothing
    assert [e.title for e in entries] == [
        controlnet_models.demo_entry("sd15").title,
        controlnet_models.demo_entry("flux").title,
        controlnet_models.demo_ip_adapter_entry("sd15").title,  # IP-Adapters are listed with them, as the extension
        f"control_v11p_sd15_canny [{expected}]",
        f"controlnet-depth-sdxl [{empty}]",
    ]
    canny = entries[3]
    assert controlnet_models.resolve(entries, f"control_v11p_sd15_canny [{expected}]") is canny
    assert controlnet_models.resolve(entries, "Control_V11P_SD15_Canny") is canny  # bare name, any case
    assert controlnet_models.resolve(entries, "canny") is canny  # the shortest name containing it
    assert controlnet_models.resolve(entries, "openpose") is None


def test_fitting_detected_maps_as_the_extension() -> None:
    wide = Image.new("RGB", (128, 64), "white")
    assert fit_control_image(wide, 64, 64, ControlResize.RESIZE).size == (64, 64)
    cropped = fit_control_image(wide, 64, 64, ControlResize.INNER_FIT)
    assert cropped.size == (64, 64) and cropped.getextrema() == ((255, 255),) * 3
    filled = fit_control_image(wide, 64, 64, ControlResize.OUTER_FIT)
    assert filled.size == (64, 64) and filled.getpixel((32, 2)) == (255, 255, 255)  # padded with the border colour


def test_demo_controlnet_is_built_once_and_fits_its_model(tmp_path: Path, demo_root: Path) -> None:
    started = time.perf_counter()
    path = demo.ensure_demo_controlnet("sd15", demo_root)
    again = demo.ensure_demo_controlnet("sd15", demo_root)
    assert path == again and (path / "diffusion_pytorch_model.safetensors").is_file()
    assert time.perf_counter() - started < 60
    with pytest.raises(ValueError):
        demo.ensure_demo_controlnet("qwen-image-edit", tmp_path)


def test_single_file_controlnet_loads_offline_with_its_local_config(tmp_path: Path, demo_root: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = demo.ensure_demo_controlnet("sd15", demo_root)
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "ControlNet" / "my_canny.safetensors"
    single.parent.mkdir()
    save_file(weights, single)
    with pytest.raises(InvalidRequest, match="controlnet-sd15"):  # no config folder: refused by name, no hub call
        controlnet.load_controlnet(str(single), "sd15", torch.float32, demo_root, tmp_path / "configs")
    configs = tmp_path / "configs" / controlnet.SINGLE_FILE_CONFIGS["sd15"]
    configs.mkdir(parents=True)
    (configs / "config.json").write_bytes((folder / "config.json").read_bytes())
    model = controlnet.load_controlnet(str(single), "sd15", torch.float32, demo_root, tmp_path / "configs")
    assert controlnet.controlnet_family(model) == "sd15"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    flux_single = tmp_path / "ControlNet" / "flux_canny.safetensors"
    save_file(load_file(demo.ensure_demo_controlnet("flux", demo_root) / "diffusion_pytorch_model.safetensors"),
              flux_single)  # fmt: skip
    assert controlnet.single_file_family(flux_single) == "flux"
    with pytest.raises(InvalidRequest, match="diffusers folder"):
        controlnet.load_controlnet(str(flux_single), "flux", torch.float32, demo_root, tmp_path / "configs")


def test_only_masked_inpainting_crops_the_control_image_with_the_mask() -> None:
    from pipelines.engine import Engine
    from pipelines.request import InpaintOptions

    control = Image.new("RGB", (64, 64), "black")
    control.paste((255, 255, 255), (0, 0, 16, 16))  # white only in the masked corner
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 16, 16))
    req = GenerationRequest(
        model="demo-sd15",
        prompt="x",
        task=Task.INPAINT,
        width=64,
        height=64,
        init_images=[Image.new("RGB", (64, 64), "gray")],
        mask=mask,
        inpaint=InpaintOptions(mask_blur=0, full_res=True),
        control_units=[unit(image=control)],
    )
    prepared, _ = Engine._prepare_images(req)
    cropped = prepared.control_units[0].image
    assert cropped.size == (64, 64) and cropped.getpixel((32, 32)) == (255, 255, 255)  # the corner, blown up


def test_engine_batches_units_of_the_same_models_only(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("sd15")
    original = adapter.run_batch
    calls: list[list[int]] = []

    def spy(loaded, items, scheduler, on_step):
        calls.append([s for it in items for s in it.seeds])
        return original(loaded, items, scheduler, on_step)

    monkeypatch.setattr(adapter, "run_batch", spy)
    blocker = engine.submit(request(prompt="blocker", steps=2000, control_units=[]))
    deadline = time.monotonic() + 60
    while blocker.progress.sampling_step < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    jobs = [
        engine.submit(request(seed=10)),
        engine.submit(request(seed=20, control_units=[unit(image=square(inverted=True))])),  # same model: shares
        engine.submit(request(seed=30, control_units=[unit(weight=0.5)])),  # other weight: alone
        engine.submit(request(seed=40, control_units=[])),  # no ControlNet: alone
    ]
    blocker.cancel()
    results = [job.wait_sync(120) for job in jobs]
    assert sorted(calls[1:]) == [[10, 20], [30], [40]]
    assert [r.seeds for r in results] == [[10], [20], [30], [40]]


def test_a_broken_controlnet_file_fails_as_a_model_load(engine, tmp_path: Path) -> None:
    from pipelines.errors import ModelLoadError

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    job = engine.submit(request(control_units=[unit(model="broken [x]", source=str(broken))]))
    with pytest.raises(ModelLoadError, match="broken"):
        job.wait_sync(120)
