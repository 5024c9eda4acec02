"""Wire schemas of the A1111 dialect: every request field optional with A1111's API defaults, `null` = default,
unknown keys ignored (pydantic v1 `extra=ignore` in A1111). Limits that depend on settings are checked in the
adapter, which names the field in its 422."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class A1111Model(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A1111 clients send `null` for anything they do not set; treat it as "use the default".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class GenerationBase(A1111Model):
    """Fields shared by txt2img and img2img (`StableDiffusionProcessing.__init__`, v1.10)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's API default sampler (used when sampler_name is empty)
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(GenerationBase):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class GatewayTxt2ImgRequest(Txt2ImgRequest):
    """`/v2/automatic1111/sdapi/v1/txt2img`: the gateway's field `model` and its defaults (steps 20)."""

    prompt: str
    model: str | None = Field(None, description="models.yaml id, alias or A1111 title")
    steps: int = 20
    # Not echoed in `parameters` (exclude): it is about the call, not the generation.
    async_: bool = Field(
        False, alias="async", exclude=True, description="Answer 202 with a task address; poll GET /v2/tasks/{address}"
    )


class Img2ImgRequest(GenerationBase):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None  # A1111 property: sets both mask_blur_x and mask_blur_y
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GatewayImg2ImgRequest(Img2ImgRequest):
    """`/v2/automatic1111/sdapi/v1/img2img`: as the gateway's txt2img, `model`, steps 20 and `"async": true`."""

    model: str | None = Field(None, description="models.yaml id, alias or A1111 title")
    steps: int = 20
    async_: bool = Field(
        False, alias="async", exclude=True, description="Answer 202 with a task address; poll GET /v2/tasks/{address}"
    )


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs (no data: prefix), each with its infotext chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string with A1111's 32 keys")


class PNGInfoRequest(A1111Model):
    image: str = Field(description="base64 image or data URL")


class InterrogateRequest(A1111Model):
    image: str = Field("", description="base64 image or data URL")
    model: str = Field("clip", description="clip or deepdanbooru")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    queued: int = Field(0, description="jobs waiting behind the current one (Easel extension)")


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class NameItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None
