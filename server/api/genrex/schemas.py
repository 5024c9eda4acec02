"""Wire schemas of the Genrex-style job API (seed 000): every field, default and limit of the document.

Limits that do not depend on the model or on settings are checked here (422 naming the field); the style against
the presets (styles.yaml), the size against the server caps, `background` against the model and `webhook_url`
against the webhook policy (server/webhooks/policy.py) in `adapter.py`.
`null` means "the default" for every optional field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_PROMPT = 10
MAX_PROMPT = 2000
MAX_URL = 2048

Tier = Literal["basic", "standard", "advanced"]
Size = Literal["landscape", "square", "portrait", "auto"]
Quality = Literal["low", "medium", "high"]
Format = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "transparent", "opaque"]
Status = Literal["queued", "processing", "completed", "failed"]


class CreateImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    prompt: str = Field(
        min_length=MIN_PROMPT, max_length=MAX_PROMPT, description="Detailed description of the image (10-2,000 chars)"
    )
    model: Tier = Field("standard", description="Model tier (models.yaml routes genrex-basic|standard|advanced)")
    style: str = Field("photograph", max_length=100, description="Style preset id (styles.yaml)")
    size: Size = Field("landscape", description="landscape 1536x1024, square 1024x1024, portrait 1024x1536, auto")
    quality: Quality = Field("high", description="low | medium | high: scales the model's default steps")
    format: Format = Field("png", description="png | jpeg | webp")
    background: Background = Field("auto", description="auto | opaque | transparent (alpha-capable models only)")
    webhook_url: str | None = Field(
        None, max_length=MAX_URL, description="https URL called when the image completes or fails (signed POST)"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("format", mode="before")
    @classmethod
    def _jpg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.strip().lower() == "jpg" else value


class CreateImageResponse(BaseModel):
    success: bool
    id: str = Field(description="The image's id (a UUID): poll GET /image/status/{id}")


class ImageUrl(BaseModel):
    url: str


class JobError(BaseModel):
    code: str | None
    message: str | None


class ImageStatusResponse(BaseModel):
    success: bool
    id: str
    status: Status
    data: ImageUrl | None = Field(None, description="Once completed: the image URL (served here, expiring)")
    error: JobError | None = Field(None, description="Once failed: why")
