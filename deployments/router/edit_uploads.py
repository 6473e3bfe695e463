"""The files of ``POST /v1/images/edits``: read from the multipart form as the official
``openai`` client sends them, checked by their headers before anything is decided, and
decoded only once the request's quota is reserved.

The client sends one file as ``image`` and a list as repeated ``image[]`` parts; the
mask as ``mask``; every other field as a string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.images import ImageEditRequest
from mediagate.protocol.work import ImageTask, RawImage
from models.uploads import (
    UploadHeader,
    UploadLimits,
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


def edit_upload_limits(spec: ModelSpec, max_bytes: int, max_pixels: int) -> UploadLimits:
    """How large an image to edit (or its mask) may be for ``spec``: the router's upload
    limits, and at most ``INPUT_PIXELS_PER_OUTPUT_PIXEL`` times the model's largest
    output in pixels."""
    largest_output = spec.caps.max_width * spec.caps.max_height
    return UploadLimits(max_bytes, min(max_pixels, INPUT_PIXELS_PER_OUTPUT_PIXEL * largest_output))


def _header(data: bytes, what: str, limits: UploadLimits) -> UploadHeader:
    try:
        return read_upload_header(data, what=what, **limits.as_kwargs())
    except UploadRejected as error:
        raise InvalidRequest(str(error), param=what) from None


def check_edit_uploads(spec: ModelSpec, uploads: EditUploads, limits: UploadLimits) -> UploadHeader:
    """Refuse what cannot be edited by the headers alone (nothing is decoded): the
    number of images the model takes, each image's type, size and pixel count, and the
    mask's alpha channel and dimensions. Returns the (first) image's header."""
    if len(uploads.images) > 1:
        raise InvalidRequest(
            f"model {spec.id} edits one image at a time; got {len(uploads.images)}",
            param="image",
        )
    image = _header(uploads.images[0], "image", limits)
    if uploads.mask is not None:
        mask = _header(uploads.mask, "mask", limits)
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


def _decoded(
    data: bytes,
    what: str,
    convert: Callable[[Any, int, int], RawImage],
    width: int,
    height: int,
    limits: UploadLimits,
) -> RawImage:
    """One upload decoded and converted to what the pipeline takes; a damaged file, or
    a pixel mode PIL cannot convert, is a 400 naming it."""
    try:
        image = decode_upload(data, what=what, **limits.as_kwargs())
    except UploadRejected as error:
        raise InvalidRequest(str(error), param=what) from None
    try:
        return convert(image, width, height)
    except (ValueError, OSError):
        raise InvalidRequest(
            f"the uploaded {what}'s pixel format cannot be used; send 8-bit RGB(A)", param=what
        ) from None


def decode_edit_inputs(
    uploads: EditUploads, width: int, height: int, limits: UploadLimits
) -> tuple[RawImage, RawImage | None]:
    """The image (RGB) and mask (white = repaint) at the output size, as the worker's
    pipeline takes them. Runs in a thread."""
    image = _decoded(uploads.images[0], "image", edit_input, width, height, limits)
    if uploads.mask is None:
        return image, None
    return image, _decoded(uploads.mask, "mask", inpaint_mask, width, height, limits)


def edit_strength(
    spec: ModelSpec, body: ImageEditRequest, task: ImageTask, steps: int
) -> float | None:
    """The share of ``steps`` an edit redraws (diffusers' ``strength``); None for a model
    that edits by instruction, where it does not apply."""
    if spec.edit_by == "instruction" and task == "image-to-image":
        if body.strength is not None:
            raise InvalidRequest(
                f"model {spec.id} edits by instruction: `strength` does not apply (say in the "
                "prompt what to change)",
                param="strength",
            )
        return None
    strength = body.resolved_strength(masked=task == "inpaint")
    if int(steps * strength) < 1:  # what diffusers runs of the schedule
        raise InvalidRequest(
            f"`strength` {strength:g} of {steps} steps leaves no step to run "
            f"(int(steps x strength) must be at least 1); raise either",
            param="strength",
        )
    return strength
