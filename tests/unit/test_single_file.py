"""Single-file checkpoints load offline: tiny demo models written in the ORIGINAL layouts (A1111/ldm for SD/SDXL, BFL
for FLUX) load through `from_single_file` with a local config folder and make the same pixels as the diffusers folder.

The test writes the original layout itself (diffusers only converts the other way); each writer is checked by
converting its output back with diffusers' own converters, which must give the original state dict exactly.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug

import json
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection

from pipelines import demo
from pipelines.checkpoints import CheckpointError, detect_checkpoint, scan_checkpoints
from pipelines.engine import Engine, EngineConfig
from pipelines.errors import ModelLoadError
from pipelines.families import adapter_for
from pipelines.families.base import LoadedModel, UnsupportedTask
from pipelines.layouts import flux_to_bfl
from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest, Task
from pipelines.single_file import convert_flux_to_diffusers, load_pipeline
from tests.controlnet_ldm import resnet_to_ldm

Tensors = dict[str, torch.Tensor]
UNET_FILE = "diffusion_pytorch_model.safetensors"


# --- diffusers -> original layout writers (the test's job: diffusers only converts the other way) ------------------


def unet_to_ldm(sd: Tensors, config: dict) -> Tensors:
    """UNet2DConditionModel keys -> `model.diffusion_model.*` (ldm numbers a level's resnets and sampler in a row)."""
    per = config["layers_per_block"] + 1
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            index = (1 if m[1] == "down" else 0) + int(m[2]) * per + int(m[4])
            part = f"0.{resnet_to_ldm(m[5])}" if m[3] == "resnets" else f"1.{m[5]}"
            new = f"{'input' if m[1] == 'down' else 'output'}_blocks.{index}.{part}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])  # the upsampler follows the last resnet (and its attention, if the level has them)
            new = f"output_blocks.{b * per + per - 1}.{2 if up_attn[b] else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{resnet_to_ldm(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: Tensors, config: dict) -> Tensors:
    """AutoencoderKL keys -> `first_stage_model.*` (decoder levels reversed, attention as 1x1 convolutions)."""
    top = len(config["up_block_types"]) - 1
    out = {}
    for key, value in sd.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", k):
            k = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k = f"decoder.up.{top - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            k = f"decoder.up.{top - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            k = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            k = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def clip_to_ldm(sd: Tensors, prefix: str) -> Tensors:
    """CLIPTextModel -> A1111's `<prefix>text_model.*` (newer transformers save the keys without `text_model.`)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


_OPEN_CLIP = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.", ".attn."),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
)


def open_clip_to_ldm(sd: Tensors, prefix: str) -> Tensors:
    """CLIPTextModelWithProjection -> OpenCLIP (`resblocks`, fused `in_proj`, `text_projection` transposed)."""
    out = {}
    for key, value in sd.items():
        if re.fullmatch(r".+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            continue  # fused with q below
        if m := re.fullmatch(r"(.+)\.self_attn\.q_proj\.(weight|bias)", key):
            value = torch.cat([sd[f"{m[1]}.self_attn.{c}_proj.{m[2]}"] for c in "qkv"])
            key = f"{m[1]}.self_attn.in_proj_{m[2]}"
        if key == "text_projection.weight":
            key, value = "text_projection", value.T.contiguous()
        for a, b in _OPEN_CLIP:
            key = key.replace(a, b)
        out[prefix + key.replace(".self_attn.", ".attn.")] = value
    return out


def _component(folder: Path, name: str) -> Tensors:
    file = UNET_FILE if (folder / name / UNET_FILE).exists() else "model.safetensors"
    return load_file(folder / name / file)


def _config(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "config.json").read_text())


def write_sd_checkpoint(folder: Path, out: Path, *, refiner: bool = False) -> Path:
    """An A1111-style single file of a diffusers SD1.5 / SDXL / SDXL-refiner folder."""
    sd = {
        **unet_to_ldm(_component(folder, "unet"), _config(folder, "unet")),
        **vae_to_ldm(_component(folder, "vae"), _config(folder, "vae")),
    }
    if refiner:  # the refiner has only OpenCLIP-G, as embedder 0
        sd.update(open_clip_to_ldm(_component(folder, "text_encoder_2"), "conditioner.embedders.0.model."))
    elif (folder / "text_encoder_2").exists():
        sd.update(clip_to_ldm(_component(folder, "text_encoder"), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(_component(folder, "text_encoder_2"), "conditioner.embedders.1.model."))
    else:
        sd.update(clip_to_ldm(_component(folder, "text_encoder"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in sd.items()}, out)
    return out


def write_flux_checkpoint(folder: Path, out: Path, prefix: str = "") -> Path:
    """A BFL-style FLUX.1 file: the transformer only."""
    sd = flux_to_bfl(_component(folder, "transformer"))
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, out)
    return out


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a single file must never reach for a hub: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def folders(demo_root: Path) -> dict[str, Path]:
    return {kind: demo.ensure_demo_model(kind, demo_root) for kind in ("sd15", "sdxl", "flux")}


@pytest.fixture(scope="module")
def files(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single-files")
    return {
        "sd15": write_sd_checkpoint(folders["sd15"], out / "tiny-sd15.safetensors"),
        "sdxl": write_sd_checkpoint(folders["sdxl"], out / "tiny-sdxl.safetensors"),
        # ComfyUI saves FLUX with the ldm prefix; BFL's own files have none: cover both.
        "flux": write_flux_checkpoint(folders["flux"], out / "tiny-flux.safetensors", prefix="model.diffusion_model."),
    }


def _load(family: str, source: Path, config: Path, variant: str | None = None) -> LoadedModel:
    spec = ModelSpec(id=f"file-{family}", family=family, source=str(source), config=str(config), variant=variant)
    return adapter_for(family).load(spec, str(source), torch.device("cpu"), torch.float32)


def _generate(loaded: LoadedModel, task: Task = Task.TXT2IMG, **kw: object) -> np.ndarray:
    req = GenerationRequest(
        model=loaded.spec.id, prompt="a red fox in snow", negative_prompt="blurry", task=task,
        width=64, height=64, steps=2, guidance=3.5, **kw,
    )  # fmt: skip
    images = adapter_for(loaded.spec.family).run(loaded, req, [7], None, lambda step, total: False)
    return np.asarray(images[0], dtype=np.int16)


def _assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()  # identical weights: at most uint8 rounding differs
    assert a.std() > 1  # a real picture (noise), not a constant


# --- the writers are exact inverses of diffusers' converters -----------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ldm_writers_invert_diffusers_converters(folders: dict[str, Path], kind: str) -> None:
    folder = folders[kind]
    for name, to_ldm, convert in (
        ("unet", unet_to_ldm, convert_ldm_unet_checkpoint),
        ("vae", vae_to_ldm, convert_ldm_vae_checkpoint),
    ):
        original, config = _component(folder, name), _config(folder, name)
        back = convert(to_ldm(original, config), config)
        assert back.keys() == original.keys(), name
        assert all(torch.equal(back[k], original[k]) for k in original), name
    if kind == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        original = te2.state_dict()
        back = convert_open_clip_checkpoint(te2, open_clip_to_ldm(original, "m."), prefix="m.")
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original)


def test_flux_converter_matches_diffusers_at_full_width() -> None:
    """`convert_flux_to_diffusers` is diffusers' mapping (which hard-codes width 3072) for any width: at 3072 both
    agree exactly. Thin tensors (second dim 1) keep this cheap: the mapping only looks at the first dimension."""
    g = torch.Generator().manual_seed(0)
    inner, mlp = 3072, 4 * 3072

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    bfl = {"img_in.weight": t(inner, 1), "img_in.bias": t(inner)}
    for name, rows in [
        ("txt_in", 8), ("time_in.in_layer", 8), ("time_in.out_layer", 8), ("vector_in.in_layer", 8),
        ("vector_in.out_layer", 8), ("guidance_in.in_layer", 8), ("guidance_in.out_layer", 8),
        ("final_layer.linear", 8), ("final_layer.adaLN_modulation.1", 8),
        ("double_blocks.0.img_mod.lin", 12), ("double_blocks.0.txt_mod.lin", 12),
        ("double_blocks.0.img_attn.qkv", 9), ("double_blocks.0.txt_attn.qkv", 9),
        ("double_blocks.0.img_mlp.0", 4), ("double_blocks.0.img_mlp.2", 4), ("double_blocks.0.txt_mlp.0", 4),
        ("double_blocks.0.txt_mlp.2", 4), ("double_blocks.0.img_attn.proj", 4), ("double_blocks.0.txt_attn.proj", 4),
        ("single_blocks.0.modulation.lin", 6), ("single_blocks.0.linear1", 3 * inner + mlp),
        ("single_blocks.0.linear2", 4),
    ]:  # fmt: skip
        bfl[f"{name}.weight"], bfl[f"{name}.bias"] = t(rows, 1), t(rows)
    for norm in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm"):
        bfl[f"double_blocks.0.{norm}.scale"] = t(2)
    bfl["double_blocks.0.txt_attn.norm.key_norm.scale"] = t(2)
    bfl["single_blocks.0.norm.query_norm.scale"], bfl["single_blocks.0.norm.key_norm.scale"] = t(2), t(2)

    ours = convert_flux_to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # The same table written backwards (`easel quantize`): exactly the BFL file again, with or without guidance.
    schnell = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    for original in (bfl, schnell):
        back = flux_to_bfl(convert_flux_to_diffusers(original))
        assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


# --- loading and generating ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_single_file_makes_the_same_pixels_as_the_diffusers_folder(
    family: str, folders: dict[str, Path], files: dict[str, Path], load_folder: Callable[[str], LoadedModel]
) -> None:
    expected_variant = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux-dev"}[family]
    assert detect_checkpoint(files[family]).variant == expected_variant
    loaded = _load(family, files[family], folders[family])
    _assert_same_pixels(_generate(loaded), _generate(load_folder(family)))


@pytest.fixture(scope="module")
def load_folder(folders: dict[str, Path]) -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def _load_folder(family: str) -> LoadedModel:
        if family not in cache:
            spec = ModelSpec(id=f"file-{family}", family=family, source=str(folders[family]))
            cache[family] = adapter_for(family).load(spec, str(folders[family]), torch.device("cpu"), torch.float32)
        return cache[family]

    return _load_folder


def test_engine_loads_a_scanned_file_with_configs_dir(
    folders: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    """The deployment path: a file in the checkpoints dir, its configs in <configs_dir>/<variant> (prefetched)."""
    ckpt_dir, configs = tmp_path / "Stable-diffusion", tmp_path / "configs"
    ckpt_dir.mkdir()
    configs.mkdir()
    shutil.copy(files["sd15"], ckpt_dir / "tiny.safetensors")
    (configs / "sd15").symlink_to(folders["sd15"], target_is_directory=True)
    registry = Registry([ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15")])
    registry.replace_scanned(scan_checkpoints(ckpt_dir).specs)  # no config: the engine's configs_dir supplies it
    spec = registry.resolve("tiny.safetensors")
    assert spec is not None and spec.config is None
    engine = Engine(registry, EngineConfig(device="cpu", preload_default=False, configs_dir=configs))
    loaded = engine._load_model(spec)
    assert loaded.spec.variant == "sd15" and loaded.spec.config == str(configs / "sd15")
    assert type(loaded.base).__name__ == "StableDiffusionPipeline"

    engine.config.configs_dir = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="prefetch-configs"):
        engine._load_model(spec)


def test_a_file_without_a_component_is_a_clear_error(folders: dict[str, Path], tmp_path: Path) -> None:
    full = load_file(write_sd_checkpoint(folders["sd15"], tmp_path / "full.safetensors"))
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")}, no_vae)
    with pytest.raises(CheckpointError, match="no-vae.safetensors"):
        _load("sd15", no_vae, folders["sd15"])


def test_flux_without_encoder_weights_says_how_to_get_them(
    folders: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    configs_only = tmp_path / "flux-dev"
    shutil.copytree(folders["flux"], configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(CheckpointError, match="--flux-encoders"):
        _load("flux", files["flux"], configs_only)


def test_family_mismatch_and_pickles_are_refused(
    files: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(Registry([ModelSpec(id="m", family="sd15", source="demo:sd15")]), EngineConfig(device="cpu"))
    wrong = ModelSpec(id="wrong", family="sd15", source=str(files["sdxl"]), config=str(folders["sdxl"]))
    with pytest.raises(ModelLoadError, match="SDXL.*family 'sd15'"):
        engine._load_model(wrong)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        engine._load_model(ModelSpec(id="p", family="sd15", source=str(ckpt)))


# --- the other variants: SDXL refiner, FLUX.1 Fill, FLUX.1 Kontext ------------------------------------------------


def _tiny_refiner(sdxl: Path, out: Path) -> Path:
    """SDXL's refiner layout at demo size: OpenCLIP-G only, aesthetic-score conditioning (5 time ids, not 6)."""
    base = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl)
    cfg = dict(base.unet.config)
    cfg.update(cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * cfg["addition_time_embed_dim"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out


def _tiny_fill(flux: Path, out: Path) -> Path:
    """FLUX.1 Fill at demo size: the transformer also takes the packed masked image and 8x8 mask (64 -> 384)."""
    shutil.copytree(flux, out)
    cfg = _config(flux, "transformer")
    cfg.update(in_channels=384, out_channels=64)
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config(cfg).save_pretrained(out / "transformer")
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    return out


def test_sdxl_refiner_single_file(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _tiny_refiner(folders["sdxl"], tmp_path / "refiner")
    file = write_sd_checkpoint(folder, tmp_path / "tiny-refiner.safetensors", refiner=True)
    assert detect_checkpoint(file).variant == "sdxl-refiner"
    loaded = _load("sdxl", file, folder)
    assert loaded.spec.variant is None  # detected at load time when models.yaml does not say
    assert isinstance(loaded.base, StableDiffusionXLImg2ImgPipeline) and loaded.base.text_encoder is None

    loaded.spec = loaded.spec.model_copy(update={"variant": "sdxl-refiner"})
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(UnsupportedTask, match="refiner"):
        adapter_for("sdxl").pipeline_for(loaded, Task.TXT2IMG)
    got = _generate(loaded, Task.IMG2IMG, init_images=[init], strength=0.5)
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    want = reference(
        prompt="a red fox in snow", negative_prompt="blurry", image=init, strength=0.5, num_inference_steps=2,
        guidance_scale=3.5, generator=torch.Generator().manual_seed(7),
    ).images[0]  # fmt: skip
    _assert_same_pixels(got, np.asarray(want, dtype=np.int16))


def test_flux_fill_single_file(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _tiny_fill(folders["flux"], tmp_path / "fill")
    file = write_flux_checkpoint(folder, tmp_path / "tiny-fill.safetensors")
    assert detect_checkpoint(file).variant == "flux-fill"
    spec = ModelSpec(id="fill", family="flux", source=str(file), config=str(folder), variant="flux-fill")
    pipe = load_pipeline(spec, file, torch.float32)
    assert isinstance(pipe, FluxFillPipeline)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(prompt="a cat", image=image, mask_image=mask, width=64, height=64, num_inference_steps=2)
    got = pipe(**kw, generator=torch.Generator().manual_seed(3), output_type="np").images
    want = FluxFillPipeline.from_pretrained(folder)(**kw, generator=torch.Generator().manual_seed(3), output_type="np")
    assert np.abs(got - want.images).max() < 1e-4


def test_flux_kontext_is_named_and_edits_with_the_kontext_pipeline(
    folders: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    file = tmp_path / "flux1-kontext-tiny.safetensors"
    shutil.copy(files["flux"], file)
    assert detect_checkpoint(file).variant == "flux-kontext"  # same keys as dev: the name decides
    config = shutil.copytree(folders["flux"], tmp_path / "flux-kontext")  # as prefetched: Kontext's model_index
    index = json.loads((config / "model_index.json").read_text())
    (config / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    loaded = _load("flux", file, config, variant="flux-kontext")
    assert isinstance(loaded.base, FluxPipeline)
    assert isinstance(adapter_for("flux").pipeline_for(loaded, Task.IMG2IMG), FluxKontextPipeline)
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    got = _generate(loaded, Task.IMG2IMG, init_images=[init])
    reference = FluxKontextPipeline.from_pretrained(folders["flux"])
    want = reference(
        prompt="a red fox in snow", image=init, width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(7), max_area=64 * 64, _auto_resize=False,
    ).images[0]  # fmt: skip
    _assert_same_pixels(got, np.asarray(want, dtype=np.int16))  # the requested size, not Kontext's default ~1 MP


def test_unidentifiable_file_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, junk)
    with pytest.raises(CheckpointError, match=r"mystery\.safetensors.*cannot identify"):
        load_pipeline(ModelSpec(id="j", family="sd15", source=str(junk), config=str(tmp_path)), junk, torch.float32)
    loaded_ae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    save_file({k: v.contiguous() for k, v in loaded_ae.state_dict().items()}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="VAE"):
        detect_checkpoint(tmp_path / "vae.safetensors")
