"""Wire schemas of the OpenAI Images API (openai-python `image_generate_params`, `image_edit_params`,
`images_response`) plus Easel's extension fields.

Every optional field also accepts `null` (the SDK's types are Optional). Unknown fields are refused, as OpenAI does,
so a misspelt extension field (`negative` for `negative_prompt`) is a 400 naming it instead of being ignored.
Limits that depend on the model or on settings (size, steps, n vs max_images_per_request, prompt length) are checked
in adapter.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
MAX_N = 10  # OpenAI's limit; the server's max_images_per_request may be lower

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["transparent", "opaque", "auto"]


class ImageOptions(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw (edits: the edit instructions)")
    model: str | None = Field(
        None,
        description="A model id or alias from GET /v1/models (gpt-image-1, dall-e-3... map to local models); "
        "default: models.yaml `routes: openai` (generations) / `openai-edit` (edits)",
    )
    n: int | None = Field(None, ge=1, le=MAX_N, description="Number of images, 1-10 (and max_images_per_request)")
    size: str | None = Field(
        None,
        description="WxH (each side a multiple of the model's size multiple, within max_width/max_height) or `auto`: "
        "the model's default size (generations), the first image's size (edits)",
    )
    quality: Quality | None = Field(None, description="Scales the model's default steps (gpt_image_quality_steps)")
    response_format: ResponseFormat | None = Field(
        None, description="Default: `url` for dall-e model names, `b64_json` otherwise (GPT-image and local names)"
    )
    output_format: OutputFormat | None = Field(None, description="Default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, default 100")
    background: Background | None = Field(
        None,
        description="`transparent`: alpha from models.yaml's background_removal model (png/webp; refused without one)",
    )
    stream: bool | None = Field(
        None,
        description="Server-Sent Events: `image_generation.partial_image` / `image_edit.partial_image` (live "
        "previews), then `*.completed` with each image as base64",
    )
    partial_images: int | None = Field(None, ge=0, le=3, description="Partial images to stream (with `stream`)")
    user: str | None = Field(None, max_length=256, description="End-user id; recorded with the job")
    safety_identifier: str | None = Field(None, max_length=256, description="As `user`")
    # Easel extensions (send them with the SDK's `extra_body`)
    negative_prompt: str | None = Field(None, description="Easel extension: what not to draw")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Easel extension: seed (-1 or absent: random)")
    steps: int | None = Field(None, ge=1, description="Easel extension: denoising steps (overrides `quality`)")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=100.0, description="Easel extension: classifier-free guidance (default: the model's cfg)"
    )
    webhook_url: str | None = Field(
        None, description="Easel extension: POSTed a signed generation.completed/failed event when the job ends"
    )


class GenerateRequest(ImageOptions):
    """POST /v1/images/generations (JSON)."""

    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted for compatibility; no effect")
    style: Literal["vivid", "natural"] | None = Field(None, description="dall-e-3's style; accepted, no effect")


class EditFields(ImageOptions):
    """The text fields of POST /v1/images/edits (multipart/form-data); `image` and `mask` are file parts."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted for compatibility; no effect")


class VariationFields(BaseModel):
    """The text fields of POST /v1/images/variations (multipart/form-data; OpenAI's `image_create_variation_params`)
    plus Easel's extensions; `image` is the file part."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A model id or alias (dall-e-2...); default: routes: openai")
    n: int | None = Field(None, ge=1, le=MAX_N, description="Number of variations, 1-10 (and max_images_per_request)")
    size: str | None = Field(None, description="WxH (default 1024x1024, as OpenAI's) or `auto`: the image's size")
    response_format: ResponseFormat | None = Field(None, description="Default `url`, as OpenAI's variations")
    user: str | None = Field(None, max_length=256, description="End-user id; recorded with the job")
    # Easel extensions
    prompt: str | None = Field(None, description="Easel extension: what the variations should show (default: none)")
    negative_prompt: str | None = Field(None, description="Easel extension: what not to draw")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Easel extension: seed (-1 or absent: random)")
    steps: int | None = Field(None, ge=1, description="Easel extension: denoising steps (default: the model's)")
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, description="Easel extension: default the model's cfg")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="Easel extension: how far from the image (default openai_variation_strength)"
    )


def variation_form_openapi() -> dict[str, Any]:
    schema = VariationFields.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "The image to make variations of"},
        **schema["properties"],
    }
    schema["required"] = ["image"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class TokenDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    """Approximations: a local diffusion model counts no tokens (see usage in adapter.py)."""

    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    output_tokens_details: TokenDetails
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque", "transparent"]
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="The models.yaml id this name runs (an alias's model)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def edit_form_openapi() -> dict[str, Any]:
    """The multipart request body of /v1/images/edits for the OpenAPI page (the route reads the form itself to accept
    `image`, repeated `image` and the SDK's `image[]`)."""
    schema = EditFields.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {"type": "array", "items": binary, "description": "One or more images (also sent as `image[]`)"},
        "mask": {**binary, "description": "PNG whose transparent pixels (alpha 0) mark the area to edit"},
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error...")
    param: str | None = Field(description="The request field at fault, if any")
    code: str | None = Field(description="e.g. invalid_value, unknown_parameter, model_not_found, queue_full")


class ErrorResponse(BaseModel):
    error: ErrorDetail
