"""LoRAs on the demo SD1.5 (and FLUX) pipelines: registry, `<lora:...>` activation, weights, baseline restored, bounded
adapter cache, batching key, engine wiring. LoRA files are made here from the demo models with PEFT."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug

import gc
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines import demo
from pipelines.batching import batch_key
from pipelines.engine import Engine, EngineConfig
from pipelines.errors import InvalidRequest
from pipelines.families import adapter_for
from pipelines.families.base import LoadedModel
from pipelines.lora import LoraManager, LoraNotFound, LoraRegistry, read_metadata
from pipelines.registry import ModelSpec, load_registry
from pipelines.request import GenerationRequest, LoraRef
from pipelines.sampler_names import resolve_sampler
from tests.lora_helpers import ATTN, prefixed, random_lora

TAGS = {"fox": 3, "snow": 1}


def _kohya(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same UNet LoRA with kohya / A1111 key names (lora_unet_<path>.lora_down/lora_up/alpha)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, kind = key.rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(4.0)
    return out


@pytest.fixture(scope="module")
def sd15_path(demo_root: Path) -> Path:
    return demo.ensure_demo_model("sd15", demo_root)


@pytest.fixture(scope="module")
def lora_dir(sd15_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111-style Lora folder: diffusers-format and kohya-format files, a subfolder, a text-encoder LoRA, junk."""
    root = tmp_path_factory.mktemp("Lora")
    (root / "sub").mkdir()
    unet = lambda: UNet2DConditionModel.from_pretrained(sd15_path / "unet")  # noqa: E731
    a = random_lora(unet(), ATTN, seed=1)
    meta = {"ss_output_name": "StyleA", "ss_tag_frequency": json.dumps(TAGS)}
    save_file(prefixed("unet", a), root / "style_a.safetensors", metadata=meta)
    save_file(prefixed("unet", random_lora(unet(), ATTN, seed=2)), root / "sub" / "style_b.safetensors")
    save_file(_kohya(a), root / "kohya_a.safetensors")
    te = random_lora(CLIPTextModel.from_pretrained(sd15_path / "text_encoder"), ["q_proj", "v_proj"], seed=3)
    both = {**prefixed("unet", random_lora(unet(), ATTN, seed=4)), **prefixed("text_encoder", te)}
    save_file(both, root / "both.safetensors")
    (root / "readme.txt").write_text("not a LoRA")
    (root / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    return root


def _load(sd15_path: Path, lora_dir: Path | None, max_loaded: int = 8) -> LoadedModel:
    spec = ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15")
    loaded = adapter_for("sd15").load(spec, str(sd15_path), torch.device("cpu"), torch.float32)
    if lora_dir is not None:
        loaded.loras = LoraManager(loaded.base, LoraRegistry(lora_dir), max_loaded=max_loaded)
    return loaded


@pytest.fixture(scope="module")
def loaded(sd15_path: Path, lora_dir: Path) -> LoadedModel:
    return _load(sd15_path, lora_dir)


def _image(loaded: LoadedModel, prompt: str = "a red fox ", loras=(), steps: int = 2, family: str = "sd15"):
    req = GenerationRequest(
        model=f"demo-{family}", prompt=prompt, loras=list(loras), width=64, height=64, steps=steps, guidance=4.0
    )
    with torch.inference_mode():  # as the engine calls it
        (im,) = adapter_for(family).run(loaded, req, [7], None, lambda i, n: False)
    return np.asarray(im, dtype=np.int16)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --- registry ---------------------------------------------------------------------------------------------------------


def test_registry_lists_a1111_shape(lora_dir: Path, tmp_path: Path) -> None:
    reg = LoraRegistry(lora_dir)
    listing = {e["name"]: e for e in reg.list()}
    assert set(listing) == {"style_a", "style_b", "kohya_a", "both"}  # safetensors only, the broken file skipped
    a = listing["style_a"]
    assert set(a) == {"name", "alias", "path", "metadata"}
    assert a["alias"] == "StyleA" and Path(a["path"]) == lora_dir / "style_a.safetensors"
    assert a["metadata"]["ss_tag_frequency"] == TAGS  # JSON-looking metadata is decoded, as A1111 does
    assert listing["style_b"]["alias"] == "style_b" and Path(listing["style_b"]["path"]).parent.name == "sub"
    assert reg.get("StyleA") is reg.get("style_a")  # by alias too
    assert reg.get("nope") is None
    short = reg.shorthash("style_a")
    assert short is not None and len(short) == 12 and int(short, 16) >= 0

    # Refresh: a file dropped in later is found (on demand, or by scan), a removed one disappears.
    later = LoraRegistry(tmp_path)
    assert later.list() == []
    shutil.copy(lora_dir / "style_a.safetensors", tmp_path / "new one.safetensors")
    assert later.get("new one") is not None
    (tmp_path / "new one.safetensors").unlink()
    assert later.scan() == [] and later.get("new one") is None
    assert read_metadata(lora_dir / "kohya_a.safetensors") == {}


def test_missing_directory_lists_nothing(tmp_path: Path) -> None:
    assert LoraRegistry(tmp_path / "absent").list() == [] and LoraRegistry(None).list() == []


# --- applying ---------------------------------------------------------------------------------------------------------


def test_lora_changes_the_output_with_weight_and_goes_away(loaded: LoadedModel) -> None:
    base = _image(loaded)
    full = _image(loaded, "a red fox <lora:style_a:1>")
    half = _image(loaded, "a red fox ", [LoraRef("style_a", 0.5)])
    assert _diff(full, base) > _diff(half, base) > 0
    assert np.array_equal(_image(loaded, "a red fox <lora:style_a:0>"), base)  # weight 0 = the bare model
    assert np.array_equal(_image(loaded), base)  # removed: back to the baseline pixels
    assert np.array_equal(_image(loaded, "a red fox <lora:StyleA:1>"), full)  # by alias; cached adapter reused
    kohya = _image(loaded, "a red fox <lora:kohya_a:1>")  # A1111/kohya key names, converted by diffusers
    assert np.abs(kohya - full).max() <= 1
    two = _image(loaded, "a red fox <lora:style_a:1><lora:style_b:1>")
    assert _diff(two, full) > 0 and _diff(two, _image(loaded, "a red fox <lora:style_b:1>")) > 0
    assert np.array_equal(_image(loaded), base)


def test_text_encoder_and_unet_multipliers(loaded: LoadedModel) -> None:
    base = _image(loaded)
    te_only = _image(loaded, "a red fox <lora:both:1:0>")  # A1111 <lora:name:te:unet>
    unet_only = _image(loaded, "a red fox <lora:both:0:1>")
    full = _image(loaded, "a red fox <lora:both:1>")
    assert _diff(te_only, base) > 0 and _diff(unet_only, base) > 0
    assert _diff(full, te_only) > 0 and _diff(full, unet_only) > 0
    assert np.array_equal(_image(loaded, "a red fox <lora:both:0:0>"), base)


def test_unknown_lora_and_no_lora_dir_are_request_errors(loaded: LoadedModel, sd15_path: Path) -> None:
    with pytest.raises(LoraNotFound) as err:
        _image(loaded, "a <lora:does_not_exist:1>")
    assert err.value.field == "loras" and "does_not_exist" in str(err.value)
    bare = _load(sd15_path, None)
    with pytest.raises(InvalidRequest, match="no Lora directory"):
        _image(bare, "a <lora:style_a:1>")
    _image(bare, "a red fox")  # no tag, no manager: fine


def test_missing_loras_are_left_out_when_the_dialect_asks(loaded: LoadedModel, sd15_path: Path) -> None:
    """A1111 (`skip_missing_loras`): a LoRA that is not there is left out, the others still apply."""

    def image(model: LoadedModel, prompt: str) -> np.ndarray:
        req = GenerationRequest(model="demo-sd15", prompt=prompt, width=64, height=64, steps=2, guidance=4.0,
                                skip_missing_loras=True)  # fmt: skip
        with torch.inference_mode():
            (im,) = adapter_for("sd15").run(model, req, [7], None, lambda i, n: False)
        return np.asarray(im, dtype=np.int16)

    with_style = _image(loaded, "a red fox <lora:style_a:1>")
    assert np.array_equal(image(loaded, "a red fox <lora:style_a:1><lora:does_not_exist:0.5>"), with_style)
    assert np.array_equal(image(loaded, "a red fox <lora:does_not_exist:1>"), _image(loaded))
    bare = _load(sd15_path, None)  # no Lora folder at all: every LoRA is missing
    assert np.array_equal(image(bare, "a red fox <lora:style_a:1>"), _image(bare))


def _tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated torch module attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_alternating_loras_do_not_grow_memory(sd15_path: Path, lora_dir: Path) -> None:
    loaded = _load(sd15_path, lora_dir, max_loaded=1)  # its own pipeline: every switch unloads and loads
    manager = loaded.loras
    assert manager is not None
    unet = loaded.base.unet
    base = _image(loaded, steps=1)
    bare_params = sum(p.numel() for p in unet.parameters())
    first: dict[str, np.ndarray] = {}
    params, tensors = [], []
    for i in range(50):
        name = ("style_a", "style_b")[i % 2]
        image = _image(loaded, f"a red fox <lora:{name}:1>", steps=1)
        np.testing.assert_array_equal(image, first.setdefault(name, image))  # swapping back reproduces exactly
        params.append(sum(p.numel() for p in unet.parameters()))
        if i in (9, 49):
            tensors.append(_tensor_count())
    assert manager.loads == 50 and len(manager.loaded_adapters) == 1
    assert loaded.base.get_list_adapters() == {"unet": manager.loaded_adapters}
    assert params[0] > bare_params and len(set(params)) == 1  # one adapter's worth, never more
    assert tensors[1] <= tensors[0]  # nothing accumulates across swaps
    np.testing.assert_array_equal(_image(loaded, steps=1), base)

    manager.max_loaded = 2  # room for both: alternating now hits the cache
    for i in range(6):
        _image(loaded, f"a red fox <lora:{('style_a', 'style_b')[i % 2]}:1>", steps=1)
    assert manager.loads == 51 and len(manager.loaded_adapters) == 2
    manager.clear()
    assert sum(p.numel() for p in unet.parameters()) == bare_params
    np.testing.assert_array_equal(_image(loaded, steps=1), base)


def test_flux_lora(demo_root: Path, tmp_path: Path) -> None:
    path = demo.ensure_demo_model("flux", demo_root)
    transformer = FluxTransformer2DModel.from_pretrained(path / "transformer")
    save_file(prefixed("transformer", random_lora(transformer, ATTN, seed=5)), tmp_path / "flux_style.safetensors")
    spec = ModelSpec(id="demo-flux", family="flux", source="demo:flux")
    loaded = adapter_for("flux").load(spec, str(path), torch.device("cpu"), torch.float32)
    loaded.loras = LoraManager(loaded.base, LoraRegistry(tmp_path))
    base = _image(loaded, "a red fox ", family="flux")
    styled = _image(loaded, "(a red fox:1.3) <lora:flux_style:1>", family="flux")
    assert _diff(styled, base) > 0
    # Weights are stripped for FLUX's encoders: only the LoRA made the difference.
    assert np.array_equal(
        _image(loaded, "(a red fox:1.3) BREAK", family="flux"), _image(loaded, "a red fox", family="flux")
    )
    assert np.array_equal(_image(loaded, "a red fox ", family="flux"), base)


def test_sdxl_lora_on_the_unet_and_both_text_encoders(demo_root: Path, tmp_path: Path) -> None:
    path = demo.ensure_demo_model("sdxl", demo_root)
    unet = random_lora(UNet2DConditionModel.from_pretrained(path / "unet"), ATTN, seed=6)
    te1 = random_lora(CLIPTextModel.from_pretrained(path / "text_encoder"), ["q_proj", "v_proj"], seed=7)
    te2 = random_lora(
        CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2"), ["q_proj", "v_proj"], seed=8
    )
    save_file(prefixed("unet", unet), tmp_path / "xl_unet.safetensors")
    save_file({**prefixed("text_encoder", te1), **prefixed("text_encoder_2", te2)}, tmp_path / "xl_te.safetensors")
    spec = ModelSpec(id="demo-sdxl", family="sdxl", source="demo:sdxl")
    loaded = adapter_for("sdxl").load(spec, str(path), torch.device("cpu"), torch.float32)
    loaded.loras = LoraManager(loaded.base, LoraRegistry(tmp_path))
    base = _image(loaded, family="sdxl")
    with_unet = _image(loaded, "a red fox <lora:xl_unet:1>", family="sdxl")
    with_te = _image(loaded, "a red fox <lora:xl_te:1>", family="sdxl")
    assert _diff(with_unet, base) > 0 and _diff(with_te, base) > 0 and _diff(with_unet, with_te) > 0
    adapters = loaded.base.get_list_adapters()
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(adapters)
    assert np.array_equal(_image(loaded, family="sdxl"), base)


def test_flux_lora_on_the_clip_text_encoder(demo_root: Path, tmp_path: Path) -> None:
    path = demo.ensure_demo_model("flux", demo_root)
    te = random_lora(CLIPTextModel.from_pretrained(path / "text_encoder"), ["q_proj", "v_proj"], seed=9)
    save_file(prefixed("text_encoder", te), tmp_path / "flux_te.safetensors")
    spec = ModelSpec(id="demo-flux", family="flux", source="demo:flux")
    loaded = adapter_for("flux").load(spec, str(path), torch.device("cpu"), torch.float32)
    loaded.loras = LoraManager(loaded.base, LoraRegistry(tmp_path))
    base = _image(loaded, family="flux")
    assert _diff(_image(loaded, "a red fox <lora:flux_te:1>", family="flux"), base) > 0
    assert np.array_equal(_image(loaded, family="flux"), base)


# --- batching and engine ----------------------------------------------------------------------------------------------


def test_batch_key_separates_lora_sets() -> None:
    choice = resolve_sampler("Euler")

    def key(**kw) -> object:
        return batch_key("job", GenerationRequest(model="m", **{"prompt": "a", **kw}), choice)

    assert key(prompt="a <lora:x:1>") == key(prompt="a", loras=[LoraRef("x", 1.0)])
    assert key(prompt="a <lora:x:1>") != key(prompt="a <lora:x:0.5>")
    assert key(prompt="a <lora:x:1>") != key(prompt="a")
    assert key(prompt="b") == key(prompt="a")  # prompts still batch together
    assert key(negative_prompt="<lora:x:1>") == key(negative_prompt="")  # a tag-only negative is empty


def test_engine_applies_prompt_loras(data_dir: Path, lora_dir: Path, tmp_path: Path) -> None:
    yaml = tmp_path / "models.yaml"
    yaml.write_text("models:\n  demo-sd15:\n    family: sd15\n    source: demo:sd15\n")
    engine = Engine(load_registry(yaml), EngineConfig(data_dir=data_dir, lora_dir=lora_dir, preload_default=False))
    engine.start()
    try:
        req = dict(model="demo-sd15", width=64, height=64, steps=2, seed=5)
        plain = engine.submit(GenerationRequest(prompt="a red fox ", **req)).wait_sync(120)
        styled = engine.submit(GenerationRequest(prompt="a red fox <lora:style_a:1>", **req)).wait_sync(120)
        again = engine.submit(GenerationRequest(prompt="a red fox ", **req)).wait_sync(120)
    finally:
        engine.stop()
    px = [np.asarray(r.images[0], dtype=np.int16) for r in (plain, styled, again)]
    assert _diff(px[1], px[0]) > 0 and np.array_equal(px[2], px[0])
