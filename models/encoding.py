"""Encoding generated frames into the bytes a client downloads."""

from __future__ import annotations

import io
from typing import Any, Literal

ImageFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Any, output_format: ImageFormat, compression: int | None = None) -> bytes:
    """PIL image -> PNG, JPEG or WebP bytes; ``compression`` is the JPEG/WebP quality (0-100)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = 100 if compression is None else max(1, compression)
        pil_format = "JPEG" if output_format == "jpeg" else "WEBP"
        image.convert("RGB").save(buffer, format=pil_format, quality=quality)
    return buffer.getvalue()
