"""Uploaded reference images, checked before they are decoded.

An upload is refused by its bytes alone when it is too large or not PNG, JPEG or
WebP, and by its header alone when it declares too many pixels, so a
decompression bomb costs a few hundred bytes of parsing, never gigabytes of RAM.
"""

from __future__ import annotations

import io
from typing import Any

ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


class UploadRejected(ValueError):
    """The upload is not an acceptable image; the message says why."""


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes, or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def load_reference_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Any:
    """Validate and decode an uploaded image into an RGB PIL image."""
    from PIL import Image

    if not data:
        raise UploadRejected("the uploaded image is empty")
    if len(data) > max_bytes:
        raise UploadRejected(f"the uploaded image is {len(data)} bytes; the limit is {max_bytes}")
    sniffed = sniff_format(data)
    if sniffed is None:
        raise UploadRejected("the uploaded file is not a PNG, JPEG or WebP image")
    try:
        image = Image.open(io.BytesIO(data), formats=[sniffed])  # reads the header only
    except Image.DecompressionBombError:
        raise UploadRejected(
            f"the uploaded image declares too many pixels; the limit is {max_pixels} pixels"
        ) from None
    except Exception:  # PIL's message names internal objects (<_io.BytesIO at 0x...>)
        raise UploadRejected(
            f"the uploaded {sniffed} image cannot be read: its header is not valid {sniffed}"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadRejected(
            f"the uploaded image is {width}x{height} pixels; the limit is {max_pixels} pixels"
        )
    try:
        image.load()
    except Exception:
        raise UploadRejected(
            f"the uploaded {sniffed} image is damaged: its pixel data is truncated or corrupt"
        ) from None
    return image.convert("RGB")
