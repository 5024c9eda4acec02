"""The multipart form of POST /v1/images/edits: image parts (`image`, repeated `image`, or `image[]` as the official
SDK sends arrays), an optional `mask`, and text fields validated by `EditFields`.

The body is already capped by the BodySizeLimit middleware (max_body_bytes); each image is then decoded with the
byte and pixel caps of `server.images.decode_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server.api.openai_images.adapter import MAX_EDIT_IMAGES, ImagePart
from server.api.openai_images.schemas import EditFields, VariationFields
from server.errors import ApiError, FieldError

IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
# Parts the parser accepts before we count them ourselves (so too many images is a 400 naming `image`)
MAX_FILES = MAX_EDIT_IMAGES + 8
MAX_FIELDS = 64


@dataclass(frozen=True)
class EditForm:
    fields: EditFields
    images: list[ImagePart]
    mask: ImagePart | None


@dataclass(frozen=True)
class VariationForm:
    fields: VariationFields
    image: ImagePart


def is_multipart(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith("multipart/form-data")


async def _part(field: str, value: UploadFile | str) -> ImagePart:
    if isinstance(value, str):  # a base64 / data URL string instead of a file: accepted, decoded the same way
        return ImagePart(field, value)
    return ImagePart(field, await value.read())


def validate_fields(values: dict[str, str], schema: type[EditFields | VariationFields] = EditFields) -> Any:
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        errors = [
            FieldError(".".join(str(p) for p in err["loc"]) or "body", err["msg"], err["type"]) for err in e.errors()
        ]
        raise ApiError.invalid(errors) from None


async def read_edit_form(form: FormData, content_type: str | None) -> EditForm:
    if not is_multipart(content_type):
        message = f"send multipart/form-data, as the OpenAI API takes image edits (got {content_type or 'no body'})"
        raise ApiError.invalid([FieldError("image", message)])
    images: list[ImagePart] = []
    masks: list[ImagePart] = []
    values: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in IMAGE_FIELDS:
            images.append(await _part(name, value))
        elif name == MASK_FIELD:
            masks.append(await _part(name, value))
        elif isinstance(value, str):
            values[name] = value  # a repeated text field: the last one wins
        else:
            raise ApiError.invalid([FieldError(name, "expected a text field, got a file")])
    if len(masks) > 1:
        raise ApiError.invalid([FieldError(MASK_FIELD, f"{len(masks)} masks sent; at most one (for the first image)")])
    fields = validate_fields(values)  # text fields first: a missing prompt is reported before image problems
    if not images:
        raise ApiError.invalid([FieldError("image", "missing", "missing")])
    return EditForm(fields, images, masks[0] if masks else None)


async def read_variation_form(form: FormData, content_type: str | None) -> VariationForm:
    """One `image` part (OpenAI takes exactly one) and the text fields of `VariationFields`."""
    if not is_multipart(content_type):
        got = content_type or "no body"
        message = f"send multipart/form-data, as the OpenAI API takes image variations (got {got})"
        raise ApiError.invalid([FieldError("image", message)])
    images: list[ImagePart] = []
    values: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in IMAGE_FIELDS:
            images.append(await _part(name, value))
        elif isinstance(value, str):
            values[name] = value
        else:
            raise ApiError.invalid([FieldError(name, "expected a text field, got a file")])
    fields = validate_fields(values, VariationFields)
    if not images:
        raise ApiError.invalid([FieldError("image", "missing", "missing")])
    if len(images) > 1:
        raise ApiError.invalid([FieldError("image", f"{len(images)} images sent; variations take exactly one")])
    return VariationForm(fields, images[0])
