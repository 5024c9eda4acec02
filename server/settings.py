"""Every limit, path and timeout in one place. Each field is settable as EASEL_<NAME> in the environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.upscale import UpscalerName

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
    # Several devices in one process: one engine (worker, pipeline cache, batcher) per device, requests routed to
    # a device that holds their model (pipelines.device_pool). "auto" = every visible GPU; a list or "cuda:0,cuda:1"
    # names them. Unset: one engine on `device`.
    devices: list[str] | Literal["auto"] | None = None
    device_affinity_slack: int = Field(0, ge=0)  # a device holding the model wins while it has <= this many more jobs
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
    def embeddings_dir(self) -> Path | None:
        return self.checkpoints_dir / "embeddings" if self.checkpoints_dir else None

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
    # Every image made from the inputs before generation (resize/crop to the output, masks, the "only masked"
    # paste-back, stitched references): refused with a 422 naming the field before it is allocated.
    max_work_pixels: int = Field(4096 * 4096, ge=64 * 64)
    # Requests decoding and preparing input images at once (the rest wait, up to queue_size, then 429): what bounds
    # the memory image decoding can take, as the admission queue bounds generation.
    image_prep_concurrency: int = Field(2, ge=1)
    max_prompt_chars: int = Field(20_000, ge=1)
    # Engine jobs one A1111 img2img script request may run (SD upscale: tiles per upscale), refused above.
    max_script_jobs: int = Field(256, ge=1)
    # A connection must send its complete request headers within this long of opening (or of the previous
    # response), or it is closed: clients that never finish their headers (slowloris) cannot hold connections.
    header_timeout_s: float = Field(10.0, gt=0)

    # Engine
    queue_size: int = Field(64, ge=1)  # bounded admission queue; full -> 429
    cache_max_models: int = Field(3, ge=1)  # pipelines kept in memory (LRU)
    cache_memory_budget_gb: float | None = None  # CUDA only: evict LRU pipelines above this many GiB
    sync_timeout_s: float = Field(300.0, gt=0)  # synchronous calls wait this long for their job
    # Deadline of every request that brings none (queue wait + run): past it, queued work is dropped before it runs
    # and running work stops at its next step, failing with 504 deadline_exceeded (docs/reliability.md R2).
    request_timeout_s: float = Field(600.0, gt=0)
    # On SIGTERM: stop admitting, let queued and running work finish this long, then cancel the rest (R5).
    drain_timeout_s: float = Field(30.0, ge=0)
    # Requests failing with out-of-memory in a row, each alone after memory was freed, that mark the engine dead
    # (/livez 503, restart the process); 0 = never (R6).
    max_consecutive_ooms: int = Field(3, ge=0)
    # Live previews of recorded jobs (GET /v2/tasks/{address}/events) every N denoising steps; 0 = none.
    preview_every_n_steps: int = Field(5, ge=0)
    # The share of each GPU's memory the server may allocate (a card shared with other programs); past it requests
    # fail as out of GPU memory (503). Unset: all of it.
    cuda_memory_fraction: float | None = Field(None, gt=0, le=1)

    # Logging: text (one line each, naming the request and job) or json (one object per line, for log collectors)
    log_format: Literal["text", "json"] = "text"

    # A1111 dialect
    a1111_version: str = "v1.10.1"

    # Access (server.access): API keys live in the database (`easel keys create`). With none and no api_auth the
    # server runs open, which `easel serve` allows only on a loopback address unless insecure_no_auth is set.
    # A1111's --api-auth: "user:pass[,user2:pass2]" (HTTP Basic on /sdapi/*). Checked strictly at start-up: a value
    # that yields no usable user stops the server (server.access.config) instead of leaving it open.
    api_auth: SecretStr | None = None
    # Basic-auth users who are admins (change the A1111 server-wide options, unload/reload/refresh, stop any job);
    # comma-separated or a JSON list. Every name must be a user of api_auth.
    api_auth_admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_auth_rate_limit: int = Field(60, ge=1)  # requests per minute per Basic-auth user (keys have their plan's)
    insecure_no_auth: bool = False  # serve a non-loopback address with no keys (anyone on the network can use it)
    credits_per_image: int = Field(1, ge=0)  # charged to a key's quota per image requested

    # Jobs, result files, the /v2 gateway
    # Any SQLAlchemy URL (e.g. postgresql+psycopg://user:pw@db/easel); default sqlite:///<data_dir>/easel.db.
    # A secret: it may hold a password, and /cmd-flags must not show it.
    database_url: SecretStr | None = None
    # Several server processes share the database (Ray ingress replicas): jobs are failed as interrupted only when
    # their process stops beating (60 s), not at every start-up; `easel serve --ray` sets it.
    shared_database: bool = False
    public_base_url: str | None = None  # e.g. https://images.example.com; default: the request's base URL
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)  # result URLs and finished job records live this long
    result_ttl_s_by_route: dict[str, float] = Field(default_factory=dict)  # per route, e.g. {"flux": 86400}
    # Result URLs are capability URLs (signed, expiring with the result): they load with no Authorization header,
    # in an <img> tag or a chat client. True: every result fetch needs credentials, as any other route.
    result_urls_require_auth: bool = False
    # Signs result URLs; default: a random secret kept in <data_dir>/result_url_secret. Changing it voids every
    # URL handed out.
    result_url_secret: SecretStr | None = None
    sweep_interval_s: float = Field(300.0, gt=0)  # how often expired results and records are deleted
    max_output_pixels: int = Field(2048 * 2048, ge=64 * 64)  # gemini-3 image_size is capped to this
    # gemini-3 `image_size: 4K` beyond the caps above: made at the model's size, then resized to 4K with this filter.
    # false: 4K is capped as 1K/2K are (no 4K images on this server).
    gemini_4k_upscale: bool = True
    gemini_upscaler: UpscalerName = "lanczos"
    # gpt-image quality -> denoising steps, as a factor of the model's default steps (models.yaml defaults.steps);
    # standard / hd are dall-e-3's names (OpenAI /v1/images), the gateway's routes take the first four
    gpt_image_quality_steps: dict[str, float] = Field(
        default_factory=lambda: {"auto": 1.0, "low": 0.5, "medium": 1.0, "high": 1.5, "standard": 1.0, "hd": 1.5}
    )
    gateway_img2img_strength: float = Field(0.75, ge=0.0, le=1.0)  # reference images without a mask
    openai_variation_strength: float = Field(0.6, gt=0.0, le=1.0)  # /v1/images/variations: how far from the image
    gateway_inpaint_strength: float = Field(1.0, ge=0.0, le=1.0)  # the white area of a gpt-image edit mask

    # Fetching image URLs (qwen edit `image`): loopback/private/link-local/metadata addresses are refused unless
    # one of these networks contains them (e.g. ["10.0.0.0/8"] for an internal image store).
    fetch_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    fetch_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    fetch_timeout_s: float = Field(20.0, gt=0)
    fetch_max_redirects: int = Field(3, ge=0, le=10)

    # Browsers (CORS): off unless origins are listed, so no web page can call this server from a visitor's browser.
    cors_allow_origins: list[str] = Field(default_factory=list)  # e.g. ["https://app.example.com"]
    cors_allow_origin_regex: str | None = None  # e.g. "https://.*\\.example\\.com"
    cors_allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "DELETE"])
    cors_allow_headers: list[str] = Field(default_factory=lambda: ["Authorization", "Content-Type"])
    cors_allow_credentials: bool = False  # cookies / HTTP auth on cross-origin calls

    # IndoxHub / Genrex dialects
    # Models that produce images with an alpha channel: `background: transparent` is refused for every other model.
    alpha_model_ids: list[str] = Field(default_factory=list)
    # Genrex quality -> denoising steps, as a factor of the model's default steps (high = the model's own default)
    genrex_quality_steps: dict[str, float] = Field(default_factory=lambda: {"low": 0.5, "medium": 0.75, "high": 1.0})

    # GenPicz dialect (/v1/generate)
    # quality -> denoising steps, as a factor of the genpicz model's default steps (models.yaml defaults.steps)
    genpicz_quality_steps: dict[str, float] = Field(default_factory=lambda: {"standard": 0.5, "hd": 1.0, "ultra": 1.5})
    genpicz_upscaler: UpscalerName = "lanczos"  # `upscale: true` resizes 4x with this Pillow filter
    genpicz_max_upscaled_pixels: int = Field(4096 * 4096, ge=64 * 64)  # 4x output above this: 422 naming `upscale`
    # `upscale` is a Studio plan feature (seed 001): keys on other plans get a 403 naming `upscale`. True opens it to
    # every plan. An open server (no keys) and admin keys may always upscale.
    genpicz_upscale_all_plans: bool = False
    # GET /v1/styles thumbnails: one picture per style of this prompt, made on first fetch and kept in the data dir.
    style_thumbnail_model: str | None = None  # default: models.yaml default_model
    style_thumbnail_size: int = Field(256, ge=64, le=1024)  # square side, rounded down to the model's multiple
    style_thumbnail_steps: int | None = Field(None, ge=1, le=150)  # default: the model's default steps
    style_thumbnail_prompt: str = "a lighthouse on a rocky coast at sunset"

    # Webhooks (server.webhooks): a signed POST when a job with a `webhook_url` finishes, retried from the database.
    webhook_allow_http: bool = False  # https targets only by default; true also accepts http://
    # Loopback/private/link-local/metadata targets are refused unless one of these networks contains them.
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    # Signs deliveries of jobs that no API key owns; default: a random secret kept in <data_dir>/webhook_secret.
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(10.0, gt=0)  # per attempt: connect, send, and wait for the answer
    webhook_max_attempts: int = Field(6, ge=1)  # then the delivery is `failed`
    webhook_retry_base_s: float = Field(2.0, gt=0)  # after failed attempt n: wait base * 2**(n-1) s ...
    webhook_retry_max_s: float = Field(300.0, gt=0)  # ... but never longer than this
    webhook_concurrency: int = Field(4, ge=1)  # deliveries in flight per process
    webhook_per_host_concurrency: int = Field(2, ge=1)  # ... of which at most this many to one host
    webhook_poll_interval_s: float = Field(1.0, gt=0)  # how often the database is checked for due deliveries
    webhook_retention_s: float = Field(7 * 24 * 3600.0, gt=0)  # delivered / failed records are kept this long

    # Ray Serve (`easel serve --ray`, deploy/ray-serve.yaml; server.ray_serve): the HTTP app as ingress replicas
    # over GPU worker replicas that hold the pipeline caches. Jobs and result files must then be shared: a
    # PostgreSQL database_url and a data_dir on a shared mount (README "Scaling out").
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or ray://host:10001: join a cluster
    # Ray's dashboard and job-submission API take anyone who can reach them (no authentication): loopback only.
    ray_dashboard_host: str = "127.0.0.1"
    ray_include_dashboard: bool = True
    ray_ingress_replicas: int = Field(1, ge=1)
    ray_ingress_num_cpus: float = Field(0.5, ge=0)
    ray_worker_num_gpus: float = Field(1.0, ge=0)  # per worker replica (0: CPU workers)
    ray_worker_num_cpus: float = Field(1.0, ge=0)
    ray_worker_min_replicas: int = Field(1, ge=0)  # autoscaling bounds; equal values: a fixed number
    ray_worker_max_replicas: int = Field(1, ge=1)
    ray_worker_target_ongoing_requests: float = Field(4.0, gt=0)  # jobs in flight per replica the autoscaler aims at
    ray_max_models_per_replica: int | None = Field(None, ge=1)  # default: cache_max_models
    ray_accept_timeout_s: float = Field(60.0, gt=0)  # a worker must acknowledge a submitted job within this

    @field_validator("devices", mode="before")
    @classmethod
    def _split_devices(cls, value: object) -> object:
        """EASEL_DEVICES=cuda:0,cuda:1 (or one name) as well as a JSON list or "auto"."""
        if isinstance(value, str) and value.strip() != "auto":
            return [d.strip() for d in value.split(",") if d.strip()]
        return value

    @field_validator("api_auth_admins", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        """EASEL_API_AUTH_ADMINS=ann,ben as well as a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [n.strip() for n in text.split(",") if n.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'easel.db').resolve()}"

    def result_ttl_for(self, route: str) -> float:
        return self.result_ttl_s_by_route.get(route, self.result_ttl_s)
