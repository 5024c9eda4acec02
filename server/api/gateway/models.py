"""`GET /v2/models`: the registry as a client that builds requests needs it: each model's family, the multiple its
sides must be, its defaults and what it can do, plus the server's limits. (The A1111 `/sd-models` listing has none
of that, and OpenAI's `/v1/models` only names.)"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from pipelines.registry import ModelSpec
from server.api.gateway.adapter import EDIT_FAMILIES
from server.settings import Settings


class ModelInfo(BaseModel):
    id: str
    title: str = Field(description="A1111 title (the gateway's `model` takes the id, an alias or this)")
    family: str = Field(description="sd15 | sdxl | flux | qwen-image | qwen-image-edit")
    description: str
    aliases: list[str]
    size_multiple: int = Field(description="width and height must be multiples of this (and at least it)")
    default_width: int
    default_height: int
    default_steps: int
    default_cfg: float
    default_sampler: str | None
    tasks: list[str] = Field(description="txt2img, img2img, inpaint: what the A1111 gateway routes run on it")


class Limits(BaseModel):
    max_width: int
    max_height: int
    max_steps: int
    max_images_per_request: int = Field(description="batch_size x n_iter")
    max_prompt_chars: int


class ModelList(BaseModel):
    default_model: str
    models: list[ModelInfo]
    limits: Limits


def model_info(spec: ModelSpec) -> ModelInfo:
    d = spec.defaults
    tasks = (["txt2img"] if spec.family not in EDIT_FAMILIES else []) + ["img2img", "inpaint"]
    return ModelInfo(
        id=spec.id,
        title=spec.title,
        family=spec.family,
        description=spec.description,
        aliases=list(spec.aliases),
        size_multiple=spec.size_multiple,
        default_width=d.width,
        default_height=d.height,
        default_steps=d.steps,
        default_cfg=d.cfg,
        default_sampler=d.sampler,
        tasks=tasks,
    )


def build_router() -> APIRouter:
    router = APIRouter(tags=["gateway"])

    @router.get("/v2/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """Every model of models.yaml (and the checkpoints folder) with its size multiple, defaults and tasks."""
        registry = request.app.state.registry
        s: Settings = request.app.state.settings
        limits = Limits(
            max_width=s.max_width,
            max_height=s.max_height,
            max_steps=s.max_steps,
            max_images_per_request=s.max_images_per_request,
            max_prompt_chars=s.max_prompt_chars,
        )
        return ModelList(default_model=registry.default_model, models=[model_info(m) for m in registry], limits=limits)

    return router
