#!/usr/bin/env python
"""GPU benchmarks on full-size architectures with random weights (same shapes, hence the same FLOPs, as the real
checkpoints; nothing is downloaded: the configurations below are the published ones, tokenizers are built locally).

For each model: seconds per image at batch 1 and images per second saturated (batch sizes 1, 2, 4, ... until out of
memory or no more gain), for (a) plain diffusers defaults (fp16 SD/SDXL, bf16 FLUX/Qwen, default attention, no
compile) and (b) Easel's path (the family adapter's call, after `pipelines.optimize.apply_optimizations`, the same
as the engine), and the fraction of the compute limit reached: FLOPs per image (docs: shared reference
performance.md §1.3, at exactly these settings) / (seconds per image x peak TFLOP/s).

    python scripts/bench_gpu.py                      # all four models on CUDA, table + JSON to $OUT
    python scripts/bench_gpu.py --models sd15 flux   # a subset
    python scripts/bench_gpu.py --tiny               # the same harness on CPU with tiny configs (a smoke test)
    python scripts/bench_gpu.py --check-configs      # parameter counts of the full-size configs (meta device)
    python scripts/bench_gpu.py --save-sd15 DIR      # write a full-size random SD1.5 folder + models.yaml
                                                     # (for scripts/bench.py through the real server)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

# Local tokenizers (byte-level BPE without merges, char-level unigram for T5): never fetched from a hub. Prompt
# lengths in tokens therefore differ from the real tokenizers', which matters only where the text is not padded to a
# fixed length: Qwen-Image (about 180 text tokens here vs 128 in performance.md's count, ~+1.5 % FLOPs).
from pipelines.demo import _clip_tokenizer, _qwen_tokenizer, _t5_tokenizer

FAMILIES = ("sd15", "sdxl", "flux", "qwen-image")

# --- published configurations (config.json of each checkpoint's component folders) ---------------------------------

CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower: SD1.5 text_encoder, SDXL text_encoder, FLUX text_encoder
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
OPENCLIP_BIG_G = dict(  # laion/CLIP-ViT-bigG-14 text tower: SDXL text_encoder_2 (with projection)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(  # google/t5-v1_1-xxl encoder: FLUX text_encoder_2
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
QWEN25_VL_7B = dict(  # Qwen/Qwen-Image text_encoder = Qwen2.5-VL-7B-Instruct
    text=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
    vision=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
    ),
)
SD_VAE = dict(  # stable-diffusion-v1-5 vae (SDXL's has the same shapes)
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
FLUX_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SD15_UNET = dict(  # stable-diffusion-v1-5 unet: 859.5 M parameters
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
SDXL_UNET = dict(  # stable-diffusion-xl-base-1.0 unet: 2,567.5 M parameters
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
FLUX_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer: 11.90 B parameters
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
QWEN_IMAGE_TRANSFORMER = dict(  # Qwen/Qwen-Image transformer: 20.43 B parameters
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)

FULL: dict[str, dict[str, Any]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIG_G},
    "flux": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "qwen-image": {"transformer": QWEN_IMAGE_TRANSFORMER, "vae": QWEN_IMAGE_VAE, "text_encoder": QWEN25_VL_7B},
}

# Tiny stand-ins with the same structure (what the CPU smoke test runs; values as in pipelines/demo.py).
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8)
_TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=1,
    norm_num_groups=32,
)
TINY: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": {**SD15_UNET, **_TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 2},
        "vae": {**SD_VAE, **_TINY_VAE},
        "text_encoder": {**CLIP_L, **_TINY_CLIP},
    },
    "sdxl": {
        "unet": {
            **SDXL_UNET,
            **_TINY_UNET,
            "cross_attention_dim": 64,
            "attention_head_dim": [2, 2],
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        },
        "vae": {**SDXL_VAE, **_TINY_VAE},
        "text_encoder": {**CLIP_L, **_TINY_CLIP},
        "text_encoder_2": {**OPENCLIP_BIG_G, **_TINY_CLIP},
    },
    "flux": {
        "transformer": {
            **FLUX_DEV_TRANSFORMER,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 6, 6],
        },
        "vae": {**FLUX_VAE, **_TINY_VAE},
        "text_encoder": {**CLIP_L, **_TINY_CLIP},
        "text_encoder_2": {
            **T5_XXL,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
        },
    },
    "qwen-image": {
        "transformer": {
            **QWEN_IMAGE_TRANSFORMER,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": [4, 6, 6],
        },
        "vae": {**QWEN_IMAGE_VAE, "base_dim": 4, "num_res_blocks": 1},
        "text_encoder": {
            "text": {
                **QWEN25_VL_7B["text"],
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            },
            "vision": {
                **QWEN25_VL_7B["vision"],
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": 32,
                "fullatt_block_indexes": [1],
            },
        },
    },
}

# Each checkpoint's own scheduler configuration (scheduler/scheduler_config.json).
SCHEDULERS: dict[str, Callable[[], Any]] = {
    "sd15": lambda: PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    ),
    "sdxl": lambda: EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    ),
    "flux": lambda: FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "qwen-image": lambda: FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    ),
}


# --- what is measured ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The benchmark setting of a model (issue #7) with performance.md's FLOPs per image at exactly this setting."""

    size: int
    steps: int
    guidance: float  # CFG scale (SD), distilled guidance (FLUX), true_cfg_scale (Qwen)
    negative: str
    flops_per_image: float
    target_s: float
    target_img_s: float | None
    max_batch: int  # sweep limit: these models are compute-bound well before (performance.md §1.2)
    repeats: int  # timed calls per batch size; fewer for the slow ones so one model fits a 10-minute slot


