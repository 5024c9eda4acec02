"""Tiny random-weight diffusers pipelines built fully in code, so every family runs offline.

Each demo model has the real architecture *shape* of its family where it matters to callers (VAE spatial factor,
latent channels, patch size, scheduler config, tokenizer classes, pipeline class) and tiny widths everywhere else,
so it loads through the same `from_pretrained` path as a real checkpoint and runs in seconds on CPU. The pictures
are noise. Tokenizers are made locally (byte-level BPE without merges, a char-level unigram for T5): nothing is
ever fetched from a hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    ControlNetModel,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImageControlNetModel,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from tokenizers import AddedToken, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.utils import is_torchvision_available
from transformers.utils import logging as transformers_logging

from pipelines.families.qwen import ImageOnlyQwen2VLProcessor

log = logging.getLogger("easel.demo")

DEMO_KINDS: tuple[str, ...] = ("sd15", "sdxl", "flux", "qwen-image", "qwen-image-edit")

# Bump when the demo architecture changes: folders built by an older version are rebuilt.
DEMO_VERSION = 3
MARKER = ".easel-demo.json"
_LOCK = ".easel-demo.lock"

_SEED = 0
_VL_MIN_PIXELS = 56 * 56
_VL_MAX_PIXELS = 256 * 256
# Byte-level BPE alphabet (the 256 printable stand-ins for bytes): any unicode text maps onto it.
_BYTES: list[str] = sorted(pre_tokenizers.ByteLevel.alphabet())
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# --- tokenizers ---------------------------------------------------------------------------------------------------


def _clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP byte-level BPE with no merges: every byte is a token (`x`, or `x</w>` at the end of a word).

    Special tokens get the highest ids, as in real CLIP, so pooling by argmax(input_ids) also finds the EOS.
    """
    vocab = {c: i for i, c in enumerate(_BYTES)}
    vocab.update({c + "</w>": len(_BYTES) + i for i, c in enumerate(_BYTES)})
    for special in ("<|startoftext|>", "<|endoftext|>", pad_token):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=max_length)


def _t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """Char-level unigram: printable ASCII pieces, anything else becomes <unk> (T5's own behaviour for rare chars)."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, additional_special_tokens=[], model_max_length=max_length)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE with no merges plus the chat/vision special tokens the Qwen-Image templates use."""
    vocab = {c: i for i, c in enumerate(_BYTES)}
    for special in _QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS])
    return tok


# --- text encoders ------------------------------------------------------------------------------------------------


def _clip_config(tok: CLIPTokenizer, hidden: int = 32, layers: int = 2, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _seeded(seed: int = _SEED) -> None:
    torch.manual_seed(seed)


# --- VAEs -----------------------------------------------------------------------------------------------------------


def _sd_vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    # 4 levels -> 3 downsamples -> spatial factor 8, like every SD/SDXL/FLUX VAE; tiny channel counts.
    _seeded()
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        **kwargs,
    )


# --- families -------------------------------------------------------------------------------------------------------


