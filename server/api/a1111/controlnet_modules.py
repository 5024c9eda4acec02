"""The sd-webui-controlnet extension's preprocessor routes: `GET /controlnet/module_list` and `POST /controlnet/detect`
(its scripts/api.py), at the root as the extension mounts them and under /v2/automatic1111 like the other A1111
routes.

Only the preprocessors that can run here are listed (pipelines.controlnet_preprocessors): the weight-free ones, and
the depth ones whose model is in `<checkpoints_dir>/ControlNet/annotators/<name>/`. Detection runs off the event loop
under the image preparation limit (server.imagework), so at most `image_prep_concurrency` maps are made at once; the
depth models (torch) are imported by the pipelines side on first use, never by this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from pipelines import controlnet_preprocessors as cp
from server import imagework
from server.api.a1111.adapter import check_image_count
from server.api.a1111.schemas import A1111Model
from server.errors import ApiError
from server.images import b64, decode_image, encode_image
from server.settings import Settings

CONTROLNET_PREFIX = "/controlnet"
GATEWAY_CONTROLNET_PREFIX = "/v2/automatic1111/controlnet"


class DetectRequest(A1111Model):
    """The extension's detect body (each field a `Body` parameter there); -1 means the module's default."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images or data URLs")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = Field(-1, allow_inf_nan=False)
    controlnet_threshold_b: float = Field(-1, allow_inf_nan=False)
    controlnet_masks: list[str] = Field(default_factory=list, description="accepted; no module here uses a mask")
    low_vram: bool = False

    @model_validator(mode="before")
    @classmethod
    def _webuiapi_spelling(cls, data: Any) -> Any:
        # webuiapi's controlnet_detect() sends the images as `controlnet_images`.
        if isinstance(data, dict) and "controlnet_input_images" not in data and "controlnet_images" in data:
            data = {**data, "controlnet_input_images": data["controlnet_images"]}
        return data


class DetectResponse(A1111Model):
    info: str = "Success"
    images: list[str] = Field(default_factory=list, description="base64 PNG maps, one per input image")


def _models_dir(settings: Settings) -> Path | None:
    """The A1111 models directory; the annotators live in its ControlNet/annotators folder."""
    return settings.checkpoints_dir


def _module_error(module: str, error: cp.PreprocessorError) -> ApiError:
    """422 naming the module, led by the extension's own words ("Module not available" / "Module not supported")."""
    try:
        known = cp.module_spec(module)
    except cp.PreprocessorError:
        known = None
    lead = (
        "Module not supported" if known is not None and known.kind is cp.Kind.IMAGE_PROMPT else "Module not available"
    )
    return ApiError(422, f"controlnet_module: {lead}: {error}", field="controlnet_module", code="invalid_request")


def detect_maps(body: DetectRequest, settings: Settings) -> list[str]:
    """Decode each input, check the map's size against max_work_pixels, make the map and encode it (PNG base64)."""
    params = cp.PreprocessorParams(
        resolution=body.controlnet_processor_res,
        threshold_a=body.controlnet_threshold_a,
        threshold_b=body.controlnet_threshold_b,
    )
    models_dir = _models_dir(settings)
    encoded: list[str] = []
    for i, data in enumerate(body.controlnet_input_images):
        field = f"controlnet_input_images[{i}]"
        image = decode_image(data, field, settings.max_body_bytes, settings.max_image_pixels)
        width, height = cp.output_size(body.controlnet_module, image.size, params)
        if width * height > settings.max_work_pixels:
            raise ApiError(
                422,
                f"controlnet_processor_res: the map of {field} ({image.width}x{image.height}) would be "
                f"{width}x{height}, above max_work_pixels={settings.max_work_pixels}",
                field="controlnet_processor_res",
            )
        result = cp.run_preprocessor(body.controlnet_module, image, params, models_dir)
        encoded.append(b64(encode_image(result, "png")))
    return encoded


def build_router() -> APIRouter:
    router = APIRouter(tags=["controlnet"])

    @router.get("/module_list")
    async def module_list(request: Request, alias_names: bool = False) -> dict[str, Any]:
        """The preprocessors that can run here, with the extension's slider settings (`alias_names`: the UI
        labels, e.g. `depth_midas` for `depth`)."""
        return cp.module_list(_models_dir(request.app.state.settings), alias_names=alias_names)

    @router.post("/detect", response_model=DetectResponse)
    async def detect(request: Request, body: DetectRequest) -> DetectResponse:
        """Run one preprocessor on each of `controlnet_input_images`; answers the maps as base64 PNGs."""
        settings: Settings = request.app.state.settings
        try:
            cp.check_runnable(body.controlnet_module, _models_dir(settings))
        except cp.PreprocessorError as error:
            raise _module_error(body.controlnet_module, error) from None
        if not body.controlnet_input_images:
            raise ApiError(422, "controlnet_input_images: No image selected", field="controlnet_input_images")
        check_image_count("controlnet_input_images", len(body.controlnet_input_images), settings)
        try:
            images = await imagework.prepare(request, detect_maps, body, settings)
        except cp.PreprocessorError as error:  # a model folder removed between the check and the run
            raise _module_error(body.controlnet_module, error) from None
        return DetectResponse(info="Success", images=images)

    return router


def install(app: Any) -> None:
    """Mount the routes at /controlnet (the extension's place) and under /v2/automatic1111."""
    app.include_router(build_router(), prefix=CONTROLNET_PREFIX)
    app.include_router(build_router(), prefix=GATEWAY_CONTROLNET_PREFIX)
