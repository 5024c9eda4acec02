#!/usr/bin/env python
"""GPU benchmarks on full-size architectures with random weights (same shapes, hence the same FLOPs, as the real
checkpoints; nothing is downloaded: the configurations below are the published ones, tokenizers are built locally).

Per model, in one process, variants measured interleaved (A, B, C, A, B, C ...) after each one's warm-up:
  plain             stock diffusers (fp16 SD/SDXL, bf16 FLUX/Qwen, default attention, no compile)
  easel             the family adapter's call after `pipelines.optimize.apply_optimizations`, as the engine runs it
                    (default fast path, bf16: performance.quantization none)
  easel-nocompile   the same without torch.compile / CUDA graphs
  easel-fp8         the fast path with performance.quantization fp8 (skipped, with the reason, where unsupported)
Wall time and GPU time (CUDA events around the call), median and spread, at batch 1 and (SD1.5) at a fixed
throughput batch; the ratio to plain, the fraction of the compute limit (performance.md §1.3 FLOPs / time / peak),
the issue's goal and whether it is met. Each variant owns a denoiser + VAE built from one seed (compile and
quantisation work in place); text encoders are shared. See docs/benchmarks.md.

    python scripts/bench_gpu.py                      # all four models on CUDA, table + JSON to $OUT
    python scripts/bench_gpu.py --models sd15 flux   # a subset
    python scripts/bench_gpu.py --models flux --perf attention=flash --perf compile_mode=max-autotune
    python scripts/bench_gpu.py --profile DIR        # + a torch.profiler trace of one Easel call per model
    python scripts/bench_gpu.py --fp8-quality        # + FP8 vs bf16 denoiser output on the same inputs, per step
    python scripts/bench_gpu.py --sweep              # batch 1, 2, 4, ... instead of b1 + the fixed batch
    python scripts/bench_gpu.py --tiny               # the same harness on CPU with tiny configs (a smoke test)
    python scripts/bench_gpu.py --check-configs      # parameter counts of the full-size configs (meta device)
    python scripts/bench_gpu.py --save-sd15 DIR      # write a full-size random SD1.5 folder + models.yaml
                                                     # (for scripts/bench.py through the real server)
    python scripts/bench_gpu.py --summarize DIR      # the issue's table from a bench_gpu.sh results folder
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import gzip
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import math
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

import psutil
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
    """The benchmark setting of a model (issue #15's table) with performance.md's FLOPs per image at exactly this
    setting and the issue's goals. (The time budgets of the 9-minute run are bench_gpu.sh's: --budget-s.)"""

    size: int
    steps: int
    guidance: float  # CFG scale (SD), distilled guidance (FLUX), true_cfg_scale (Qwen)
    negative: str
    flops_per_image: float
    goal_s: float  # seconds per image at batch 1, bf16/fp16 Easel
    goal_s_fp8: float | None  # the same with performance.quantization: fp8
    goal_img_s: float | None  # images per second at `throughput_batch`
    throughput_batch: int | None  # the fixed batch of the saturated-throughput row (None: batch 1 only)
    max_batch: int  # --sweep limit: these models are compute-bound well before (performance.md §1.2)
    repeats: dict[int, int]  # most interleaved rounds per batch size; fewer when the budget runs out
    reserve_gib: float  # activation memory to leave free when deciding which variants share the device
    published: str  # the best published figure (issue #15)


WORKLOADS: dict[str, Workload] = {
    "sd15": Workload(
        512, 20, 7.5, "", 34.7e12, 0.15, None, 14.0, 16, 32, {1: 9, 16: 4}, 12, "0.19 s (stable-fast, H100)"
    ),
    "sdxl": Workload(1024, 30, 5.0, "", 416e12, 1.1, None, None, None, 8, {1: 6}, 10, "1.45 s (H100)"),
    "flux": Workload(1024, 28, 3.5, "", 2098e12, 3.6, 2.4, None, None, 4, {1: 4}, 8, "4.21 s bf16, 2.97 s FP8 (H100)"),
    "qwen-image": Workload(
        1024, 50, 4.0, "blurry, low quality, watermark", 7074e12, 12.0, 8.0, None, None, 2, {1: 2}, 10, "none"
    ),
}
# Tiny: 2 interleaved rounds at b1 (to show the interleaving), 1 at b2, 1-step warm-ups: a CPU test stays short.
TINY_WORKLOAD: dict[str, Any] = {
    "size": 64,
    "steps": 2,
    "throughput_batch": 2,
    "max_batch": 2,
    "repeats": {1: 2, 2: 1},
    "warmup_steps": 1,
}
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting, highly detailed"
HTTP_GOALS = {"overhead_ratio": 1.03, "batching_ratio": 2.0}  # HTTP / direct at most, batching on/off at least

# The variants, in the order they claim device memory and are measured: the goal-bearing ones first, so a step cut
# short by its budget loses easel-nocompile first. plain: stock diffusers. easel: the default fast path in bf16
# (quantization none, so the bf16 goal is checked; `auto` would pick FP8 for FLUX/Qwen on FP8 cards, which is what
# easel-fp8 measures). easel-nocompile: the fast path without torch.compile or CUDA graphs.
VARIANTS = ("plain", "easel", "easel-fp8", "easel-nocompile")
VARIANT_PERF: dict[str, dict[str, Any]] = {
    "easel": {"quantization": "none"},
    "easel-nocompile": {"compile": "off", "cuda_graphs": False, "quantization": "none"},
    "easel-fp8": {"quantization": "fp8"},
}
# FP8 only where the issue sets an FP8 goal (the transformers): the UNets' step would not fit its budget with a
# fourth compile. `--variants ... easel-fp8` measures it for them too.
DEFAULT_VARIANTS = {
    "sd15": ("plain", "easel", "easel-nocompile"),
    "sdxl": ("plain", "easel", "easel-nocompile"),
    "flux": VARIANTS,
    "qwen-image": VARIANTS,
}


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


DENOISER = {"sd15": "unet", "sdxl": "unet", "flux": "transformer", "qwen-image": "transformer"}
OWN_MODULES = ("denoiser", "vae")  # what each benchmark variant gets its own copy of (the rest is shared)


def build_denoiser_and_vae(
    family: str, cfg: dict[str, Any], device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.nn.Module]:
    """The denoiser and VAE, seeded: every variant built with the same seed has the very same weights."""
    torch.manual_seed(seed)
    with materialize(device, dtype):
        if family in ("sd15", "sdxl"):
            mods = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"])}
        elif family == "flux":
            mods = {"transformer": FluxTransformer2DModel(**cfg["transformer"]), "vae": AutoencoderKL(**cfg["vae"])}
        else:
            mods = {
                "transformer": QwenImageTransformer2DModel(**cfg["transformer"]),
                "vae": AutoencoderKLQwenImage(**cfg["vae"]),
            }
    return {k: m.eval() for k, m in mods.items()}


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
        if family == "qwen-image":
            comps["text_encoder"] = Qwen2_5_VLForConditionalGeneration(
                qwen_vl_config(cfg["text_encoder"], comps["tokenizer"])
            )
    comps.update(build_denoiser_and_vae(family, cfg, device, dtype))
    for module in comps.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return comps


def assemble(family: str, comps: dict[str, Any]) -> Any:
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


def build_pipeline(family: str, cfg: dict[str, Any], device: torch.device | str, dtype: torch.dtype):
    return assemble(family, build_components(family, cfg, device, dtype))


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


def engine_spec(family: str, overrides: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """A registry entry for the in-memory pipeline carrying the fast-path settings the engine would read, and notes
    on the overrides this checkout's PerformanceSpec cannot take (an unknown field or value is dropped, never fatal,
    so the script runs before and after a PerformanceSpec change). compile=auto is resolved here when the spec
    does not know it: the whole UNet for SD, the repeated blocks of the transformers."""
    from pydantic import ValidationError

    from pipelines.registry import ModelSpec

    kwargs: dict[str, Any] = {"id": f"bench-{family}", "family": family, "source": "bench:random-weights"}
    notes: list[str] = []
    try:
        from pipelines.registry import PerformanceSpec
    except ImportError:
        return ModelSpec(**kwargs), ["this checkout has no PerformanceSpec: the stock pipeline runs"]
    fields = PerformanceSpec.model_fields
    perf: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key in fields:
            perf[key] = value
        else:
            notes.append(f"{key}={value!r} ignored: PerformanceSpec has no such field")
    while True:
        try:
            return ModelSpec(**kwargs, performance=PerformanceSpec(**perf)), notes
        except ValidationError as e:
            bad = {str(err["loc"][0]) for err in e.errors() if err.get("loc")} & perf.keys()
            if not bad:
                raise
            for key in sorted(bad):
                value = perf.pop(key)
                if key == "compile" and value == "auto":
                    perf[key] = "full" if family in ("sd15", "sdxl") else "regional"
                else:
                    notes.append(f"{key}={value!r} ignored: not a value this PerformanceSpec accepts")


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 cannot run here, or None: it needs CUDA compute capability >= 8.9 (Ada, Hopper) and torchao."""
    if device.type != "cuda":
        return "FP8 needs a CUDA device"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return f"compute capability {cc[0]}.{cc[1]} < 8.9: this card has no FP8"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    return None


