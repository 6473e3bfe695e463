"""Output media formats and their MIME types."""

from __future__ import annotations

from typing import Literal

ImageFormat = Literal["png", "jpeg", "webp"]


CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