def _sd15() -> DiffusionPipeline:
    tok = _clip_tokenizer()
    _seeded()
    text_encoder = CLIPTextModel(_clip_config(tok))
    _seeded()
    # No attention at the full latent resolution: keeps a 512x512 20-step run within a few CPU seconds.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' legacy name: the head *count*; few wide heads are much faster on CPU
        norm_num_groups=32,
    )
    vae = _sd_vae(sample_size=512, scaling_factor=0.18215)
    # SD1.5's own scheduler config (PNDM, scaled_linear betas, steps_offset 1).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl() -> DiffusionPipeline:
    tok = _clip_tokenizer()
    tok_2 = _clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    _seeded()
    text_encoder = CLIPTextModel(_clip_config(tok))
    _seeded(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tok_2, projection_dim=32))
    time_dim = 8
    _seeded()
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 32,  # both encoders' hidden states concatenated
        attention_head_dim=(2, 2),  # head counts per level
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,  # pooled text + 6 size/crop ids
        norm_num_groups=32,
    )
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _flux() -> DiffusionPipeline:
    tok = _clip_tokenizer()
    tok_2 = _t5_tokenizer()
    _seeded()
    text_encoder = CLIPTextModel(_clip_config(tok))
    _seeded()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok_2.pad_token_id,
            eos_token_id=tok_2.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    _seeded()
    # 16 latent channels packed 2x2 -> 64 input channels, as FLUX.1; rope axes sum to the head dim.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev style distilled guidance
        axes_dims_rope=(4, 6, 6),
    )
    vae = _sd_vae(
        latent_channels=16,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # FLUX.1-dev scheduler config (resolution-dependent shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


def _qwen_components() -> dict:
    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    hidden = 32
    _seeded()
    # Tiny text tower AND tiny vision tower: the edit pipeline feeds the input image through the VL encoder.
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    _seeded()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    _seeded()
    # Real layout (4 levels, 3 downsamples -> factor 8, z_dim 16, Qwen's latents_mean/std), tiny widths: the edit
    # pipeline VAE-encodes its input at ~1 MP whatever the output size, with 3x3x3 convs.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    # Qwen-Image scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tok,
        "transformer": transformer,
    }


def _qwen_image() -> DiffusionPipeline:
    return QwenImagePipeline(**_qwen_components())


def _qwen_processor(tok: Qwen2Tokenizer) -> Qwen2VLProcessor:
    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor as image_cls
    else:
        from transformers import Qwen2VLImageProcessorPil as image_cls
    # Cap the vision tokens the edit pipeline makes from its ~1 MP input: the tiny VL tower stays cheap.
    image_processor = image_cls(min_pixels=_VL_MIN_PIXELS, max_pixels=_VL_MAX_PIXELS, patch_size=14, merge_size=2)
    # Image-only: a real video processor needs torchvision, which this machine may not have (see families.qwen).
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tok)


def _qwen_image_edit() -> DiffusionPipeline:
    comps = _qwen_components()
    pipe = QwenImageEditPipeline(**comps, processor=_qwen_processor(comps["tokenizer"]))
    # Saved under the standard class name, so the folder is laid out like a real Qwen-Image-Edit checkpoint.
    pipe.register_to_config(processor=("transformers", "Qwen2VLProcessor"))
    return pipe


