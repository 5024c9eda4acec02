"""The checkpoints directory: header-only detection, A1111 titles and hashes, the hash cache, rescans, pickle refusal,
and the `prefetch-configs` plan (never run here: no network)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipelines import checkpoints
from pipelines.checkpoints import (
    PICKLE_REFUSAL,
    CheckpointError,
    HashCache,
    detect_checkpoint,
    find_pickle_weights,
    refresh_registry,
    resolve_single_file,
    scan_checkpoints,
)
from pipelines.prefetch import CONFIG_PATTERNS, FLUX_ENCODER_PATTERNS, link_flux_encoders, prefetch_plan, run_prefetch
from pipelines.registry import ModelSpec, Registry, load_registry
from server.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[2]
U = "model.diffusion_model."


def write(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with these keys and shapes (zeros: only the header matters to detection)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(s, dtype=np.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def unet(in_channels: int = 4, context: int = 768, label: int | None = None) -> dict[str, tuple[int, ...]]:
    shapes = {
        U + "input_blocks.0.0.weight": (8, in_channels, 3, 3),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, context),
        U + "out.2.weight": (4, 8, 3, 3),
    }
    if label:
        shapes[U + "label_emb.0.0.weight"] = (8, label)
    return shapes


SD15 = {**unet(), "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)}
SD2 = {**unet(context=1024), "cond_stage_model.model.positional_embedding": (77, 8)}
SDXL = {
    **unet(context=2048, label=2816),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
    "conditioner.embedders.1.model.positional_embedding": (77, 8),
}
REFINER = {**unet(context=1280, label=2560), "conditioner.embedders.0.model.text_projection": (8, 8)}


def flux(in_channels: int = 64, guidance: bool = True, prefix: str = "") -> dict[str, tuple[int, ...]]:
    shapes = {
        "double_blocks.0.img_attn.qkv.weight": (24, 8),
        "single_blocks.0.linear1.weight": (56, 8),
        "img_in.weight": (8, in_channels),
        "final_layer.linear.weight": (64, 8),
    }
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (8, 256)
    return {prefix + k: v for k, v in shapes.items()}


@pytest.mark.parametrize(
    "name, shapes, variant",
    [
        ("a.safetensors", SD15, "sd15"),
        ("a.safetensors", SD2, "sd2"),
        ("a.safetensors", SDXL, "sdxl"),
        ("a.safetensors", REFINER, "sdxl-refiner"),
        ("a.safetensors", flux(), "flux-dev"),
        ("a.safetensors", flux(prefix=U), "flux-dev"),  # ComfyUI's prefix
        ("a.safetensors", flux(guidance=False), "flux-schnell"),
        ("a.safetensors", flux(in_channels=384), "flux-fill"),
        ("flux1-Kontext-dev.safetensors", flux(), "flux-kontext"),
        # UNet-only files: the conditioning widths decide (real sizes only)
        ("a.safetensors", unet(), "sd15"),
        ("a.safetensors", unet(context=1024), "sd2"),
        ("a.safetensors", unet(context=2048, label=2816), "sdxl"),
        ("a.safetensors", unet(context=1280, label=2560), "sdxl-refiner"),
    ],
)
def test_detects_the_architecture_from_the_header(tmp_path: Path, name: str, shapes: dict, variant: str) -> None:
    assert detect_checkpoint(write(tmp_path / name, shapes)).variant == variant


def test_kontext_can_be_named_in_the_metadata(tmp_path: Path) -> None:
    file = write(tmp_path / "model.safetensors", flux(), {"modelspec.title": "FLUX.1 Kontext [dev]"})
    assert detect_checkpoint(file).variant == "flux-kontext"


@pytest.mark.parametrize(
    "shapes, reason",
    [
        ({**SD15, **unet(in_channels=9)}, "inpainting"),
        (flux(in_channels=128), "Depth/Canny"),
        ({U + "joint_blocks.0.x_block.attn.qkv.weight": (3, 3), **unet()}, "Stable Diffusion 3"),
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "LoRA"),
        ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "VAE"),
        ({"foo.weight": (2, 2)}, "cannot identify"),
    ],
)
def test_unsupported_or_unknown_files_are_refused_with_the_reason(tmp_path: Path, shapes: dict, reason: str) -> None:
    file = write(tmp_path / "x.safetensors", shapes)
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*" + re.escape(reason)):
        detect_checkpoint(file)


def test_pickles_and_fake_safetensors_are_refused(tmp_path: Path) -> None:
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        with pytest.raises(CheckpointError, match="arbitrary code"):
            detect_checkpoint(tmp_path / f"m{suffix}")
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle under a safetensors name
    with pytest.raises(CheckpointError, match="renamed.safetensors: not a readable safetensors file"):
        detect_checkpoint(renamed)


def test_detection_reads_the_header_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoints.safe_open

    class NoTensors:
        def __init__(self, *args: object, **kwargs: object):
            self._f = real(*args, **kwargs)

        def __enter__(self) -> NoTensors:
            self._f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.__exit__(*exc)

        def keys(self) -> list[str]:
            return self._f.keys()

        def metadata(self) -> dict[str, str] | None:
            return self._f.metadata()

        def get_slice(self, key: str):  # shapes come from slices, which read nothing
            return self._f.get_slice(key)

        def get_tensor(self, key: str):
            raise AssertionError("detection must not read weights")

    monkeypatch.setattr(checkpoints, "safe_open", NoTensors)
    assert detect_checkpoint(write(tmp_path / "m.safetensors", SDXL)).variant == "sdxl"


# --- hashes and the cache -------------------------------------------------------------------------------------------


def test_hash_cache_hashes_once_and_notices_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(tmp_path / "m.safetensors", SD15)
    calls: list[Path] = []
    real = checkpoints.file_sha256
    monkeypatch.setattr(checkpoints, "file_sha256", lambda p: calls.append(Path(p)) or real(p))
    cache = HashCache.in_data_dir(tmp_path / "data")
    digest = cache.sha256(file)
    assert digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert cache.sha256(file) == digest and len(calls) == 1
    assert HashCache.in_data_dir(tmp_path / "data").sha256(file) == digest and len(calls) == 1  # persisted

    write(file, {**SD15, "extra": (3,)})  # a new version of the file
    assert cache.sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest() != digest
    assert len(calls) == 2

    (tmp_path / "data" / "hashes.json").write_text("{not json")
    assert HashCache.in_data_dir(tmp_path / "data").cached(file) is None  # corrupt cache: re-hash, no crash


# --- scanning the checkpoints directory ---------------------------------------------------------------------------


def test_scan_registers_files_with_a1111_titles(tmp_path: Path) -> None:
    root = tmp_path / "models" / "Stable-diffusion"
    sd = write(root / "v1-5-pruned-emaonly.safetensors", SD15)
    xl = write(root / "xl" / "My Model (v2).safetensors", SDXL)
    write(root / "xl" / "lora-by-mistake.safetensors", {"lora_te_text_model.lora_up.weight": (8, 4)})
    (root / "old.ckpt").write_bytes(b"pickle")
    (root / "v1-5-pruned-emaonly.png").write_bytes(b"preview")
    write(root / ".partial" / "download.safetensors", SD15)  # hidden: an unfinished download
    cache = HashCache.in_data_dir(tmp_path / "data")

    result = scan_checkpoints(root, cache=cache, configs_dir=tmp_path / "configs")

    by_name = {s.checkpoint_name: s for s in result.specs}
    assert list(by_name) == ["v1-5-pruned-emaonly.safetensors", "xl/My Model (v2).safetensors"]
    spec = by_name["xl/My Model (v2).safetensors"]
    sha = hashlib.sha256(xl.read_bytes()).hexdigest()
    assert spec.sha256 == sha and spec.short_hash == sha[:10]
    assert spec.title == f"xl/My Model (v2).safetensors [{sha[:10]}]"
    assert spec.model_name == "xl_My Model (v2)"
    assert spec.id == "xl_My_Model_v2"
    assert (spec.family, spec.variant, spec.source) == ("sdxl", "sdxl", str(xl.resolve()))
    assert spec.config == str(tmp_path / "configs" / "sdxl")
    assert spec.defaults.width == 1024
    assert by_name["v1-5-pruned-emaonly.safetensors"].source == str(sd.resolve())
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert reasons["old.ckpt"] == PICKLE_REFUSAL
    assert "LoRA" in reasons["lora-by-mistake.safetensors"]
    assert set(reasons) == {"old.ckpt", "lora-by-mistake.safetensors"}


def test_scanned_models_resolve_by_every_a1111_name(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    write(root / "sub" / "dreamshaper_8.safetensors", SD15)
    registry = Registry([ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15")])
    refresh_registry(registry, root, cache=HashCache(tmp_path / "hashes.json"))
    spec = registry.get("sub_dreamshaper_8")
    for name in [
        spec.title,  # sub/dreamshaper_8.safetensors [hash]
        "sub/dreamshaper_8.safetensors",
        "sub_dreamshaper_8",  # model_name
        "dreamshaper_8",  # file stem
        spec.short_hash,
        spec.sha256,
        "sub/dreamshaper_8.safetensors [0123456789]",  # a title with another hash
    ]:
        assert registry.resolve(name) is spec, name


def test_rescans_swap_scanned_models_and_never_touch_models_yaml(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    yaml_file = write(tmp_path / "pinned.safetensors", SD15)
    yaml_models = [
        ModelSpec(id="demo-sd15", family="sd15", source="demo:sd15"),
        ModelSpec(id="clash", family="sd15", source="demo:sd15x"),
        ModelSpec(id="pinned", family="sd15", source=str(yaml_file)),
    ]
    registry = Registry(yaml_models, default_model="demo-sd15")
    write(root / "a.safetensors", SD15)
    write(root / "clash.safetensors", SD2)  # its id is taken by a models.yaml model
    (root / "pinned.safetensors").symlink_to(yaml_file)  # the same file models.yaml already serves

    added = refresh_registry(registry, root).specs
    assert {s.checkpoint_name for s in added} == {"a.safetensors", "clash.safetensors"}
    clash = registry.resolve("clash.safetensors")
    assert clash is not None and clash.id == f"clash-{clash.short_hash}" and clash.variant == "sd2"
    assert registry.resolve("clash").id == "clash"  # models.yaml keeps its names
    assert registry.scanned_ids == {"a", clash.id}

    (root / "a.safetensors").unlink()
    write(root / "b.safetensors", flux())
    refresh_registry(registry, root)
    assert registry.resolve("a.safetensors") is None
    assert registry.resolve("b.safetensors").variant == "flux-dev"
    assert {"demo-sd15", "clash", "pinned"} <= set(registry.models)
    assert registry.default_model == "demo-sd15"

    refresh_registry(registry, tmp_path / "missing")  # the directory is gone: only models.yaml remains
    assert set(registry.models) == {"demo-sd15", "clash", "pinned"}


def test_models_yaml_single_file_fields(tmp_path: Path) -> None:
    write(tmp_path / "weights" / "real.safetensors", SD15)
    sha = "ab" * 32
    (tmp_path / "models.yaml").write_text(
        "models:\n"
        "  real:\n    family: sd15\n    source: weights/real.safetensors\n    config: configs/sd15\n"
        f"    sha256: {sha}\n"
        "  kontext:\n    family: flux\n    source: weights/k.safetensors\n    variant: flux-kontext\n"
    )
    registry = load_registry(tmp_path / "models.yaml")
    real = registry.get("real")
    assert real.config == str(tmp_path / "configs" / "sd15")  # relative to models.yaml, like source
    assert real.is_single_file and real.sha256 == sha
    assert real.title == f"real.safetensors [{sha[:10]}]"
    assert registry.resolve("real.safetensors") is real
    assert registry.get("kontext").variant == "flux-kontext"

    (tmp_path / "bad.yaml").write_text(
        "models:\n  m:\n    family: sd15\n    source: x.safetensors\n    sha256: nothex\n"
    )
    with pytest.raises(Exception, match="model 'm': field 'sha256'"):
        load_registry(tmp_path / "bad.yaml")


def test_hash_single_files_fills_models_yaml_hashes(tmp_path: Path) -> None:
    file = write(tmp_path / "m.safetensors", SD15)
    registry = Registry([ModelSpec(id="m", family="sd15", source=str(file))])
    checkpoints.hash_single_files(registry, HashCache(tmp_path / "hashes.json"))
    assert registry.get("m").sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert registry.resolve(registry.get("m").title).id == "m"


# --- load-time checks (no weights are loaded here; test_single_file loads them) ----------------------------------


def test_resolve_single_file_finds_the_config_folder_or_says_what_to_do(tmp_path: Path) -> None:
    file = write(tmp_path / "m.safetensors", SDXL)
    spec = ModelSpec(id="m", family="sdxl", source=str(file))
    with pytest.raises(CheckpointError, match="configs_dir"):
        resolve_single_file(spec)
    with pytest.raises(CheckpointError, match="prefetch-configs.*stable-diffusion-xl-base-1.0"):
        resolve_single_file(spec, tmp_path / "configs")
    (tmp_path / "configs" / "sdxl").mkdir(parents=True)
    (tmp_path / "configs" / "sdxl" / "model_index.json").write_text("{}")
    ready = resolve_single_file(spec, tmp_path / "configs")
    assert (ready.variant, ready.config) == ("sdxl", str(tmp_path / "configs" / "sdxl"))
    with pytest.raises(CheckpointError, match="SDXL.*family 'sd15'"):
        resolve_single_file(spec.model_copy(update={"family": "sd15"}), tmp_path / "configs")


def test_pickle_weights_in_a_folder_are_found(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")  # preferred: the .bin is unused
    assert find_pickle_weights(tmp_path) == [tmp_path / "unet" / "diffusion_pytorch_model.bin"]


def test_engine_refuses_pickle_folders_unless_allowed(tmp_path: Path) -> None:
    from pipelines.engine import Engine, EngineConfig
    from pipelines.errors import ModelLoadError

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    spec = ModelSpec(id="p", family="sd15", source=str(tmp_path))
    engine = Engine(Registry([spec]), EngineConfig(device="cpu", preload_default=False))
    with pytest.raises(ModelLoadError, match="pickle weights.*allow_pickle"):
        engine._load_model(spec)
    with pytest.raises(Exception) as e:  # allowed: it gets past the check (and fails later: not a real model)
        engine._load_model(spec.model_copy(update={"allow_pickle": True}))
    assert "pickle weights" not in str(e.value)


def test_no_unsafe_torch_load_anywhere() -> None:
    """The security promise: nothing unpickles user files. Any torch.load must pass weights_only=True."""
    offenders = []
    for path in [*REPO_ROOT.glob("pipelines/**/*.py"), *REPO_ROOT.glob("server/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}")
    assert not offenders


# --- prefetch-configs (the plan only: no network in tests) ---------------------------------------------------------


def test_prefetch_plan_covers_every_variant_from_the_official_repos(tmp_path: Path) -> None:
    plan = prefetch_plan(tmp_path)
    assert {i.variant: i.repo for i in plan} == {
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd2": "stabilityai/stable-diffusion-2-1",
        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
        "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
        "flux-dev": "black-forest-labs/FLUX.1-dev",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
        "flux-fill": "black-forest-labs/FLUX.1-Fill-dev",
        "flux-kontext": "black-forest-labs/FLUX.1-Kontext-dev",
        # single-file ControlNets' config.json (pipelines.controlnet.SINGLE_FILE_CONFIGS)
        "controlnet-sd15": "lllyasviel/control_v11p_sd15_canny",
        "controlnet-sdxl": "diffusers/controlnet-canny-sdxl-1.0",
    }
    for item in plan:
        assert item.local_dir == tmp_path / item.variant
        # configs, tokenizers, scheduler (a ControlNet: its config.json): no weights
        assert item.patterns == (("config.json",) if item.variant.startswith("controlnet-") else CONFIG_PATTERNS)
        assert not any(p.endswith((".safetensors", ".bin", ".ckpt")) for p in item.patterns)
    for needed in ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"):
        assert needed in CONFIG_PATTERNS


def test_prefetch_flux_encoders_come_once_from_schnell_and_are_linked(tmp_path: Path) -> None:
    plan = prefetch_plan(tmp_path, ["flux-dev", "flux-fill"], flux_encoders=True)
    assert [i.variant for i in plan] == ["flux-dev", "flux-schnell", "flux-fill"]
    assert [i.variant for i in plan if set(FLUX_ENCODER_PATTERNS) <= set(i.patterns)] == ["flux-schnell"]
    with pytest.raises(ValueError, match="unknown variant"):
        prefetch_plan(tmp_path, ["sd3"])

    calls = []

    def fake_download(repo_id: str, allow_patterns: list[str], local_dir: str) -> None:
        calls.append((repo_id, tuple(allow_patterns), local_dir))
        if repo_id.endswith("FLUX.1-schnell"):
            for c in ("vae", "text_encoder", "text_encoder_2"):
                (Path(local_dir) / c).mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / c / "model.safetensors").write_bytes(b"w")
        if repo_id.endswith("Fill-dev"):
            raise PermissionError("gated repo")

    failed = run_prefetch(plan, download=fake_download, log=lambda _: None)
    assert [c[0] for c in calls] == [i.repo for i in plan]
    assert [f[0].variant for f in failed] == ["flux-fill"]
    linked = tmp_path / "flux-dev" / "text_encoder_2" / "model.safetensors"
    assert linked.is_symlink() and linked.read_bytes() == b"w"
    assert link_flux_encoders(plan) == []  # idempotent


def test_prefetch_configs_cli_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["prefetch-configs", str(tmp_path), "--variant", "sdxl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stabilityai/stable-diffusion-xl-base-1.0" in out and str(tmp_path / "sdxl") in out
    assert not (tmp_path / "sdxl").exists()
    assert cli_main(["prefetch-configs", str(tmp_path), "--variant", "nope", "--dry-run"]) == 2
