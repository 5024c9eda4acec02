"""The studio page: a small web UI served by Easel itself at `/` and `/studio` (generate, watch, browse).

Plain HTML, CSS and ES modules shipped as package data (server/studio/static): no build step, no CDN, no request
to anywhere but this server, so it works on an air-gapped box. The page and its assets are public; every data call
it makes goes to the public APIs (`/v2/...`) with the caller's key as a Bearer header when keys exist.

Served with a strict Content-Security-Policy (scripts and styles from this server only, no inline script), so an
injected string can never run as script in the page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATHS = ("/", "/studio")
ASSETS_PATH = "/studio-assets"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# data: and blob: images: live previews arrive as base64 in the event stream; an uploaded image is shown from a blob.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # result URLs carry signatures: never leak them in a Referer
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: an upgraded server serves its new page at once
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file of the static folder, read once: only these names are ever served (no path from the URL)."""
    assets = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[path.name] = Asset(body, CONTENT_TYPES[path.suffix], etag)
    return assets


def page_size(assets: dict[str, Asset]) -> int:
    """Bytes a first load downloads: the page and every asset (all of them are used)."""
    return sum(len(a.body) for a in assets.values())


def _answer(request: Request, asset: Asset | None) -> Response:
    if asset is None:
        return Response("not found", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def install(app: FastAPI) -> None:
    assets = load_assets()
    app.state.studio_assets = assets

    async def page(request: Request) -> Response:
        return _answer(request, assets.get("index.html"))

    for path in PAGE_PATHS:
        app.add_api_route(path, page, methods=["GET", "HEAD"], include_in_schema=False, name=f"studio{path}")

    @app.api_route(f"{ASSETS_PATH}/{{name}}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(request: Request, name: str) -> Response:
        return _answer(request, assets.get(name) if name != "index.html" else None)