def _finish_edit_processor(folder: Path) -> None:
    """Make `processor/` what `Qwen2VLProcessor.save_pretrained` writes: its class name and a video processor entry.

    With torchvision, the stock class loads it (and needs the video processor config); without, the image-only
    processor of `families.qwen.load_edit_processor` ignores both.
    """
    cfg_path = folder / "processor" / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = "Qwen2VLProcessor"
    image_cfg = cfg.get("image_processor", {})
    cfg["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2VLProcessor",
        **{k: image_cfg[k] for k in _SHARED_VIDEO_KEYS if k in image_cfg},
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "processor" / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    if "processor_class" in tok_cfg:
        tok_cfg["processor_class"] = "Qwen2VLProcessor"
        tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


_SHARED_VIDEO_KEYS = (
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "resample",
    "rescale_factor",
    "size",
    "temporal_patch_size",
)


_BUILDERS = {
    "sd15": _sd15,
    "sdxl": _sdxl,
    "flux": _flux,
    "qwen-image": _qwen_image,
    "qwen-image-edit": _qwen_image_edit,
}


# --- building on disk ---------------------------------------------------------------------------------------------


def _marker_ok(out_dir: Path, kind: str) -> bool:
    try:
        data = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("kind") == kind and data.get("version") == DEMO_VERSION


def build_demo_model(kind: str, out_dir: Path, make: Callable[[], Any] | None = None) -> Path:
    """Build the demo pipeline `kind` into `out_dir` (replacing it) and return `out_dir`, atomically
    (`_write_atomically`). Not safe against a concurrent build of the same folder: use `ensure_demo_model` for that.
    """
    if make is None and kind not in _BUILDERS:
        raise ValueError(f"unknown demo model kind '{kind}' (known: {', '.join(DEMO_KINDS)})")

    def write(folder: Path) -> None:
        (make or _BUILDERS[kind])().save_pretrained(folder, safe_serialization=True)
        if kind == "qwen-image-edit":
            _finish_edit_processor(folder)

    return _write_atomically(kind, Path(out_dir), write)


def _write_atomically(kind: str, out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write` the demo folder `kind` into a temp folder beside `out_dir`, rename it into place, then mark it complete:
    a crash leaves either nothing or an unmarked folder, never a marked half-written one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        with torch.random.fork_rng(devices=[]), _quiet_progress():  # fixed seeds, caller's RNG left alone
            write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():  # stale (unmarked or older version): move it aside in one step, then swap in
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    marker_tmp = out_dir / (MARKER + ".tmp")
    marker_tmp.write_text(json.dumps({"kind": kind, "version": DEMO_VERSION}))
    os.replace(marker_tmp, out_dir / MARKER)
    return out_dir


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Writing model shards" bars on the server's stderr while demo models are saved."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # serialises threads (separate open file descriptions) and processes
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_built(root: Path, kind: str, build: Callable[[Path], object]) -> Path:
    """`root/kind`, made by `build(out_dir)` unless it is there and marked. Safe when several threads or processes
    ask at once: checked again under the lock, as someone else may have built it while we waited."""
    out_dir = root / kind
    if _marker_ok(out_dir, kind):
        return out_dir
    with _locked(root):
        if not _marker_ok(out_dir, kind):
            build(out_dir)
    return out_dir


def ensure_demo_model(kind: str, root: Path) -> Path:
    """`root/kind`, built on first use. Safe when several threads or processes ask at once."""

    def build(out_dir: Path) -> None:
        started = time.perf_counter()
        log.info("building the demo model %s (tiny, random weights) into %s", kind, out_dir)
        build_demo_model(kind, out_dir)
        log.info("built the demo model %s in %.1f s", kind, time.perf_counter() - started)

    return _ensure_built(Path(root), kind, build)


# --- ControlNet ------------------------------------------------------------------------------------------------------

DEMO_CONTROLNET_FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")


def _demo_flux_controlnet(base_dir: Path) -> FluxControlNetModel:
    """A FLUX ControlNet shaped for the demo transformer (one double and one single block, copied from it); its
    zero-initialised projections get random weights so a control image changes the picture."""
    transformer = FluxTransformer2DModel.from_pretrained(base_dir / "transformer")
    _seeded(2)
    net = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
    )
    with torch.no_grad():
        for layer in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
            torch.nn.init.normal_(layer.weight, std=0.3)
            torch.nn.init.normal_(layer.bias, std=0.1)
    return net


def _demo_qwen_controlnet(base_dir: Path) -> QwenImageControlNetModel:
    """A Qwen-Image ControlNet shaped for the demo transformer (one block copied from it), zero projections made
    random as for FLUX."""
    transformer = QwenImageTransformer2DModel.from_pretrained(base_dir / "transformer")
    _seeded(2)
    net = QwenImageControlNetModel.from_transformer(
        transformer, num_layers=1, attention_head_dim=16, num_attention_heads=2
    )
    with torch.no_grad():
        for layer in [*net.controlnet_blocks, net.controlnet_x_embedder]:
            torch.nn.init.normal_(layer.weight, std=0.3)
            torch.nn.init.normal_(layer.bias, std=0.1)
    return net


def _demo_controlnet(base_dir: Path) -> ControlNetModel:
    """A ControlNet shaped for the demo UNet (copied from it, as real ones start). Its zero convolutions get
    random weights instead of zeros, so a control image visibly changes the demo's noise pictures."""
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    _seeded(2)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.1)
        # The hint's embedding keeps its scale through its layers (He init, no bias), so the picture follows the
        # control image rather than only the latents.
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
                torch.nn.init.zeros_(conv.bias)
        net.controlnet_cond_embedding.conv_out.weight.mul_(4.0)
    return net


def ensure_demo_controlnet(family: str, root: Path) -> Path:
    """`root/controlnet-<family>`: the demo model's tiny random-weight ControlNet, built (with the demo model) on
    first use. Safe when several threads or processes ask at once."""
    if family not in DEMO_CONTROLNET_FAMILIES:
        raise ValueError(f"no demo ControlNet for family '{family}'")
    root, kind = Path(root), f"controlnet-{family}"
    base = ensure_demo_model(family, root)  # takes the lock itself: not while we hold it
    make = {"flux": _demo_flux_controlnet, "qwen-image": _demo_qwen_controlnet}.get(family, _demo_controlnet)

    def build(out_dir: Path) -> None:
        log.info("building the demo ControlNet for %s into %s", family, out_dir)
        build_demo_model(kind, out_dir, make=lambda: make(base))

    return _ensure_built(root, kind, build)


# --- IP-Adapter -----------------------------------------------------------------------------------------------------


def _ip_hidden_size(unet: UNet2DConditionModel, name: str) -> int:
    """The channels of the block an attention processor sits in (diffusers' own rule when it loads IP-Adapters)."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def _build_demo_ip_adapter(base_dir: Path, out_dir: Path) -> None:
    """A tiny IP-Adapter for the demo UNet (image projection to 4 tokens, key/value layers for each cross-attention,
    in the single-file layout) and a tiny CLIP image encoder beside it."""
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    cross = unet.config.cross_attention_dim
    embed = 16
    _seeded(3)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=64,
            patch_size=16, projection_dim=embed,
        )
    )  # fmt: skip
    tensors = {
        "image_proj.proj.weight": torch.randn(cross * 4, embed) * 0.3,
        "image_proj.proj.bias": torch.zeros(cross * 4),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _ip_hidden_size(unet, name)
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.5
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.5
        key_id += 2
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "ip-adapter.safetensors")
    encoder.save_pretrained(out_dir / "image_encoder", safe_serialization=True)


def ensure_demo_ip_adapter(family: str, root: Path) -> Path:
    """`root/ip-adapter-<family>`: the demo model's tiny IP-Adapter and image encoder, built on first use."""
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"no demo IP-Adapter for family '{family}'")
    root, kind = Path(root), f"ip-adapter-{family}"
    base = ensure_demo_model(family, root)  # takes the lock itself: not while we hold it
    return _ensure_built(
        root, kind, lambda out_dir: _write_atomically(kind, out_dir, partial(_build_demo_ip_adapter, base))
    )


# --- background removal ---------------------------------------------------------------------------------------------

BACKGROUND_REMOVER_LABELS = {0: "background", 1: "foreground"}


def build_demo_background_remover(out_dir: Path) -> Path:
    """A tiny random-weight SegFormer (2 labels: background, foreground) and its image processor, saved as a local
    transformers folder for models.yaml's `background_removal:`. A wide weight init makes the random mask vary from
    pixel to pixel, as a real one does (tests see a per-pixel alpha, not one flat value)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    if is_torchvision_available():
        from transformers import SegformerImageProcessor as image_cls
    else:
        from transformers import SegformerImageProcessorPil as image_cls
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        initializer_range=1.0,
        id2label=BACKGROUND_REMOVER_LABELS,
        label2id={v: k for k, v in BACKGROUND_REMOVER_LABELS.items()},
    )
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]), _quiet_progress():
        _seeded()
        SegformerForSemanticSegmentation(config).eval().save_pretrained(out_dir, safe_serialization=True)
    image_cls(size={"height": 64, "width": 64}).save_pretrained(out_dir)
    return out_dir
