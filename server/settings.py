"""Every limit, path and timeout in one place. Each field is settable as EASEL_<NAME> in the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EASEL_", extra="ignore")

    # Where and what to serve
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    models: Path = REPO_ROOT / "models.yaml"
    data_dir: Path = Path("data")
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    # Request limits (refused with a 4xx naming the field)
    max_width: int = Field(2048, ge=64)
    max_height: int = Field(2048, ge=64)
    max_steps: int = Field(150, ge=1)
    max_images_per_request: int = Field(16, ge=1)  # batch_size * n_iter
    max_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)  # decoded input images (decompression bombs)
    max_prompt_chars: int = Field(20_000, ge=1)

    # Engine
    queue_size: int = Field(64, ge=1)  # bounded admission queue; full -> 429
    cache_max_models: int = Field(3, ge=1)  # pipelines kept in memory (LRU)
    cache_memory_budget_gb: float | None = None  # CUDA only: evict LRU pipelines above this many GiB
    sync_timeout_s: float = Field(300.0, gt=0)  # synchronous calls wait this long for their job

    # A1111 dialect
    a1111_version: str = "v1.10.1"
