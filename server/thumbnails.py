"""Example thumbnails of the style presets (GenPicz GET /v1/styles, seed 001: "IDs, names, and example output
thumbnails").

Each style's thumbnail is one image of a fixed sample prompt in that style, made with the default model at a small
size and a fixed seed. Its address carries a hash of everything that shapes the picture (the style's templates, the
model's models.yaml entry, the prompt, size, steps and seed): when the model or the style changes, the address changes
and a new thumbnail is made; an address, once made, always serves the same bytes (public, cacheable, not expiring).

Made lazily: GET /v1/styles only computes addresses; the first fetch of an address generates the picture (one engine
job, shared by concurrent fetches) and stores it as <data_dir>/style-thumbnails/<hash>.png.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pipelines.engine_api import EngineClient
from pipelines.registry import ModelSpec, Registry
from pipelines.request import GenerationRequest
from server.images import encode_image
from server.settings import Settings
from server.styles import Style, StyleBook

log = logging.getLogger("easel.styles")

PATH_PREFIX = "/v1/style-thumbnails/"  # public: the access middleware lets it through (server.access.middleware)
FOLDER = "style-thumbnails"
SEED = 0
KEY_CHARS = 32  # of the sha256 hex digest: plenty against collisions, short in a URL


class Thumbnails:
    def __init__(self, settings: Settings, registry: Registry, styles: StyleBook):
        self.settings = settings
        self.registry = registry
        self.styles = styles
        self.folder = Path(settings.data_dir) / FOLDER
        self._making: dict[str, asyncio.Future[Path]] = {}

    def model(self) -> ModelSpec:
        name = self.settings.style_thumbnail_model or self.registry.default_model
        spec = self.registry.resolve(name)
        return spec if spec is not None else self.registry.get(self.registry.default_model)

    def request_for(self, style: Style, spec: ModelSpec) -> GenerationRequest:
        side = max(spec.size_multiple, self.settings.style_thumbnail_size // spec.size_multiple * spec.size_multiple)
        prompt, negative = style.apply(self.settings.style_thumbnail_prompt)
        return GenerationRequest(
            model=spec.id,
            prompt=prompt,
            negative_prompt=negative,
            width=side,
            height=side,
            steps=self.settings.style_thumbnail_steps or spec.defaults.steps,
            guidance=spec.defaults.cfg,
            seed=SEED,
            tags={"dialect": "genpicz", "route": "style-thumbnail", "style": style.id},
        )

    def key(self, style: Style, spec: ModelSpec) -> str:
        """A hash of the style and the model entry (and the request they make): the thumbnail's identity."""
        req = self.request_for(style, spec)
        identity = {
            "style": style.model_dump(),
            "model": spec.model_dump(mode="json"),
            "request": [req.prompt, req.negative_prompt, req.width, req.height, req.steps, req.guidance, req.seed],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]

    def urls(self, base_url: str) -> dict[str, str]:
        """Style id -> its thumbnail's absolute URL (nothing is generated here)."""
        spec = self.model()
        return {style.id: f"{base_url}{PATH_PREFIX}{self.key(style, spec)}.png" for style in self.styles}

    def style_for(self, key: str) -> Style | None:
        """The style whose current thumbnail has this key (None for an unknown or outdated key)."""
        spec = self.model()
        return next((style for style in self.styles if self.key(style, spec) == key), None)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    async def get(self, key: str, engine: EngineClient) -> Path | None:
        """The thumbnail file, made now if it is not stored yet; None if the key is no current style's."""
        path = self.path(key)
        if path.is_file():
            return path
        style = self.style_for(key)
        if style is None:
            return None
        making = self._making.get(key)
        if making is not None:  # another request is making it: wait for that one
            return await asyncio.shield(making)
        making = asyncio.get_running_loop().create_future()
        self._making[key] = making
        try:
            made = await self._make(key, style, engine)
            making.set_result(made)
            return made
        except Exception as e:
            making.set_exception(e)
            making.exception()  # retrieved: the waiting callers get it, the loop does not log it
            raise
        finally:
            if not making.done():  # this request was cancelled (client gone): the waiters try again themselves
                making.cancel()
            del self._making[key]

    async def _make(self, key: str, style: Style, engine: EngineClient) -> Path:
        spec = self.model()
        request = self.request_for(style, spec)
        log.info("making the thumbnail of style %s with %s at %dx%d", style.id, spec.id, request.width, request.height)
        result = await engine.submit(request).wait(self.settings.sync_timeout_s)
        data = encode_image(result.images[0], "png")
        return await asyncio.to_thread(self._store, key, data)

    def _store(self, key: str, data: bytes) -> Path:
        """Written beside, then renamed: a reader never sees half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.folder)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        path = self.path(key)
        os.replace(tmp, path)
        spec = self.model()
        current = {f"{self.key(style, spec)}.png" for style in self.styles}
        for stale in self.folder.glob("*.png"):  # made for a style or model that has changed since
            if stale.name not in current:
                stale.unlink(missing_ok=True)
        return path
