"""Every limit, path and timeout in one place. Each field is settable as EASEL_<NAME> in the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, IPvAnyNetwork, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EASEL_", extra="ignore")

    # Where and what to serve
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    models: Path = REPO_ROOT / "models.yaml"
    styles: Path = REPO_ROOT / "styles.yaml"  # style presets (GenPicz/Genrex `style`, A1111 `styles`)
    data_dir: Path = Path("data")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # A1111 layout: <checkpoints_dir>/Stable-diffusion/*.safetensors are served next to models.yaml entries, and
    # <checkpoints_dir>/Lora/*.safetensors are the LoRAs `<lora:name:w>` can name.
    checkpoints_dir: Path | None = None
    configs_dir: Path | None = None  # local diffusers config folders for single files (`easel prefetch-configs`)
    allow_pickle: bool = False  # load .bin/.pt weights inside diffusers folders (unsafe: pickle runs code)

    # Dynamic batching of compatible requests into one pipeline call
    max_batch: int = Field(8, ge=1)  # images per call; 1 turns batching off
    max_batch_by_family: dict[str, int] = Field(default_factory=dict)  # e.g. {"flux": 2}
    max_wait_ms: float = Field(10.0, ge=0)  # a busy device waits this long for batch companions

    @property
    def lora_dir(self) -> Path | None:
        return self.checkpoints_dir / "Lora" if self.checkpoints_dir else None

    @property
    def stable_diffusion_dir(self) -> Path | None:
        return self.checkpoints_dir / "Stable-diffusion" if self.checkpoints_dir else None

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

    # Jobs, result files, the /v2 gateway
    # Any SQLAlchemy URL (e.g. postgresql+psycopg://user:pw@db/easel); default sqlite:///<data_dir>/easel.db.
    # A secret: it may hold a password, and /cmd-flags must not show it.
    database_url: SecretStr | None = None
    public_base_url: str | None = None  # e.g. https://images.example.com; default: the request's base URL
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)  # result URLs and finished job records live this long
    result_ttl_s_by_route: dict[str, float] = Field(default_factory=dict)  # per route, e.g. {"flux": 86400}
    sweep_interval_s: float = Field(300.0, gt=0)  # how often expired results and records are deleted
    max_output_pixels: int = Field(2048 * 2048, ge=64 * 64)  # gemini-3 image_size is capped to this
    # gpt-image quality -> denoising steps, as a factor of the model's default steps (models.yaml defaults.steps)
    gpt_image_quality_steps: dict[str, float] = Field(
        default_factory=lambda: {"auto": 1.0, "low": 0.5, "medium": 1.0, "high": 1.5}
    )
    gateway_img2img_strength: float = Field(0.75, ge=0.0, le=1.0)  # reference images without a mask
    gateway_inpaint_strength: float = Field(1.0, ge=0.0, le=1.0)  # the white area of a gpt-image edit mask

    # Fetching image URLs (qwen edit `image`): loopback/private/link-local/metadata addresses are refused unless
    # one of these networks contains them (e.g. ["10.0.0.0/8"] for an internal image store).
    fetch_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    fetch_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    fetch_timeout_s: float = Field(20.0, gt=0)
    fetch_max_redirects: int = Field(3, ge=0, le=10)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'easel.db').resolve()}"

    def result_ttl_for(self, route: str) -> float:
        return self.result_ttl_s_by_route.get(route, self.result_ttl_s)
