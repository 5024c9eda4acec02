"""Wire schemas of the GenPicz-style API (seed 001): every field, default and limit of the document.

Limits that need no settings are checked here (FastAPI answers 422 naming the field); the style (the server's
presets), sizes against the model and server caps, `upscale` against the pixel cap and `webhook_url` against the
webhook policy (server/webhooks/policy.py) are checked in `adapter.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 1500
MAX_NEGATIVE_PROMPT_CHARS = 500
MAX_SEED = 2**32 - 1
MAX_WEBHOOK_URL_CHARS = 2048
SIDES = (512, 768, 1024, 1280, 1920)

Side = Literal[512, 768, 1024, 1280, 1920]
Quality = Literal["standard", "hd", "ultra"]
Status = Literal["queued", "processing", "completed", "failed"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text description (max 1,500 chars)")
    style: str = Field("auto", max_length=100, description="Style preset id (GET /v1/styles)")
    width: Side = Field(1024, description="Output width: 512, 768, 1024, 1280 or 1920")
    height: Side = Field(1024, description="Output height: same values as width")
    quality: Quality = Field("hd", description="standard | hd | ultra: fewer or more denoising steps")
    negative_prompt: str = Field("", max_length=MAX_NEGATIVE_PROMPT_CHARS, description="Elements to avoid (max 500)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; omit for a random one")
    upscale: bool = Field(False, description="Upscale the output 4x")
    webhook_url: str | None = Field(
        None, max_length=MAX_WEBHOOK_URL_CHARS, description="HTTPS URL to POST the result to when the job completes"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class GenerationError(BaseModel):
    code: str
    message: str


class Generation(BaseModel):
    """The body of POST /v1/generate and GET /v1/generations/{id}."""

    generation_id: str = Field(description='"gen_" + an unguessable id')
    status: Status
    image_url: str | None = Field(description="Absolute URL of the PNG (null until completed)")
    width: int = Field(description="Width of the image at image_url (4x the requested width with upscale)")
    height: int
    style: str
    seed: int | None = Field(description="The seed used (null while a random seed is not yet drawn)")
    created_at: str = Field(description="ISO 8601, UTC, e.g. 2025-06-01T10:32:44Z")
    credits_used: int
    error: GenerationError | None = Field(None, description="Only when status is failed")


class GenerationList(BaseModel):
    data: list[Generation]
    total: int = Field(description="All generations, whatever the page")
    limit: int
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last")
    page: int | None = Field(description="The page number, when paging by `page` (null when paging by `cursor`)")


class Deleted(BaseModel):
    deleted: bool
    id: str


class StyleItem(BaseModel):
    id: str
    name: str
    description: str
    thumbnail_url: str = Field(
        description="An example output of the style (PNG, public, not expiring; made on first fetch, then cached)"
    )


class StyleList(BaseModel):
    styles: list[StyleItem]


class ErrorDetail(BaseModel):
    code: str
    message: str
    status: int
    param: str | None = Field(None, description="The request field at fault, for invalid_request")


class ErrorBody(BaseModel):
    error: ErrorDetail
