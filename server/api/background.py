"""`background: transparent`, shared by the dialects that have it (OpenAI, IndoxHub, Genrex).

Alpha comes from models.yaml's `background_removal:` model, applied by the engine after generation
(`GenerationRequest.transparent_background`), or from a model listed in `alpha_model_ids` (one that makes alpha
itself). Without either the request is refused naming the field; jpeg, which has no alpha channel, always is.
"""

from __future__ import annotations

from pipelines.registry import ModelSpec, Registry
from server.errors import ApiError, FieldError
from server.settings import Settings


def check_transparent_background(
    background: str | None,
    output_format: str | None,
    spec: ModelSpec,
    registry: Registry,
    settings: Settings,
    *,
    background_field: str = "background",
    format_field: str = "output_format",
) -> bool:
    """Whether the engine must remove the background (True only for `transparent` on a model without its own alpha).
    4xx naming the field when a transparent background cannot be made or carried."""
    if background != "transparent":
        return False
    if spec.id not in settings.alpha_model_ids and registry.background_removal is None:
        message = (
            f"transparent backgrounds need a background-removal model and none is configured ('{spec.id}' makes no "
            "alpha itself): use auto or opaque, or set background_removal in models.yaml"
        )
        raise ApiError.invalid([FieldError(background_field, message)])
    if output_format in ("jpeg", "jpg"):
        message = "jpeg has no alpha channel: a transparent background needs png or webp"
        raise ApiError.invalid([FieldError(format_field, message)])
    return spec.id not in settings.alpha_model_ids
