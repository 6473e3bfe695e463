"""The files of ``POST /v1/images/edits``: read from the multipart form as the official
``openai`` client sends them, checked by their headers before anything is decided, and
decoded only once the request's quota is reserved.

The client sends one file as ``image`` and a list as repeated ``image[]`` parts; the
mask as ``mask``; every other field as a string.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.work import RawImage
from models.uploads import (
    UploadHeader,
    UploadRejected,
    decode_upload,
    edit_input,
    inpaint_mask,
    read_upload_header,
)

MAX_EDIT_IMAGES = 16  # OpenAI's limit for `image[]`
# An input is scaled to the output's size: one with far more pixels than the model can
# make is refused by its header, never decoded (a few hundred bytes of lossless WebP can
# declare 4096x4096, 300 ms and 100 MB of decoding).
INPUT_PIXELS_PER_OUTPUT_PIXEL = 16
IMAGE_FIELDS = ("image", "image[]")


@dataclass(frozen=True)
class EditUploads:
    """The images to edit (in order) and the optional mask, as uploaded."""

    images: list[bytes]
    mask: bytes | None

    def fingerprint(self) -> dict[str, Any]:
        """What an Idempotency-Key's record compares besides the fields: the bytes."""
        return {
            "images": [hashlib.sha256(image).hexdigest() for image in self.images],
            "mask": hashlib.sha256(self.mask).hexdigest() if self.mask is not None else None,
        }


async def parse_edit_form(request: Request) -> tuple[dict[str, str], EditUploads]:
    """The form's text fields and its files; a file where text belongs (or text where
    a file belongs), a repeated field or more than 16 images is a 400 naming it."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise InvalidRequest(
            "send an edit as multipart/form-data, with the image as a file part `image`",
            param="image",
        )
    form = await request.form(max_files=4 * MAX_EDIT_IMAGES, max_fields=256)
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    for name, value in form.multi_items():
        is_file = not isinstance(value, str)
        if name in IMAGE_FIELDS or name == "mask":
            if not is_file:
                raise InvalidRequest(f"`{name}` must be a file upload", param=name.rstrip("[]"))
            data = await value.read()  # type: ignore[union-attr]
            if name == "mask":
                if mask is not None:
                    raise InvalidRequest("send one `mask`", param="mask")
                mask = data
            else:
                images.append(data)
        elif is_file:
            raise InvalidRequest(f"unexpected file in field `{name}`", param=name)
        elif name in fields:
            raise InvalidRequest(f"`{name}` was sent twice", param=name)
        else:
            fields[name] = str(value)
    if not images:
        raise InvalidRequest("upload the image to edit as the file `image`", param="image")
    if len(images) > MAX_EDIT_IMAGES:
        raise InvalidRequest(
            f"at most {MAX_EDIT_IMAGES} images may be edited together, got {len(images)}",
            param="image",
        )
    return fields, EditUploads(images, mask)


def edit_input_pixels(spec: ModelSpec) -> int:
    """The most pixels an image to edit may have for ``spec``."""
    return INPUT_PIXELS_PER_OUTPUT_PIXEL * spec.caps.max_width * spec.caps.max_height


def check_edit_uploads(
    spec: ModelSpec, uploads: EditUploads, *, max_bytes: int, max_pixels: int
) -> UploadHeader:
    """Refuse what cannot be edited by the headers alone (nothing is decoded): the
    number of images the model takes, each image's type, size and pixel count, and the
    mask's alpha channel and dimensions. Returns the (first) image's header."""
    if len(uploads.images) > 1:
        raise InvalidRequest(
            f"model {spec.id} edits one image at a time; got {len(uploads.images)}",
            param="image",
        )
    max_pixels = min(max_pixels, edit_input_pixels(spec))
    try:
        image = read_upload_header(uploads.images[0], max_bytes=max_bytes, max_pixels=max_pixels)
    except UploadRejected as error:
        raise InvalidRequest(str(error), param="image") from None
    if uploads.mask is not None:
        try:
            mask = read_upload_header(
                uploads.mask, max_bytes=max_bytes, max_pixels=max_pixels, what="mask"
            )
        except UploadRejected as error:
            raise InvalidRequest(str(error), param="mask") from None
        if not mask.has_alpha:
            raise InvalidRequest(
                "the mask must have an alpha channel: fully transparent where the image "
                "should be edited",
                param="mask",
            )
        if (mask.width, mask.height) != (image.width, image.height):
            raise InvalidRequest(
                f"the mask is {mask.width}x{mask.height}; it must be the image's size, "
                f"{image.width}x{image.height}",
                param="mask",
            )
    return image


def decode_edit_inputs(
    spec: ModelSpec,
    uploads: EditUploads,
    width: int,
    height: int,
    *,
    max_bytes: int,
    max_pixels: int,
) -> tuple[RawImage, RawImage | None]:
    """The image (RGB) and mask (white = repaint) at the output size, as the worker's
    pipeline takes them; a damaged file is a 400 naming it. Runs in a thread."""
    decoded: dict[str, Any] = {}
    max_pixels = min(max_pixels, edit_input_pixels(spec))
    for name, data in (("image", uploads.images[0]), ("mask", uploads.mask)):
        if data is None:
            continue
        try:
            decoded[name] = decode_upload(
                data, max_bytes=max_bytes, max_pixels=max_pixels, what=name
            )
        except UploadRejected as error:
            raise InvalidRequest(str(error), param=name) from None
    converted: dict[str, RawImage | None] = {"image": None, "mask": None}
    for name, convert in (("image", edit_input), ("mask", inpaint_mask)):
        if name not in decoded:
            continue
        try:
            converted[name] = convert(decoded[name], width, height)
        except (ValueError, OSError):  # a pixel mode PIL cannot convert
            raise InvalidRequest(
                f"the uploaded {name}'s pixel format cannot be used; send 8-bit RGB(A)",
                param=name,
            ) from None
    image = converted["image"]
    assert image is not None
    return image, converted["mask"]
