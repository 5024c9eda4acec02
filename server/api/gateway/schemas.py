"""Wire schemas of the /v2/image gateway: every field, default and limit of the gateway document.

Limits that do not depend on the model or on settings are checked here (FastAPI answers 422 naming the field);
the rest (sizes against the model's multiple and the server caps, prompt length) in `adapter.py`.
`"async": true` on any route answers 202 with a task address instead of waiting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1
FLUX_MULTIPLE = 32  # the gateway document's rule for FLUX width/height
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")

OutputFormat = Literal["png", "jpeg"]
Quality = Literal["auto", "low", "medium", "high"]
AspectRatio = Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
ImageSize = Literal["1K", "2K", "4K"]
GptImageSize = Literal["1024x1024", "1536x1024", "1024x1536", "auto"]


class GatewayRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str = Field(min_length=1, description="Image description (edit instructions for the edit routes)")
    async_: bool = Field(
        False, alias="async", description="Answer 202 at once with a task address; poll GET /v2/tasks/{address}"
    )
    webhook_url: str | None = Field(
        None, description="Easel extension: POSTed a signed generation.completed/failed event when the job ends"
    )


class FluxRequest(GatewayRequest):
    width: int = Field(1024, ge=64, description="Width (min 64, multiple of 32)")
    height: int = Field(1024, ge=64, description="Height (min 64, multiple of 32)")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Random seed (absent or -1: random)")
    safety_tolerance: int = Field(2, ge=0, le=6, description="0 strictest .. 6 least; accepted and recorded")
    output_format: OutputFormat = "png"
    input_image: str | None = Field(None, description="Reference image 1 (base64)")
    input_image_2: str | None = Field(None, description="Reference image 2 (base64)")
    input_image_3: str | None = Field(None, description="Reference image 3 (base64)")
    input_image_4: str | None = Field(None, description="Reference image 4 (base64)")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % FLUX_MULTIPLE:
            raise PydanticCustomError("multiple_of", "must be a multiple of {multiple}", {"multiple": FLUX_MULTIPLE})
        return value

    def reference_images(self) -> list[tuple[str, str]]:
        """(field name, base64) of each reference image given, in order."""
        names = ("input_image", "input_image_2", "input_image_3", "input_image_4")
        return [(name, value) for name in names if (value := getattr(self, name))]


class QwenRequest(GatewayRequest):
    size: str = Field("1024x1024", description="Output size, WxH")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Random seed (absent or -1: random)")


class QwenEditRequest(QwenRequest):
    prompt: str = Field(min_length=1, description="Edit instructions")
    image: str = Field(min_length=1, description="Source image: an http(s) URL or base64")


class GptImageRequest(GatewayRequest):
    size: GptImageSize = "1024x1024"
    quality: Quality = "auto"
    n: int = Field(1, ge=1, le=4, description="Number of images (1-4)")


class GptImageEditRequest(GatewayRequest):
    prompt: str = Field(min_length=1, description="Edit instructions")
    image: str = Field(min_length=1, description="Source image (base64)")
    mask: str | None = Field(None, description="Edit mask (base64, white = edit area)")
    size: GptImageSize = Field("1024x1024", description="Output size (auto: the source image's size)")
    quality: Quality = "auto"
    n: int = Field(1, ge=1, le=4, description="Number of images (1-4)")


class GeminiRequest(GatewayRequest):
    aspect_ratio: AspectRatio = "1:1"
    image_size: ImageSize = "1K"


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="base64 images (flux, gemini-3) or absolute URLs (gpt-image)")
    info: str | None = Field(None, description="gemini-3 4K beyond the size caps: how the image was made (upscaled)")


class UrlsResponse(BaseModel):
    urls: list[str] = Field(description="absolute URLs served by this server; they expire (7 days by default)")
