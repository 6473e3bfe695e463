"""The uploads of ``POST /v1/videos``: the multipart form, and ``input_reference`` given
as an object (a base64 data URL only)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import Request

from mediagate.protocol.errors import InvalidRequest


def decode_image_reference(image_url: str | None, file_id: str | None) -> bytes:
    """The bytes of an ``input_reference`` given as an object: only ``data:`` URLs.

    Fetching arbitrary URLs from inside the cluster would let callers probe it, so
    remote images must be uploaded (multipart) or inlined as a base64 data URL.
    """
    if file_id is not None:
        raise InvalidRequest(
            "`input_reference.file_id` is not supported; upload the image as a file",
            param="input_reference",
            code="unsupported_parameter",
        )
    if not image_url:
        raise InvalidRequest(
            "`input_reference` needs a file or an `image_url`", param="input_reference"
        )
    header, comma, payload = image_url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64") and comma):
        raise InvalidRequest(
            "`input_reference.image_url` must be a base64 data URL (data:image/png;base64,...); "
            "upload remote images as a file instead",
            param="input_reference",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "`input_reference.image_url` is not valid base64", param="input_reference"
        ) from None


async def parse_video_form(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """A multipart ``POST /v1/videos``: fields, and the uploaded ``input_reference`` bytes."""
    form = await request.form()
    fields: dict[str, Any] = {}
    reference: dict[str, str] = {}
    upload: bytes | None = None
    for name, value in form.multi_items():
        if name == "input_reference" and not isinstance(value, str):
            upload = await value.read()
        elif name.startswith("input_reference[") and name.endswith("]"):
            reference[name[len("input_reference[") : -1]] = str(value)
        elif isinstance(value, str):
            fields[name] = value
        else:
            raise InvalidRequest(f"unexpected file in field `{name}`", param=name)
    if reference:
        fields["input_reference"] = reference
    return fields, upload
