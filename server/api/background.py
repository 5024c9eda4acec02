"""`background: transparent`, shared by the dialects that have it: only a model listed in `alpha_model_ids` can make
alpha, and only png or webp can carry it."""

from __future__ import annotations

from pipelines.registry import ModelSpec
from server.errors import ApiError, FieldError
from server.settings import Settings


def check_transparent_background(
    background: str | None,
    output_format: str | None,
    spec: ModelSpec,
    settings: Settings,
    *,
    background_field: str = "background",
    format_field: str = "output_format",
) -> None:
    """422 naming the field when a transparent background cannot be made."""
    if background != "transparent":
        return
    if spec.id not in settings.alpha_model_ids:
        message = (
            f"transparent backgrounds need a model that produces alpha; '{spec.id}' does not (use auto or opaque, "
            "or list such a model in alpha_model_ids)"
        )
        raise ApiError.invalid([FieldError(background_field, message)])
    if output_format == "jpeg":
        raise ApiError.invalid([FieldError(format_field, "jpeg has no alpha channel; use png or webp")])
