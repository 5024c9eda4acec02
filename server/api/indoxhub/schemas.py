"""Wire schema of IndoxHub's POST /api/v1/images/generations (seed 002): every field and default of the document.

Limits that do not depend on the model or on settings are checked here (422 naming the field, dotted inside
`additional_params`); sizes against the model and the server caps, and the prompt length, in `adapter.py`.
`null` means "the default" for every optional field, as the OpenAI SDK and IndoxHub's own clients send it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1
MAX_N = 10  # OpenAI's own bound for `n`; max_images_per_request may lower it
ASPECT_RATIO = re.compile(r"^\s*(\d{1,2})\s*:\s*(\d{1,2})\s*$")
MAX_ASPECT = 4.0  # the widest shape accepted either way (21:9 is 2.33)

ResponseFormat = Literal["url", "b64_json"]
# OpenAI's quality names: dall-e-3 (standard, hd) and gpt-image (auto, low, medium, high).
Quality = Literal["auto", "standard", "hd", "low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "opaque", "transparent"]


def _drop_nulls(data: Any) -> Any:
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class AdditionalParams(BaseModel):
    """Provider-specific parameters. Those a local model can honour are applied; `enhance_prompt`, `add_watermark`
    and any other key are accepted, not applied, and listed in the response's `message`."""

    model_config = ConfigDict(extra="allow")

    # Google-style
    negative_prompt: str | None = Field(None, description="What to avoid in the image")
    aspect_ratio: str | None = Field(None, description="W:H (1:1, 16:9, 9:16, ...): the shape at `size`'s area")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="Prompt adherence (the model's cfg)")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Reproducibility seed (absent or -1: random)")
    enhance_prompt: bool | None = Field(None, description="Accepted, not applied")
    add_watermark: bool | None = Field(None, description="Accepted, not applied")
    # OpenAI-style
    background: Background | None = Field(None, description="auto | opaque | transparent (alpha-capable models only)")
    output_format: OutputFormat | None = Field(None, description="png (default) | jpeg | webp")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0-100 (default 100)")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, value: str | None) -> str | None:
        if value is not None and parse_aspect_ratio(value) is None:
            raise ValueError(f"use W:H with whole numbers, at most {MAX_ASPECT:g}:1 either way (e.g. 1:1, 16:9, 9:16)")
        return value

    def ignored(self) -> list[str]:
        """Keys given that are accepted but not applied."""
        names = [name for name in ("enhance_prompt", "add_watermark") if getattr(self, name)]
        return names + sorted(self.model_extra or {})


class IndoxHubRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, description="Text description of the image")
    model: str | None = Field(
        None, max_length=256, description="A model id or alias; `provider/name` forms are accepted (openai/dall-e-3)"
    )
    provider: str | None = Field(None, max_length=100, description="Provider name; echoed in the response")
    size: str = Field("1024x1024", description="WxH, or auto (the model's default size)")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Number of images (1-{MAX_N})")
    quality: Quality | None = Field(None, description="auto, standard, hd, low, medium, high: scales the steps")
    style: str | None = Field(None, max_length=100, description="A style preset id (styles.yaml); vivid / natural")
    response_format: ResponseFormat = Field("url", description="url (served by this server, expiring) or b64_json")
    additional_params: AdditionalParams = Field(default_factory=AdditionalParams)
    byok_api_key: str | None = Field(
        None,
        repr=False,  # never in a repr, hence never in a log line or traceback that prints the request
        description="Accepted and ignored (never stored or logged): this server runs its own models",
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)

    def ignored(self) -> list[str]:
        """Top-level keys outside the document, and ignored `additional_params` keys (dotted)."""
        top = sorted(self.model_extra or {})
        return top + [f"additional_params.{name}" for name in self.additional_params.ignored()]


def parse_aspect_ratio(value: str) -> tuple[int, int] | None:
    m = ASPECT_RATIO.match(value)
    if m is None:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if a == 0 or b == 0 or max(a / b, b / a) > MAX_ASPECT:
        return None
    return a, b


class ImageData(BaseModel):
    url: str | None
    b64_json: str | None


class Usage(BaseModel):
    tokens_prompt: int = 0
    tokens_completion: int = 0
    tokens_total: int = 0
    cost: float = 0.0
    latency: float = Field(description="milliseconds, = duration_ms")


class IndoxHubResponse(BaseModel):
    request_id: str
    created_at: str
    duration_ms: float
    provider: str
    model: str
    success: bool
    message: str = Field(description="Empty, or which given parameters were accepted but not applied")
    data: list[ImageData]
    usage: Usage