WORKLOADS: dict[str, Workload] = {
    "sd15": Workload(512, 20, 7.5, "", 34.7e12, 0.20, 12.0, 32, 3),
    "sdxl": Workload(1024, 30, 5.0, "", 416e12, 1.2, None, 8, 2),
    "flux": Workload(1024, 28, 3.5, "", 2098e12, 3.6, None, 4, 1),
    "qwen-image": Workload(1024, 50, 4.0, "blurry, low quality, watermark", 7074e12, 12.0, None, 2, 1),
}
TINY_WORKLOAD = {"size": 64, "steps": 2, "max_batch": 2, "repeats": 1}
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting, highly detailed"


# --- building --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def materialize(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are allocated and randomly initialised directly on `device` in `dtype`: no fp32 copy
    on the host first (Qwen-Image's 20 B transformer in fp32 would not even fit an 80 GB GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def clip_config(cfg: dict[str, Any], tok: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        **{**cfg, "vocab_size": max(cfg["vocab_size"], len(tok))},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def qwen_vl_config(cfg: dict[str, Any], tok: Any) -> Qwen2_5_VLConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")}
    text = {
        **cfg["text"],
        "vocab_size": max(cfg["text"]["vocab_size"], len(tok)),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=cfg["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def build_components(family: str, cfg: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict:
    """The pipeline's modules from `cfg` (FULL or TINY) plus local tokenizers and the checkpoint's scheduler."""
    comps: dict[str, Any] = {"scheduler": SCHEDULERS[family]()}  # built outside `materialize`: host tensors, fp32
    if family in ("sd15", "sdxl", "flux"):
        comps["tokenizer"] = _clip_tokenizer()
    if family == "sdxl":
        comps["tokenizer_2"] = _clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    if family == "flux":
        comps["tokenizer_2"] = _t5_tokenizer()
    if family == "qwen-image":
        comps["tokenizer"] = _qwen_tokenizer()
    with materialize(device, dtype):
        if family in ("sd15", "sdxl", "flux"):
            comps["text_encoder"] = CLIPTextModel(clip_config(cfg["text_encoder"], comps["tokenizer"]))
        if family in ("sd15", "sdxl"):
            comps["unet"] = UNet2DConditionModel(**cfg["unet"])
            comps["vae"] = AutoencoderKL(**cfg["vae"])
        if family == "sdxl":
            comps["text_encoder_2"] = CLIPTextModelWithProjection(
                clip_config(cfg["text_encoder_2"], comps["tokenizer_2"])
            )
        if family == "flux":
            tok = comps["tokenizer_2"]
            t5 = {**cfg["text_encoder_2"], "vocab_size": max(cfg["text_encoder_2"]["vocab_size"], len(tok))}
            comps["text_encoder_2"] = T5EncoderModel(
                T5Config(**t5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
            )
            comps["transformer"] = FluxTransformer2DModel(**cfg["transformer"])
            comps["vae"] = AutoencoderKL(**cfg["vae"])
        if family == "qwen-image":
            comps["text_encoder"] = Qwen2_5_VLForConditionalGeneration(
                qwen_vl_config(cfg["text_encoder"], comps["tokenizer"])
            )
            comps["transformer"] = QwenImageTransformer2DModel(**cfg["transformer"])
            comps["vae"] = AutoencoderKLQwenImage(**cfg["vae"])
    for module in comps.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return comps


def build_pipeline(family: str, cfg: dict[str, Any], device: torch.device | str, dtype: torch.dtype):
    comps = build_components(family, cfg, device, dtype)
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**comps, force_zeros_for_empty_prompt=True)
    elif family == "flux":
        pipe = FluxPipeline(**comps)
    else:
        pipe = QwenImagePipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published parameter counts of the denoisers (performance.md §1.1): the full-size configs must reproduce them.
PUBLISHED_DENOISER_PARAMS = {"sd15": 859.5e6, "sdxl": 2567.5e6, "flux": 11.90e9, "qwen-image": 20.43e9}


def check_configs(families: list[str]) -> dict[str, dict[str, int]]:
    """Every full-size component built on the meta device (no memory, no init): parameter counts per component."""
    counts: dict[str, dict[str, int]] = {}
    for family in families:
        comps = build_components(family, FULL[family], "meta", torch.bfloat16)
        counts[family] = {k: n_params(v) for k, v in comps.items() if isinstance(v, torch.nn.Module)}
        denoiser = counts[family].get("unet") or counts[family]["transformer"]
        published = PUBLISHED_DENOISER_PARAMS[family]
        parts = ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in counts[family].items())
        print(f"{family:11s} {parts}  (denoiser vs published {published / 1e6:,.1f} M: {denoiser / published:.4f})")
    return counts


# --- running ---------------------------------------------------------------------------------------------------------


def engine_spec(family: str, compile_choice: str, compile_mode: str | None) -> Any:
    """A registry entry for the in-memory pipeline, carrying the fast-path settings the engine would read."""
    from pipelines.registry import ModelSpec

    kwargs: dict[str, Any] = {"id": f"bench-{family}", "family": family, "source": "bench:random-weights"}
    try:
        from pipelines.registry import PerformanceSpec
    except ImportError:
        return ModelSpec(**kwargs)
    # auto: the whole UNet for SD; only the repeated blocks of the DiTs (about the same speed, far less warm-up).
    if compile_choice == "auto":
        compile_choice = "full" if family in ("sd15", "sdxl") else "regional"
    fields = PerformanceSpec.model_fields
    perf = {k: v for k, v in {"compile": compile_choice, "compile_mode": compile_mode}.items() if k in fields}
    return ModelSpec(**kwargs, performance=PerformanceSpec(**perf))


def plain_call(pipe: Any, family: str, w: Workload, size: int, steps: int) -> Callable[[int], None]:
    """Plain diffusers: the pipeline's own defaults, a list of prompts for a batch."""

    def run(batch: int) -> None:
        kwargs: dict[str, Any] = dict(
            prompt=[f"{PROMPT}, {i}" for i in range(batch)], height=size, width=size, num_inference_steps=steps
        )
        if family == "qwen-image":
            kwargs.update(negative_prompt=[w.negative] * batch, true_cfg_scale=w.guidance)
        else:
            kwargs.update(guidance_scale=w.guidance)
        pipe(**kwargs)

    return run


def easel_call(
    pipe: Any, family: str, spec: Any, device: torch.device, dtype: torch.dtype, w: Workload, size: int, steps: int
) -> Callable[[int], None]:
    """What the engine's worker does for `batch` compatible requests: one adapter call (per-image generators,
    step callback, a fresh scheduler), after the per-call VAE settings of the fast path."""
    from pipelines.families import adapter_for
    from pipelines.families.base import BatchItem, LoadedModel
    from pipelines.request import GenerationRequest

    try:
        from pipelines.optimize import prepare_call
    except ImportError:
        prepare_call = None
    adapter = adapter_for(family)
    loaded = LoadedModel(spec=spec, base=pipe, device=device, dtype=dtype)

    def run(batch: int) -> None:
        items = [
            BatchItem(
                GenerationRequest(
                    model=spec.id,
                    prompt=f"{PROMPT}, {i}",
                    negative_prompt=w.negative,
                    width=size,
                    height=size,
                    steps=steps,
                    guidance=w.guidance,
                ),
                [i],
            )
            for i in range(batch)
        ]
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        if prepare_call is not None:
            prepare_call(pipe, spec, device, size, size, batch)
        with torch.inference_mode():
            adapter.run_batch(loaded, items, scheduler, lambda step, total: False)

    return run


def apply_fast_path(pipe: Any, spec: Any, device: torch.device, warm_up: Callable[[], None], force: bool) -> Any:
    try:
        from pipelines.optimize import apply_optimizations
    except ImportError:
        return "pipelines.optimize not available: the Easel column runs the stock pipeline"
    return apply_optimizations(pipe, spec, device, warm_up=warm_up, force=force)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def sweep(
    run: Callable[[int], None], device: torch.device, args: argparse.Namespace, max_batch: int, repeats: int
) -> dict[str, Any]:
    """Batch 1, 2, 4, ...: median seconds per call after warm-up; stops at out-of-memory, at max_batch, or when
    images/s gained less than --min-gain over the best so far."""
    rows: list[dict[str, Any]] = []
    oom_at = None
    batch, best = 1, 0.0
    while batch <= max_batch:
        try:
            for _ in range(args.warmup):
                run(batch)  # compiles, autotunes, grows the allocator for this shape
            times = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                run(batch)
                sync(device)
                times.append(time.perf_counter() - t0)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            oom_at = batch
            break  # memory is freed below, once the exception (and the frames it holds) is gone
        t = statistics.median(times)
        rows.append({"batch": batch, "s_per_call": t, "s_per_image": t / batch, "img_per_s": batch / t})
        print(f"    batch {batch:3d}: {t:8.3f} s/call  {batch / t:8.3f} img/s", flush=True)
        if batch / t < best * (1 + args.min_gain):
            break
        best = max(best, batch / t)
        batch *= 2
    if oom_at is not None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not rows:
        return {"sweep": [], "oom_at": oom_at}
    top = max(rows, key=lambda r: r["img_per_s"])
    return {
        "s_per_image_b1": rows[0]["s_per_call"],
        "img_per_s_saturated": top["img_per_s"],
        "saturated_batch": top["batch"],
        "sweep": rows,
        "oom_at": oom_at,
    }


def with_limits(result: dict[str, Any], w: Workload, peak: float, tiny: bool) -> dict[str, Any]:
    """Fraction of the compute limit: useful FLOPs per second / peak. Undefined for the tiny configurations."""
    if tiny or "s_per_image_b1" not in result:
        return result
    result["limit_fraction_b1"] = w.flops_per_image / result["s_per_image_b1"] / peak
    result["limit_fraction_saturated"] = w.flops_per_image * result["img_per_s_saturated"] / peak
    result["meets_target_s"] = result["s_per_image_b1"] <= w.target_s
    if w.target_img_s is not None:
        result["meets_target_img_s"] = result["img_per_s_saturated"] >= w.target_img_s
    return result


def bench_model(family: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from pipelines.engine import resolve_dtype

    w = WORKLOADS[family]
    size, steps = (TINY_WORKLOAD["size"], TINY_WORKLOAD["steps"]) if args.tiny else (w.size, w.steps)
    max_batch = args.max_batch or (TINY_WORKLOAD["max_batch"] if args.tiny else w.max_batch)
    repeats = args.repeats or (TINY_WORKLOAD["repeats"] if args.tiny else w.repeats)
    spec = engine_spec(family, args.compile, args.compile_mode)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else resolve_dtype(spec, device)  # the engine's
    print(f"\n{family}: {size}x{size}, {steps} steps, {dtype}, building ...", flush=True)
    t0 = time.perf_counter()
    pipe = build_pipeline(family, TINY[family] if args.tiny else FULL[family], device, dtype)
    out: dict[str, Any] = {
        "family": family,
        "size": size,
        "steps": steps,
        "dtype": str(dtype).removeprefix("torch."),
        "guidance": w.guidance,
        "negative_prompt": w.negative or None,
        "flops_per_image": None if args.tiny else w.flops_per_image,
        "params": {k: n_params(v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)},
        "build_s": time.perf_counter() - t0,
        "variants": {},
    }
    if device.type == "cuda":
        out["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    if "plain" in args.variants:
        print("  plain diffusers:", flush=True)
        plain = plain_call(pipe, family, w, size, steps)
        out["variants"]["plain"] = run_variant(plain, device, args, (max_batch, repeats), w)
    if "easel" in args.variants:
        run = easel_call(pipe, family, spec, device, dtype, w, size, steps)
        t1 = time.perf_counter()
        applied = apply_fast_path(pipe, spec, device, warm_up=lambda: run(1), force=args.tiny)
        print(f"  easel ({applied}):", flush=True)
        result = run_variant(run, device, args, (max_batch, repeats), w)
        result.update(applied=applied, fast_path_setup_s=time.perf_counter() - t1)
        out["variants"]["easel"] = result
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()  # compiled graphs hold on to the old modules
        torch.cuda.empty_cache()
    return out


def run_variant(
    run: Callable[[int], None], device: torch.device, args: argparse.Namespace, limits: tuple[int, int], w: Workload
) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = sweep(run, device, args, *limits)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return with_limits(result, w, args.peak_tflops * 1e12, args.tiny)


# --- saving a full-size SD1.5 for the HTTP benchmark ------------------------------------------------------------------


def save_sd15(out_dir: Path, args: argparse.Namespace, device: torch.device) -> Path:
    """A random-weight SD1.5 diffusers folder plus a models.yaml serving it as `bench-sd15` (512x512, 20 steps)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipeline("sd15", TINY["sd15"] if args.tiny else FULL["sd15"], device, dtype)
    pipe.to("cpu")
    folder = out_dir / "sd15"
    pipe.save_pretrained(folder, safe_serialization=True)
    size = TINY_WORKLOAD["size"] if args.tiny else 512
    yaml_path = out_dir / "models.yaml"
    yaml_path.write_text(
        f"# Written by scripts/bench_gpu.py --save-sd15: {'tiny' if args.tiny else 'full-size'} SD1.5, random weights\n"
        "default_model: bench-sd15\n"
        "models:\n"
        "  bench-sd15:\n"
        "    family: sd15\n"
        f"    source: {folder.resolve()}\n"
        f"    defaults: {{steps: 20, cfg: 7.0, width: {size}, height: {size}}}\n"
    )
    print(f"saved {folder} and {yaml_path}")
    return yaml_path


# --- report ----------------------------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = ["model", "variant", "s/img b1", "target", "img/s sat", "(batch)", "target", "limit b1", "limit sat"]
    rows = []
    for r in results:
        w = WORKLOADS[r["family"]]
        name = f"{r['family']} {r['size']}px {r['steps']}st"
        for variant, v in r["variants"].items():
            ok_s, ok_ips = v.get("meets_target_s"), v.get("meets_target_img_s")
            rows.append(
                [
                    name,
                    variant,
                    fmt(v.get("s_per_image_b1"), ".3f"),
                    "" if args.tiny else f"<={w.target_s:g}" + {True: " ok", False: " MISS"}.get(ok_s, ""),
                    fmt(v.get("img_per_s_saturated"), ".3f"),
                    f"({v.get('saturated_batch', '-')})" + (" oom" if v.get("oom_at") else ""),
                    ""
                    if args.tiny or w.target_img_s is None
                    else f">={w.target_img_s:g}" + {True: " ok", False: " MISS"}.get(ok_ips, ""),
                    fmt(v.get("limit_fraction_b1"), ".1%"),
                    fmt(v.get("limit_fraction_saturated"), ".1%"),
                ]
            )
            name = ""
    cells = [header, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print()
    for i, c in enumerate(cells):
        print("  ".join(c[j].ljust(widths[j]) if j < 2 else c[j].rjust(widths[j]) for j in range(len(c))))
        if i == 0:
            print("  ".join("-" * n for n in widths))
    if not args.tiny:
        print(f"\nlimit = FLOPs per image (performance.md §1.3) / time / {args.peak_tflops:g} TFLOP/s peak")


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--variants", nargs="+", choices=["plain", "easel"], default=["plain", "easel"])
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU, 64x64, 2 steps (tests the harness)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (790: measured on an H100 SXM)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "regional", "full"], help="Easel fast path")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the sweep (default per model)")
    p.add_argument("--min-gain", type=float, default=0.03, help="stop the sweep below this img/s gain")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per batch size, median (default per model)")
    p.add_argument("--check-configs", action="store_true", help="only print full-size parameter counts (meta)")
    p.add_argument("--save-sd15", type=Path, metavar="DIR", help="only write a random SD1.5 folder + models.yaml")
    p.add_argument("--json-out", type=Path, help="default: $OUT/bench_gpu.json when $OUT is set")
    args = p.parse_args(argv)
    if args.json_out is None and os.environ.get("OUT"):
        args.json_out = Path(os.environ["OUT"]) / ("bench_gpu_tiny.json" if args.tiny else "bench_gpu.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights: NaN pixels in the final cast
    if args.check_configs:
        counts = check_configs(args.models)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"params": counts, "published_denoiser_params": PUBLISHED_DENOISER_PARAMS}
            args.json_out.write_text(json.dumps(payload, indent=2) + "\n")
        return 0
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --tiny to try the harness on CPU)", file=sys.stderr)
        return 2
    if args.save_sd15:
        save_sd15(args.save_sd15, args, device)
        return 0
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = {"environment": environment(device), "args": params, "results": []}
    try:
        for family in args.models:
            report["results"].append(bench_model(family, args, device))
            if args.json_out:  # after every model: a crash later keeps what was measured
                args.json_out.parent.mkdir(parents=True, exist_ok=True)
                args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        if report["results"]:
            print_table(report["results"], args)
    if args.json_out:
        print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
