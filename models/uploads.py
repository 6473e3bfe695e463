"""Uploaded images, checked before they are decoded.

An upload is refused by its bytes alone when it is too large or not PNG, JPEG or
WebP, and by its header alone when it declares too many pixels, so a
decompression bomb costs a few hundred bytes of parsing, never gigabytes of RAM.
``read_upload_header`` is that check (the pixel count, size and alpha come from the
header); decoding (``decode_upload``) comes only once the request was admitted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from mediagate.protocol.work import RawImage
from models.encoding import to_raw_image

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


@dataclass(frozen=True)
class UploadLimits:
    """How large an upload may be: bytes as sent, pixels as its header declares."""

    max_bytes: int
    max_pixels: int

    def as_kwargs(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "max_pixels": self.max_pixels}


@dataclass(frozen=True)
class UploadHeader:
    """What an upload's header says, read without decoding a pixel."""

    format: str  # PNG, JPEG or WEBP
    width: int
    height: int
    has_alpha: bool


def _open(data: bytes, *, what: str, max_bytes: int, max_pixels: int) -> Any:
    from PIL import Image

    if not data:
        raise UploadRejected(f"the uploaded {what} is empty")
    if len(data) > max_bytes:
        raise UploadRejected(f"the uploaded {what} is {len(data)} bytes; the limit is {max_bytes}")
    sniffed = sniff_format(data)
    if sniffed is None:
        raise UploadRejected(f"the uploaded {what} is not a PNG, JPEG or WebP image")
    try:
        image = Image.open(io.BytesIO(data), formats=[sniffed])  # reads the header only
    except Image.DecompressionBombError:
        raise UploadRejected(
            f"the uploaded {what} declares too many pixels; the limit is {max_pixels} pixels"
        ) from None
    except Exception:  # PIL's message names internal objects (<_io.BytesIO at 0x...>)
        raise UploadRejected(
            f"the uploaded {what} cannot be read: its header is not valid {sniffed}"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadRejected(
            f"the uploaded {what} is {width}x{height} pixels; the limit is {max_pixels} pixels"
        )
    return image


def read_upload_header(
    data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image"
) -> UploadHeader:
    """Check an upload by its size, magic bytes and header; nothing is decoded."""
    image = _open(data, what=what, max_bytes=max_bytes, max_pixels=max_pixels)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    return UploadHeader(image.format, image.width, image.height, has_alpha)


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image") -> Any:
    """The upload decoded (a PIL image), after the header checks; a truncated or corrupt
    pixel stream is ``UploadRejected`` too."""
    image = _open(data, what=what, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        image.load()
    except Exception:
        raise UploadRejected(
            f"the uploaded {what} is damaged: its pixel data is truncated or corrupt"
        ) from None
    return image


def load_reference_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Any:
    """Validate and decode an uploaded image into an RGB PIL image."""
    return decode_upload(data, max_bytes=max_bytes, max_pixels=max_pixels).convert("RGB")


def edit_input(image: Any, width: int, height: int) -> RawImage:
    """The image to edit as the pipeline takes it: RGB, at the output size."""
    from PIL import Image

    return to_raw_image(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def inpaint_mask(mask: Any, width: int, height: int) -> RawImage:
    """OpenAI's mask (edit where alpha is 0) as diffusers' (repaint where white), at the
    output size; sharp edges kept (nearest neighbour)."""
    from PIL import Image

    alpha = mask.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda value: 255 if value == 0 else 0)
    return to_raw_image(repaint.resize((width, height), Image.Resampling.NEAREST))