def plain_call(pipe: Any, family: str, w: Workload, size: int) -> Callable[[int, int], None]:
    """Plain diffusers: the pipeline's own defaults, a list of prompts for a batch. Every call gets new prompts, so
    no cache of text-encoder outputs can make one variant look faster than another."""
    calls = itertools.count()

    def run(batch: int, steps: int) -> None:
        n = next(calls)
        kwargs: dict[str, Any] = dict(
            prompt=[f"{PROMPT}, {n}.{i}" for i in range(batch)], height=size, width=size, num_inference_steps=steps
        )
        if family == "qwen-image":
            kwargs.update(negative_prompt=[w.negative] * batch, true_cfg_scale=w.guidance)
        else:
            kwargs.update(guidance_scale=w.guidance)
        pipe(**kwargs)

    return run


def easel_call(
    pipe: Any, family: str, spec: Any, device: torch.device, dtype: torch.dtype, w: Workload, size: int
) -> Callable[[int, int], None]:
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
    calls = itertools.count()

    def run(batch: int, steps: int) -> None:
        n = next(calls)
        items = [
            BatchItem(
                GenerationRequest(
                    model=spec.id,
                    prompt=f"{PROMPT}, {n}.{i}",
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


def apply_fast_path(
    pipe: Any, spec: Any, device: torch.device, warm_up: Callable[[], None], force: bool
) -> list[str] | str:
    try:
        from pipelines.optimize import apply_optimizations
    except ImportError:
        return "pipelines.optimize not available: the Easel variants run the stock pipeline"
    accepted = inspect.signature(apply_optimizations).parameters
    kwargs = {k: v for k, v in {"warm_up": warm_up, "force": force}.items() if k in accepted}
    return list(apply_optimizations(pipe, spec, device, **kwargs))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, GPU seconds): wall from before the call until the device is idle after it; GPU time from CUDA
    events recorded on the stream around the call (None on CPU)."""
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    end.synchronize()
    sync(device)
    return time.perf_counter() - t0, start.elapsed_time(end) / 1000


def stats(xs: list[float]) -> dict[str, Any] | None:
    """Median and spread ((max - min) / median) of repeated timings."""
    if not xs:
        return None
    med = statistics.median(xs)
    return {
        "n": len(xs),
        "median_s": med,
        "min_s": min(xs),
        "max_s": max(xs),
        "spread": (max(xs) - min(xs)) / med if med > 0 else 0.0,
        "times_s": xs,
    }


def plan_groups(
    variants: list[str], state_bytes: dict[str, int], fixed_bytes: int, capacity_bytes: int | None
) -> list[list[str]]:
    """Which variants share the device at a time, in order. Each variant owns a denoiser (+ VAE) of `state_bytes`;
    the text encoders and the activation reserve (`fixed_bytes`) are shared. Variants are packed greedily in the
    given order so the first ones (plain, easel) are interleaved with each other when memory allows; a variant that
    fits nowhere still gets a group of its own. capacity None (CPU): all in one group."""
    if capacity_bytes is None:
        return [list(variants)] if variants else []
    groups: list[list[str]] = []
    used = fixed_bytes
    for v in variants:
        if groups and used + state_bytes[v] <= capacity_bytes:
            groups[-1].append(v)
            used += state_bytes[v]
        else:
            groups.append([v])
            used = fixed_bytes + state_bytes[v]
    return groups


@dataclass
class State:
    """One variant: its own pipeline object (own denoiser and VAE, shared text encoders) and how to call it."""

    variant: str
    pipe: Any
    run: Callable[[int, int], None]
    info: dict[str, Any]


def module_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class FamilyBench:
    """Builds, warms up and times the variants of one model family, interleaved (A, B, C, A, B, C ...).

    Compiling and quantising change a module in place, so every variant gets its own denoiser and VAE built from the
    same seed (the same weights), and only the text encoders and tokenizers are shared. Variants that fit the device
    together are measured together, interleaved; when they do not (Qwen-Image on an 80 GB card), they run in groups
    one after another (`plan_groups`), each group built afresh after the last one is freed. The JSON says which
    variants were interleaved with plain."""

    def __init__(self, family: str, args: argparse.Namespace, device: torch.device, started: float):
        from pipelines.engine import resolve_dtype

        self.family, self.args, self.device = family, args, device
        self.w = WORKLOADS[family]
        self.tiny = args.tiny
        self.cfg = TINY[family] if args.tiny else FULL[family]
        self.size = TINY_WORKLOAD["size"] if args.tiny else self.w.size
        self.steps = TINY_WORKLOAD["steps"] if args.tiny else self.w.steps
        self.warmup_steps = min(self.steps, TINY_WORKLOAD["warmup_steps"] if args.tiny else args.warmup_steps)
        self.deadline = None if args.budget_s is None else started + args.budget_s
        if device.type == "cuda":
            # Several compiled variants (and batch sizes) in one process: more graphs per code object than a server
            # holds. Above dynamo's limit a function silently falls back to eager, which would mislabel a figure.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        spec, _ = engine_spec(family, self.perf_overrides("easel"))
        self.dtype = getattr(torch, args.dtype) if args.dtype != "auto" else resolve_dtype(spec, device)
        self.order: list[list[Any]] = []  # (batch, round, variant) in the order timed: the interleaving, for the JSON
        self.captured: list[tuple[Any, Any, torch.Tensor]] | None = None  # fp8 quality reference calls
        self.fp8_reference: tuple[str, int] = ("", 0)  # (variant, steps) the calls were captured from
        self.want_fp8_quality = False
        self.spare: dict[str, torch.nn.Module] | None = None  # the initial build's denoiser + VAE, for one variant
        self.out: dict[str, Any] = {}

    # -- settings

    def perf_overrides(self, variant: str) -> dict[str, Any]:
        user = {"compile": self.args.compile, "compile_mode": self.args.compile_mode, **self.args.perf}
        user = {k: v for k, v in user.items() if v is not None}
        return {**user, **VARIANT_PERF.get(variant, {})}

    def batches(self) -> list[int]:
        if self.args.sweep:
            top = self.args.max_batch or (TINY_WORKLOAD["max_batch"] if self.tiny else self.w.max_batch)
            return [2**i for i in range(top.bit_length()) if 2**i <= top]
        tb = TINY_WORKLOAD["throughput_batch"] if self.tiny else self.w.throughput_batch
        return [1] + ([tb] if tb else [])

    def max_rounds(self, batch: int) -> int:
        if self.args.repeats:
            return self.args.repeats
        if self.tiny:
            return TINY_WORKLOAD["repeats"].get(batch, 1)
        return self.w.repeats.get(batch, min(self.w.repeats.values()))

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    # -- building

    def build_state(self, variant: str, shared: dict[str, Any]) -> State | dict[str, Any]:
        """The variant's pipeline with the fast path applied (compile warm-up included in setup_s), or a dict saying
        why it is skipped."""
        t0 = time.perf_counter()
        info: dict[str, Any] = {"notes": []}
        spec = None
        if variant != "plain":
            spec, notes = engine_spec(self.family, self.perf_overrides(variant))
            info["notes"] += notes
            perf = getattr(spec, "performance", None)
            info["performance"] = perf.model_dump() if perf is not None else None
            if variant == "easel-fp8":
                why = fp8_unsupported(self.device)
                if why is None and getattr(perf, "quantization", None) != "fp8":
                    why = "this checkout's PerformanceSpec cannot ask for quantization: fp8"
                if why:
                    return {"skipped": why, **info}
        # The first variant takes the modules of the initial build (same seed, same weights); the others build anew.
        own = self.spare or build_denoiser_and_vae(self.family, self.cfg, self.device, self.dtype, seed=self.args.seed)
        self.spare = None
        pipe = assemble(self.family, {**shared, **own})
        if variant == "plain":
            run = plain_call(pipe, self.family, self.w, self.size)
            info["applied"] = []
        else:
            run = easel_call(pipe, self.family, spec, self.device, self.dtype, self.w, self.size)
            applied = apply_fast_path(
                pipe, spec, self.device, warm_up=lambda: run(1, self.warmup_steps), force=self.tiny
            )
            info["applied"] = applied
            if variant == "easel-fp8" and not any(
                k in s for s in applied for k in ("fp8", "float8", "quant")
            ):  # asked for, not done: not an FP8 figure
                del pipe, run, own
                self.free()
                return {"skipped": f"quantization fp8 asked for but not applied (applied: {applied})", **info}
        info["setup_s"] = time.perf_counter() - t0
        return State(variant, pipe, run, info)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- measuring

    def warm(self, state: State, batch: int, result: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            for _ in range(self.args.warmup):
                state.run(batch, self.warmup_steps)  # compiles, records graphs, grows the allocator for this shape
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            result["oom"] = True
        result["warmup_s"] = time.perf_counter() - t0
        if result.get("oom"):
            self.free()  # here, once the exception (and the frames holding the batch's tensors) is gone

    def measure(self, states: list[State], results: dict[str, dict[str, Any]], group_deadline: float) -> None:
        batches = self.batches()
        for bi, batch in enumerate(batches):
            rows = {s.variant: results[s.variant].setdefault("batches", {}).setdefault(str(batch), {}) for s in states}
            for s in states:
                self.warm(s, batch, rows[s.variant])
            live = [s for s in states if not rows[s.variant].get("oom")]
            walls: dict[str, list[float]] = {s.variant: [] for s in live}
            gpus: dict[str, list[float]] = {s.variant: [] for s in live}
            batch_deadline = time.perf_counter() + (group_deadline - time.perf_counter()) / (len(batches) - bi)
            for rnd in range(self.max_rounds(batch)):
                t_round = time.perf_counter()
                for s in live:
                    if rows[s.variant].get("oom"):
                        continue
                    try:
                        wall, gpu = timed(lambda s=s, b=batch: s.run(b, self.steps), self.device)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                        if not is_oom(e):
                            raise
                        rows[s.variant]["oom"] = True
                        continue
                    walls[s.variant].append(wall)
                    if gpu is not None:
                        gpus[s.variant].append(gpu)
                    self.order.append([batch, rnd, s.variant])
                round_s = time.perf_counter() - t_round
                if any(rows[s.variant].get("oom") for s in live):
                    self.free()
                if time.perf_counter() + round_s > batch_deadline:
                    break  # at least one round; more while the budget lasts
            for s in live:
                row = rows[s.variant]
                row.update(wall=stats(walls[s.variant]), gpu=stats(gpus[s.variant]))
                if row["wall"]:
                    med = row["wall"]["median_s"]
                    row.update(s_per_image=med / batch, img_per_s=batch / med)
                    gpu_line = f", GPU {row['gpu']['median_s']:.3f} s" if row["gpu"] else ""
                    print(
                        f"    b{batch:<3d} {s.variant:16s} {med:8.3f} s/call (n={row['wall']['n']}, spread "
                        f"{row['wall']['spread']:.1%}{gpu_line})  {batch / med:7.2f} img/s  warm-up "
                        f"{row['warmup_s']:.1f} s",
                        flush=True,
                    )
            self.save_partial(self.out)
            if self.args.sweep and all(
                rows[s.variant].get("oom") or not self.gains(results[s.variant], batch) for s in states
            ):
                break

    def gains(self, result: dict[str, Any], batch: int) -> bool:
        """--sweep: did this batch size add at least --min-gain images/s over the smaller ones?"""
        ips = {int(b): r.get("img_per_s", 0.0) for b, r in result.get("batches", {}).items()}
        best_before = max((v for b, v in ips.items() if b < batch), default=0.0)
        return ips.get(batch, 0.0) >= best_before * (1 + self.args.min_gain)

    # -- the whole family

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        asked = self.args.variants or DEFAULT_VARIANTS[self.family]
        variants = [v for v in VARIANTS if v in asked]
        # Capture reference calls for the FP8 comparison only where an FP8 variant can run.
        self.want_fp8_quality = (
            self.args.fp8_quality and "easel-fp8" in variants and fp8_unsupported(self.device) is None
        )
        print(f"\n{self.family}: {self.size}x{self.size}, {self.steps} steps, {self.dtype}, building ...", flush=True)
        comps = build_components(self.family, self.cfg, self.device, self.dtype)
        params = {k: n_params(v) for k, v in comps.items() if isinstance(v, torch.nn.Module)}
        own_names = (DENOISER[self.family], "vae")
        state_b = module_bytes([comps[k] for k in own_names])
        shared = {k: v for k, v in comps.items() if k not in own_names}
        self.spare = {k: comps[k] for k in own_names}
        del comps
        self.free()
        out: dict[str, Any] = {
            "family": self.family,
            "size": self.size,
            "steps": self.steps,
            "dtype": str(self.dtype).removeprefix("torch."),
            "guidance": self.w.guidance,
            "negative_prompt": self.w.negative or None,
            "flops_per_image": None if self.tiny else self.w.flops_per_image,
            "goals": None
            if self.tiny
            else {"s_b1": self.w.goal_s, "s_b1_fp8": self.w.goal_s_fp8, "img_per_s": self.w.goal_img_s},
            "throughput_batch": None if self.args.sweep else self.batches()[-1] if len(self.batches()) > 1 else None,
            "published": self.w.published,
            "params": params,
            "build_s": time.perf_counter() - t0,
            "variants": {},
        }
        if self.device.type == "cuda":
            capacity = int(torch.cuda.get_device_properties(self.device).total_memory * self.args.memory_fraction)
            fixed = module_bytes([m for m in shared.values() if isinstance(m, torch.nn.Module)])
            fixed += int(self.w.reserve_gib * 2**30)
        else:
            capacity, fixed = None, 0
        groups = plan_groups(variants, dict.fromkeys(variants, state_b), fixed, capacity)
        out["groups"] = groups
        print(f"  groups measured together: {groups}  (build {out['build_s']:.1f} s)", flush=True)
        results = out["variants"]
        self.out = out
        for gi, group in enumerate(groups):
            states: list[State] = []
            for v in group:
                if self.left() <= 0:  # a clean JSON and table rather than being stopped mid-build
                    results[v] = {"skipped": "the step's time budget was spent before this variant"}
                    print(f"  {v}: skipped: out of time", flush=True)
                    continue
                st = self.build_state(v, shared)
                if isinstance(st, State):
                    st.info["group"] = gi
                    results[v] = st.info
                    states.append(st)
                    print(f"  {v}: setup {st.info['setup_s']:.1f} s, applied {st.info['applied']}", flush=True)
                else:
                    results[v] = st
                    print(f"  {v}: skipped: {st['skipped']}", flush=True)
                for note in results[v].get("notes", []):
                    print(f"    note: {note}", flush=True)
            if states:
                remaining = sum(len(g) for g in groups[gi:])
                group_deadline = time.perf_counter() + self.left() * len(group) / remaining
                self.measure(states, results, group_deadline)
                self.after_group(states, out)
            self.spare = st = None  # nothing may keep this group's modules alive into the next one
            states.clear()
            self.free()
            if self.device.type == "cuda":
                torch._dynamo.reset()  # compiled code holds on to the freed modules
            self.save_partial(out)
        summarize_family(out, self.args)
        out["order"] = self.order
        out["elapsed_s"] = time.perf_counter() - t0
        return out

    def save_partial(self, out: dict[str, Any]) -> None:
        """The JSON so far (ratios and goals included): a step stopped at its time limit keeps what it measured."""
        if self.args.partial is not None and out:
            summarize_family(out, self.args)
            self.args.partial({**out, "order": self.order})

    def after_group(self, states: list[State], out: dict[str, Any]) -> None:
        """While a group's modules are alive: the profile of the easel call, and the FP8 quality capture/replay."""
        by_name = {s.variant: s for s in states}
        # Both are extras: if one fails, the timings stand, and the JSON says what failed.
        if self.args.profile and "easel" in by_name:
            try:
                out["profile"] = profile_family(self, by_name["easel"])
            except Exception as e:
                out["profile"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  profile failed: {out['profile']['error']}", flush=True)
        try:
            self.fp8_quality(by_name, out)
        except Exception as e:
            out["fp8_quality"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  fp8 quality failed: {out['fp8_quality']['error']}", flush=True)

    def fp8_quality(self, by_name: dict[str, State], out: dict[str, Any]) -> None:
        """Records the reference's denoiser calls (once, from a bf16 variant) and replays them on the FP8 one."""
        if not self.want_fp8_quality or "skipped" in out["variants"].get("easel-fp8", {}):
            return
        ref = next((by_name[v] for v in ("plain", "easel-nocompile", "easel") if v in by_name), None)
        if self.captured is None and ref is not None:
            denoiser = getattr(ref.pipe, DENOISER[self.family])
            steps = min(self.steps, self.args.fp8_quality_steps)
            self.captured = capture_calls(denoiser, lambda: ref.run(1, steps))
            self.fp8_reference = (ref.variant, steps)
        if self.captured is not None and "easel-fp8" in by_name:
            fp8 = getattr(by_name["easel-fp8"].pipe, DENOISER[self.family])
            with torch.inference_mode():
                errors = replay_errors(fp8, self.captured, self.device)
            out["fp8_quality"] = fp8_quality_report(errors, *self.fp8_reference)
            q = out["fp8_quality"]
            print(
                f"  fp8 quality vs {q['reference']} (same inputs, {q['calls']} denoiser calls): relative error "
                f"mean {q['mean']:.4f}, max {q['max']:.4f}",
                flush=True,
            )


def summarize_family(out: dict[str, Any], args: argparse.Namespace) -> None:
    """Per variant: convenience figures, the ratio to plain, the fraction of the compute limit, the goal and whether
    it is met (Easel variants only; wall-time medians)."""
    w = WORKLOADS[out["family"]]
    peak = args.peak_tflops * 1e12
    plain = out["variants"].get("plain", {})
    for name, v in out["variants"].items():
        rows = v.get("batches", {})
        if not rows or "skipped" in v:
            continue
        b1 = rows.get("1", {})
        v["s_per_image_b1"] = b1.get("s_per_image")
        v["gpu_s_b1"] = (b1.get("gpu") or {}).get("median_s")
        best = max(
            ((int(b), r) for b, r in rows.items() if r.get("img_per_s")), key=lambda x: x[1]["img_per_s"], default=None
        )
        if best:
            v["img_per_s_saturated"], v["saturated_batch"] = best[1]["img_per_s"], best[0]
        v["interleaved_with_plain"] = "group" in plain and plain.get("group") == v.get("group")
        if name != "plain" and plain.get("batches"):
            v["ratio_vs_plain"] = {
                b: plain["batches"][b]["s_per_image"] / r["s_per_image"]
                for b, r in rows.items()
                if r.get("s_per_image") and plain["batches"].get(b, {}).get("s_per_image")
            }
        if out["flops_per_image"]:
            v["limit_fraction"] = {
                b: out["flops_per_image"] / r["s_per_image"] / peak for b, r in rows.items() if r.get("s_per_image")
            }
        if out["goals"] and name != "plain":
            goal_s = w.goal_s_fp8 if name == "easel-fp8" and w.goal_s_fp8 else w.goal_s
            v["goal_s_b1"] = goal_s
            v["meets_goal_s"] = v["s_per_image_b1"] <= goal_s if v["s_per_image_b1"] is not None else None
            if w.goal_img_s is not None and w.throughput_batch is not None:
                tb = rows.get(str(w.throughput_batch), {})
                v["goal_img_per_s"] = w.goal_img_s
                v["meets_goal_img_per_s"] = tb["img_per_s"] >= w.goal_img_s if tb.get("img_per_s") else None


# --- FP8 quality: the denoiser's output against a reference on the very same inputs ---------------------------------


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """Tensors inside tuples, lists and dicts detached and copied to `device` (None: left where they are)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_tensor(out: Any) -> torch.Tensor:
    """The prediction of a denoiser call: a tensor, the first of a tuple (return_dict=False), or `.sample`."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return first_tensor(out[0])
    return out.sample


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference||, in float32."""
    ref = reference.float()
    return ((candidate.float().to(ref.device) - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def capture_calls(module: torch.nn.Module, fn: Callable[[], None]) -> list[tuple[Any, Any, torch.Tensor]]:
    """Runs `fn` and records every call of `module`: (args, kwargs, output), copied to the host."""
    calls: list[tuple[Any, Any, torch.Tensor]] = []

    def hook(_: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        calls.append((to_device(args, "cpu"), to_device(kwargs, "cpu"), to_device(first_tensor(output), "cpu")))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return calls


def replay_errors(
    candidate: torch.nn.Module, calls: list[tuple[Any, Any, torch.Tensor]], device: torch.device | str
) -> list[float]:
    """The candidate module on each recorded call's inputs: its relative error against the recorded output."""
    return [
        relative_error(ref, first_tensor(candidate(*to_device(a, device), **to_device(k, device))))
        for a, k, ref in calls
    ]


def module_relative_errors(
    reference: torch.nn.Module, candidate: torch.nn.Module, inputs: list[tuple[tuple, dict]]
) -> list[float]:
    """Two modules, the same inputs: the candidate's relative error per call (e.g. FP8 vs bf16 weights)."""
    with torch.inference_mode():
        return [relative_error(first_tensor(reference(*a, **k)), first_tensor(candidate(*a, **k))) for a, k in inputs]


def fp8_quality_report(errors: list[float], reference: str, steps: int) -> dict[str, Any]:
    per_step = max(1, len(errors) // steps)  # true CFG (Qwen) calls the transformer twice per step
    finite = [e for e in errors if math.isfinite(e)]
    return {
        "reference": reference,
        "steps": steps,
        "calls": len(errors),
        "per_call": errors,
        "per_step": [statistics.fmean(errors[i : i + per_step]) for i in range(0, len(errors), per_step)],
        "mean": statistics.fmean(finite) if finite else math.nan,
        "max": max(finite) if finite else math.nan,
        "non_finite": len(errors) - len(finite),
        "note": "random weights: real checkpoints have outlier weights and activations that FP8 handles worse",
    }


# --- profile: one Easel call per family -----------------------------------------------------------------------------


def profile_family(bench: FamilyBench, state: State) -> dict[str, Any]:
    """A torch.profiler trace (CPU + CUDA activities) of one Easel call at batch 1, --profile-steps steps (the
    per-step pattern repeats; fewer steps keep the trace small), as chrome trace JSON (gzip) plus a summary."""
    args = bench.args
    args.profile.mkdir(parents=True, exist_ok=True)
    path = args.profile / f"trace_{bench.family}.json.gz"
    steps = min(bench.steps, args.profile_steps)
    summary = profile_call(lambda: state.run(1, steps), bench.device, path)
    summary.update(variant=state.variant, steps=steps)
    print_profile(bench.family, summary)
    return summary


def profile_call(fn: Callable[[], None], device: torch.device, path: Path, top: int = 10) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        with record_function("easel_call"):
            fn()
        sync(device)
    wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    summary = summarize_trace(trace.get("traceEvents", []), top=top)
    summary.update(trace=str(path), wall_s=wall, trace_bytes=path.stat().st_size)
    return summary


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def merge_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def summarize_trace(events: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """From chrome-trace events: the top CUDA kernels by total time, and the time the GPU sat idle between its
    first and last activity (the CPU-side gaps: launch overhead, host syncs, Python), with the largest gaps and the
    CPU op running during each. Times in ms. Without GPU events (CPU runs), the top CPU ops instead."""
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    gpu = [e for e in complete if e.get("cat") in GPU_CATEGORIES]
    cpu_ops = [e for e in complete if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]

    def top_by_name(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        totals: dict[str, list[float]] = {}
        for e in evs:
            t = totals.setdefault(e.get("name", "?"), [0.0, 0])
            t[0] += float(e["dur"])
            t[1] += 1
        whole = sum(t[0] for t in totals.values()) or 1.0
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": n, "total_ms": t / 1000, "count": c, "share": t / whole} for n, (t, c) in ranked]

    out: dict[str, Any] = {"gpu_events": len(gpu), "cpu_ops": len(cpu_ops)}
    if not gpu:
        out["top_cpu_ops"] = top_by_name([e for e in cpu_ops if e.get("cat") == "cpu_op"])
        return out
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    busy = merge_intervals([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu])
    window = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    gaps = [(b0, a1 - b0) for (_, b0), (a1, _) in itertools.pairwise(busy) if a1 > b0]
    largest = sorted(gaps, key=lambda g: -g[1])[:5]
    annotated = []
    for start, dur in largest:
        overlapping = [
            (min(float(e["ts"]) + float(e["dur"]), start + dur) - max(float(e["ts"]), start), e.get("name", "?"))
            for e in cpu_ops
            if e.get("cat") == "cpu_op" and float(e["ts"]) < start + dur and float(e["ts"]) + float(e["dur"]) > start
        ]
        # The innermost op that spans most of the gap names what the host was doing.
        best = min((o for o in overlapping if o[0] >= 0.5 * dur), default=None, key=lambda o: o[0])
        annotated.append({"at_ms": (start - busy[0][0]) / 1000, "gap_ms": dur / 1000, "cpu_op": best and best[1]})
    out.update(
        top_kernels=top_by_name(kernels),
        gpu_window_ms=window / 1000,
        gpu_busy_ms=busy_us / 1000,
        gpu_idle_ms=(window - busy_us) / 1000,
        gpu_idle_fraction=(window - busy_us) / window if window > 0 else 0.0,
        idle_gaps=len(gaps),
        idle_gaps_over_100us=sum(1 for _, d in gaps if d > 100),
        largest_gaps=annotated,
    )
    return out


def print_profile(family: str, s: dict[str, Any]) -> None:
    print(f"  profile {family} ({s.get('variant')}, {s.get('steps')} steps, wall {s['wall_s']:.3f} s): {s['trace']}")
    if "top_kernels" in s:
        print(
            f"    GPU busy {s['gpu_busy_ms']:.1f} ms of {s['gpu_window_ms']:.1f} ms, idle {s['gpu_idle_fraction']:.1%} "
            f"in {s['idle_gaps']} gaps ({s['idle_gaps_over_100us']} over 100 us)"
        )
        for k in s["top_kernels"]:
            print(f"    {k['total_ms']:9.2f} ms {k['share']:6.1%} x{k['count']:<6d} {k['name'][:100]}")
        for g in s["largest_gaps"]:
            print(f"    gap {g['gap_ms']:8.3f} ms at {g['at_ms']:9.2f} ms  during {g['cpu_op']}")
    else:
        print("    no GPU activity recorded; top CPU ops:")
        for k in s.get("top_cpu_ops", []):
            print(f"    {k['total_ms']:9.2f} ms {k['share']:6.1%} x{k['count']:<6d} {k['name'][:100]}")


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
    header = ["model", "variant", "s/img b1", "GPU s b1", "spread", "vs plain", "img/s (b)", "limit", "goal", "met"]
    rows, skipped = [], []
    for r in results:
        name = f"{r['family']} {r['size']}px {r['steps']}st"
        for variant, v in r["variants"].items():
            if "skipped" in v:
                rows.append([name, variant, *["-"] * (len(header) - 3), ""])
                skipped.append(f"{r['family']} {variant}: skipped: {v['skipped']}")
                name = ""
                continue
            b1 = v.get("batches", {}).get("1", {})
            ratio = v.get("ratio_vs_plain", {})
            tb = r.get("throughput_batch")
            top = v.get("batches", {}).get(str(tb), {}) if tb else {}
            goal = "" if v.get("goal_s_b1") is None else f"<={v['goal_s_b1']:g}s"
            met = {True: "ok", False: "MISS"}.get(v.get("meets_goal_s"), "")
            if v.get("goal_img_per_s") is not None:
                goal += f", >={v['goal_img_per_s']:g}/s"
                met += "/" + {True: "ok", False: "MISS"}.get(v.get("meets_goal_img_per_s"), "-")
            rows.append(
                [
                    name,
                    variant + ("" if v.get("interleaved_with_plain") or variant == "plain" else " *"),
                    fmt((b1.get("wall") or {}).get("median_s"), ".3f"),
                    fmt((b1.get("gpu") or {}).get("median_s"), ".3f"),
                    fmt((b1.get("wall") or {}).get("spread"), ".1%"),
                    " / ".join(f"{ratio[b]:.2f}x" for b in sorted(ratio, key=int)) if ratio else "",
                    f"{top['img_per_s']:.2f} (b{tb})"
                    if top.get("img_per_s")
                    else f"{v['img_per_s_saturated']:.2f} (best b{v['saturated_batch']})"
                    if len(v.get("batches", {})) > 1 and v.get("img_per_s_saturated")
                    else "",  # --sweep: the best batch size
                    fmt(v.get("limit_fraction", {}).get("1"), ".1%"),
                    goal,
                    met,
                ]
            )
            name = ""
    cells = [header, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print()
    for i, c in enumerate(cells):
        print("  ".join(c[j].ljust(widths[j]) if j < 2 else c[j].rjust(widths[j]) for j in range(len(c))).rstrip())
        if i == 0:
            print("  ".join("-" * n for n in widths))
    for line in skipped:
        print(line)
    print("\nwall-time medians; spread = (max - min) / median; vs plain = plain time / variant time (b1 / throughput")
    print("batch); * = not interleaved with plain (measured in a later group, see 'groups' in the JSON)")
    if not args.tiny:
        print(f"limit = FLOPs per image (performance.md §1.3) / time / {args.peak_tflops:g} TFLOP/s peak")


def summarize_dir(folder: Path) -> dict[str, Any]:
    """The issue's table from a `bench_gpu.sh` results folder (bench_gpu_<model>.json, bench_http.json): printed
    and returned (written to summary.json by the caller)."""
    families = []
    for family in FAMILIES:
        f = folder / f"bench_gpu_{family}.json"
        if f.exists():
            families.extend(json.loads(f.read_text()).get("results", []))
    summary: dict[str, Any] = {"folder": str(folder), "families": {}, "http": None}
    print(f"\nsummary of {folder}")
    for r in families:
        row: dict[str, Any] = {"published": r.get("published"), "variants": {}}
        for name, v in r["variants"].items():
            row["variants"][name] = (
                {"skipped": v["skipped"]}
                if "skipped" in v
                else {
                    k: v.get(k)
                    for k in (
                        "s_per_image_b1",
                        "gpu_s_b1",
                        "img_per_s_saturated",
                        "saturated_batch",
                        "ratio_vs_plain",
                        "limit_fraction",
                        "goal_s_b1",
                        "meets_goal_s",
                        "goal_img_per_s",
                        "meets_goal_img_per_s",
                        "interleaved_with_plain",
                        "setup_s",
                    )
                }
            )
        if "fp8_quality" in r:
            row["fp8_quality"] = {k: r["fp8_quality"].get(k) for k in ("mean", "max", "calls", "reference", "error")}
        summary["families"][r["family"]] = row
    print_table(
        families, argparse.Namespace(tiny=not families or families[0]["flops_per_image"] is None, peak_tflops=790.0)
    )
    for family, row in summary["families"].items():
        q = row.get("fp8_quality")
        if q and q["error"]:
            print(f"{family}: FP8 quality not measured: {q['error']}")
        elif q:
            print(
                f"{family}: FP8 denoiser output vs {q['reference']}: relative error mean {q['mean']:.4f}, "
                f"max {q['max']:.4f} over {q['calls']} calls"
            )
    http = folder / "bench_http.json"
    if http.exists():
        h = json.loads(http.read_text())
        o, b = h.get("overhead") or {}, h.get("batching") or {}
        summary["http"] = {
            "overhead_ratio_median": o.get("ratio_median"),
            "overhead_goal": HTTP_GOALS["overhead_ratio"],
            "overhead_met": o["ratio_median"] <= HTTP_GOALS["overhead_ratio"] if "ratio_median" in o else None,
            "batching_ratio": b.get("throughput_ratio"),
            "batching_goal": HTTP_GOALS["batching_ratio"],
            "batching_met": b["throughput_ratio"] >= HTTP_GOALS["batching_ratio"] if "throughput_ratio" in b else None,
        }
        s = summary["http"]
        print(
            f"\nHTTP vs direct (median): {fmt(s['overhead_ratio_median'], '.3f')}x (goal <= {s['overhead_goal']}); "
            f"batching on/off: {fmt(s['batching_ratio'], '.2f')}x (goal >= {s['batching_goal']})"
        )
        # bench.py's per-stage breakdown of the HTTP path (from the server's Server-Timing header), whatever its key.
        stages = {k: v for part in (h, o) for k, v in part.items() if "stage" in k.lower() or "timing" in k.lower()}
        if stages:
            summary["http"]["stages"] = stages
            print(f"HTTP path by stage (bench.py): {json.dumps(stages, default=str)[:600]}")
    return summary


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
        "torchao": importlib.metadata.version("torchao") if importlib.util.find_spec("torchao") else None,
        "device": str(device),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            cuda=torch.version.cuda,
        )
    return env


def perf_override(text: str) -> tuple[str, Any]:
    """--perf KEY=VALUE, the value read as YAML (off, true, 512, [[1024, 1024]] ...), as models.yaml would."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all four for FLUX/Qwen, no fp8 for SD")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU, 64x64, 2 steps (tests the harness)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (790: measured on an H100 SXM)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "regional", "full"], help="Easel variants")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument(
        "--perf",
        type=perf_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any models.yaml performance: setting for the Easel variants, e.g. attention=flash (repeatable)",
    )
    p.add_argument("--sweep", action="store_true", help="batch sizes 1, 2, 4, ... instead of b1 + the fixed batch")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of --sweep (default per model)")
    p.add_argument("--min-gain", type=float, default=0.03, help="--sweep stops below this img/s gain")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant and batch size")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of a warm-up call (the shapes are the same)")
    p.add_argument("--repeats", type=int, default=None, help="most interleaved rounds per batch (default per model)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the run, imports included (no limit)")
    p.add_argument(
        "--memory-fraction", type=float, default=0.85, help="share of device memory variants may fill together"
    )
    p.add_argument("--seed", type=int, default=0, help="weights seed (the same for every variant)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="trace one Easel call per model into DIR")
    p.add_argument("--profile-steps", type=int, default=2, help="steps of the profiled call")
    p.add_argument("--fp8-quality", action="store_true", help="FP8 denoiser output vs bf16 on the same inputs")
    p.add_argument("--fp8-quality-steps", type=int, default=10, help="steps of the reference trajectory")
    p.add_argument("--check-configs", action="store_true", help="only print full-size parameter counts (meta)")
    p.add_argument("--save-sd15", type=Path, metavar="DIR", help="only write a random SD1.5 folder + models.yaml")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="only print the table of a bench_gpu.sh folder")
    p.add_argument("--json-out", type=Path, help="default: $OUT/bench_gpu.json when $OUT is set")
    args = p.parse_args(argv)
    args.perf = dict(args.perf)
    args.partial = None
    if args.json_out is None and os.environ.get("OUT"):
        args.json_out = Path(os.environ["OUT"]) / ("bench_gpu_tiny.json" if args.tiny else "bench_gpu.json")
    return args


def process_started() -> float:
    """This process's start on the perf_counter clock: budgets count the imports too."""
    return time.perf_counter() - (time.time() - psutil.Process().create_time())


def main(argv: list[str] | None = None) -> int:
    started = process_started()
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights: NaN pixels in the final cast
    if args.summarize:
        summary = summarize_dir(args.summarize)
        (args.summarize / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return 0
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
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "partial"}
    report: dict[str, Any] = {"environment": environment(device), "args": params, "results": []}

    def write(partial: dict[str, Any] | None = None) -> None:
        """After every group and model: a step killed at its time limit keeps what it measured."""
        if not args.json_out:
            return
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**report, "results": [*report["results"], *([partial] if partial else [])]}
        payload["elapsed_s"] = time.perf_counter() - started
        args.json_out.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    args.partial = write
    try:
        for family in args.models:
            report["results"].append(FamilyBench(family, args, device, started).run())
            write()
    finally:
        if report["results"]:
            print_table(report["results"], args)
    print(f"\nbench_gpu: {time.perf_counter() - started:.0f} s in all (imports included)")
    if args.json_out:
        print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
