"""S3: image decoding caps bytes, pixels (decompression bombs) and formats before any pixel is decoded.

The bombs here are tiny files whose headers claim huge images; the refusal must come from the header (the
decoders' `load()` is made to fail loudly, so a test passes only if nothing was decoded). Formats Pillow can read but
that must never be tried on client bytes (EPS runs Ghostscript, PSD, ICO, PCX, TGA, SGI, FITS, PDF, SVG...) are
refused by the allow-list, not by luck.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image, ImageFile

from pipelines.registry import Registry, load_registry
from server.app import create_app
from server.errors import ApiError
from server.images import decode_image
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine

MAX_BYTES = 1_000_000
MAX_PIXELS = 4096 * 4096


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for `width` x `height` RGB pixels, with almost no pixel data after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    header = b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
    image = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return header + image + b";"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format=fmt, **params)
    return buf.getvalue()


HOSTILE_FORMATS = {
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\n%%EndComments\nshowpage\n",
    "PDF": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>',
    "FITS": b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 2800,
    "PSD": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + struct.pack(">II", 100000, 100000) + b"\x00\x08\x00\x03",
    "HTML": b"<html><body>not an image</body></html>",
}


@pytest.fixture(autouse=True)
def eps_is_never_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """The EPS reader must never be reached (it hands the file to Ghostscript)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the EPS decoder was given client bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)


def refused(data: bytes | str, status: int, field: str = "init_images") -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(data if isinstance(data, str) else b64(data), field, MAX_BYTES, MAX_PIXELS)
    error = caught.value
    assert error.status == status and error.field == field and error.message.startswith(f"{field}:"), error.message
    return error


def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded before the size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# decode_image --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (65_535, 65_535), (5_000, 5_000), (1, 20_000_000)])
def test_png_bombs_are_refused_from_the_header(monkeypatch: pytest.MonkeyPatch, width: int, height: int) -> None:
    no_pixel_decoding(monkeypatch)
    bomb = png_claiming(width, height)
    assert len(bomb) < 200
    error = refused(bomb, 413)
    assert str(MAX_PIXELS) in error.message


def test_gif_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    no_pixel_decoding(monkeypatch)
    refused(gif_claiming(60_000, 60_000), 413)


def test_an_image_at_the_limit_still_decodes() -> None:
    image = decode_image(b64(encoded("PNG")), "init_images", MAX_BYTES, MAX_PIXELS)
    assert image.size == (8, 8) and image.format == "PNG"


@pytest.mark.parametrize("name", sorted(HOSTILE_FORMATS))
def test_hostile_formats_are_refused(name: str) -> None:
    error = refused(HOSTILE_FORMATS[name], 422)
    assert "not a supported image" in error.message


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "SGI", "PPM", "IM", "DDS", "QOI"])
def test_formats_pillow_reads_but_we_do_not_accept_are_refused(fmt: str) -> None:
    """Real, valid files Pillow would open: refused because the format is not on the list."""
    try:
        data = encoded(fmt)
    except (KeyError, OSError, ValueError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    assert Image.open(io.BytesIO(data)).format  # Pillow itself reads it fine
    refused(data, 422)


def test_oversized_data_is_refused_before_base64_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> bytes:
        raise AssertionError("base64 was decoded before its size was checked")

    monkeypatch.setattr("server.images._b64decode", refuse)
    error = refused("A" * (MAX_BYTES * 2), 413)
    assert str(MAX_BYTES) in error.message
    refused("data:image/png;base64," + "A" * (MAX_BYTES * 2), 413, field="mask")


def test_data_urls_of_other_types_and_urls_are_refused() -> None:
    refused("data:image/svg+xml;base64," + b64(HOSTILE_FORMATS["SVG"]), 422)
    refused("data:text/html;base64," + b64(HOSTILE_FORMATS["HTML"]), 422)
    refused("data:image/png," + "x", 422)  # not base64
    refused("http://169.254.169.254/latest/meta-data", 422)  # decode_image never fetches
    refused("not base64 at all!!", 422)


def test_pillow_own_bomb_guard_stays_on() -> None:
    decode_image(b64(encoded("PNG")), "image", MAX_BYTES, MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS >= MAX_PIXELS


def test_every_decode_in_the_server_goes_through_decode_image() -> None:
    """Image.open on client bytes anywhere else would skip the checks above."""
    offenders = []
    for path in sorted((REPO_ROOT / "server").rglob("*.py")):
        if path.name == "images.py" and path.parent.name == "server":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bImage\.open\(|\bImageFile\.Parser\(", line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{lineno}")
    assert offenders == []


# Through the API: a 4xx naming the field, and the engine never sees the request --------------------------------------


@pytest.fixture
def registry() -> Registry:
    return load_registry(REPO_ROOT / "models.yaml")


@pytest.fixture
def client_and_engine(registry: Registry, tmp_path: Path):
    engine = FakeEngine(registry)
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)) as client:
        yield client, engine


def test_a1111_img2img_bomb_and_hostile_formats(client_and_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    client, engine = client_and_engine
    no_pixel_decoding(monkeypatch)
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64(png_claiming(100_000, 100_000))]})
    assert r.status_code == 413 and "init_images" in r.json()["detail"], r.text
    body = {"prompt": "x", "init_images": [b64(encoded("PNG"))], "mask": b64(HOSTILE_FORMATS["SVG"])}
    monkeypatch.undo()
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"], r.text
    r = client.post("/sdapi/v1/png-info", json={"image": b64(HOSTILE_FORMATS["EPS"])})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"], r.text
    assert engine.requests == []


def test_gateway_bomb_and_hostile_formats(client_and_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    client, engine = client_and_engine
    no_pixel_decoding(monkeypatch)
    bomb = {"prompt": "x", "image": b64(png_claiming(100_000, 100_000))}
    r = client.post("/v2/image/qwen/edit", json=bomb)
    assert r.status_code == 413 and r.json()["error"]["field"] == "image", r.text
    r = client.post("/v2/image/flux/generate", json={"prompt": "x", "input_image": b64(HOSTILE_FORMATS["PDF"])})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input_image", r.text
    assert engine.requests == []
