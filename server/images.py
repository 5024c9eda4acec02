"""Image decoding with size caps, and encoding with the A1111 infotext embedded.

Input images arrive as base64 (raw or `data:image/...;base64,`). Every check that can be made before the expensive
part is made first: the base64 length before decoding, the header's pixel count before the pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from server.errors import ApiError
from server.timing import stage

# Pillow plugin names we open; anything else (PSD, EPS, ICNS...) is refused before any decoder runs. MPO is how
# Pillow names the JPEGs many phones write.
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
PNG_COMPRESS_LEVEL = 1
ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
INFOTEXT_KEY = "parameters"  # the PNG tEXt key A1111 writes and reads

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.+-]+)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_USER_COMMENT_PREFIXES = {b"UNICODE\x00": "utf-16-be", b"ASCII\x00\x00\x00": "ascii", b"\x00" * 8: "utf-8"}


def _strip_data_url(data: str, field: str) -> str:
    m = _DATA_URL.match(data)
    if m is None:
        return data
    mime, params = m.group("mime").lower(), m.group("params").lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(422, f"{field}: data URL is '{mime}', not an image", field=field)
    if ";base64" not in params:
        raise ApiError(422, f"{field}: data URL must be base64-encoded (';base64,')", field=field)
    return data[m.end() :]


def _b64decode(data: str, field: str) -> bytes:
    data = _WHITESPACE.sub("", data)  # base64.encodebytes() output has newlines every 76 characters
    data += "=" * (-len(data) % 4)
    try:
        if "-" in data or "_" in data:
            return base64.urlsafe_b64decode(data)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64 image data", field=field) from None


def _open_formats() -> list[str]:
    Image.init()  # registers the WEBP/TIFF/MPO openers (only the common five are there before); no-op afterwards
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def _ensure_pillow_limit(max_pixels: int) -> None:
    # Pillow refuses images above 2x MAX_IMAGE_PIXELS inside Image.open; keep that guard above our own cap so our
    # (clearer) error decides, and never lower a limit someone else raised.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Base64 (raw or data URL) -> a loaded PIL image. Raises ApiError 413 (too big) or 422 (not a usable image)."""
    if not isinstance(data, str) or not data.strip():
        raise ApiError(422, f"{field}: expected a base64-encoded image", field=field)
    data = data.strip()
    if data.startswith(("http://", "https://")):
        raise ApiError(422, f"{field}: image URLs are not fetched; send the image as base64", field=field)
    data = _strip_data_url(data, field)
    approx_bytes = len(data) * 3 // 4
    if approx_bytes > max_bytes:
        message = f"{field}: image of about {approx_bytes} bytes exceeds the limit of {max_bytes}"
        raise ApiError(413, message, field=field)
    raw = _b64decode(data, field)
    if not raw:
        raise ApiError(422, f"{field}: empty image data", field=field)
    if len(raw) > max_bytes:
        raise ApiError(413, f"{field}: image of {len(raw)} bytes exceeds the limit of {max_bytes}", field=field)

    _ensure_pillow_limit(max_pixels)
    too_many = f"{field}: image has more than {max_pixels} pixels"
    try:
        img = Image.open(io.BytesIO(raw), formats=_open_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, too_many, field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        supported = ", ".join(f for f in ALLOWED_FORMATS if f != "MPO")
        raise ApiError(422, f"{field}: not a supported image ({supported})", field=field) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ApiError(422, f"{field}: image has no pixels", field=field)
    if width * height > max_pixels:
        raise ApiError(413, f"{too_many} ({width}x{height})", field=field)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(422, f"{field}: corrupt or truncated image data", field=field) from None
    return img


def _exif_with_comment(text: str) -> Image.Exif:
    exif = Image.Exif()
    # EXIF UserComment as A1111 writes it with piexif: an 8-byte charset prefix, then UTF-16 big-endian.
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\x00" + text.encode("utf-16-be")
    return exif


def encode_image(img: Image.Image, fmt: str = "png", quality: int = 80, infotext: str | None = None) -> bytes:
    """PNG, JPEG or WEBP bytes. The infotext goes to a PNG `parameters` chunk, or EXIF UserComment for JPEG/WEBP."""
    with stage("encode"):
        return _encode(img, fmt, quality, infotext)


def _encode(img: Image.Image, fmt: str, quality: int, infotext: str | None) -> bytes:
    pil_format = ENCODE_FORMATS.get(fmt.lower())
    if pil_format is None:
        raise ValueError(f"unsupported output format '{fmt}' (use png, jpeg or webp)")
    if pil_format == "PNG":
        return encode_png(img, infotext)
    if pil_format == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    kwargs: dict = {"quality": quality}
    if infotext:
        kwargs["exif"] = _exif_with_comment(infotext)
    img.save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def encode_png(img: Image.Image, infotext: str | None = None) -> bytes:
    """PNG bytes with the infotext in a `parameters` text chunk (what A1111's png-info reads)."""
    pnginfo = None
    if infotext:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text(INFOTEXT_KEY, infotext)  # Pillow writes iTXt instead when the text is not Latin-1
    buf = io.BytesIO()
    # zlib level 1: several times faster than Pillow's default 6 for a few percent more bytes; encoding sits on
    # every request's critical path, next to a GPU that may finish an image in well under 100 ms.
    img.save(buf, format="PNG", pnginfo=pnginfo, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Raw base64, no `data:` prefix (A1111 and webuiapi expect it bare)."""
    with stage("b64"):
        return base64.b64encode(data).decode("ascii")


def _decode_user_comment(value: bytes | str) -> str | None:
    if isinstance(value, str):
        return value or None
    for prefix, encoding in _USER_COMMENT_PREFIXES.items():
        if value.startswith(prefix):
            return value[len(prefix) :].decode(encoding, errors="replace").rstrip("\x00") or None
    return value.decode("utf-8", errors="replace").rstrip("\x00") or None


def read_png_info(img: Image.Image) -> str | None:
    """The infotext of an image: PNG `parameters` text, else EXIF UserComment (JPEG/WEBP); None if absent."""
    text = img.info.get(INFOTEXT_KEY)
    if isinstance(text, str) and text:
        return text
    try:
        comment = img.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception:  # malformed EXIF must not fail png-info
        return None
    return _decode_user_comment(comment) if comment else None
