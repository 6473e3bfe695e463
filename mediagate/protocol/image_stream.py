"""OpenAI's streamed Images answers (``stream: true``): server-sent events.

Generations stream ``image_generation.partial_image`` events (previews, when
``partial_images`` asks for them) and one ``image_generation.completed`` event per image;
edits the same as ``image_edit.*``. The official client picks the event's model by the
``type`` inside ``data`` (the ``event:`` line is for other SSE readers), and raises
``APIError`` on a ``data`` object with an ``error`` key: failures after the stream began
are sent that way. Refusals before it began are ordinary HTTP errors.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

from mediagate.protocol.errors import MediagateError

StreamKind = Literal["image_generation", "image_edit"]
STREAM_MEDIA_TYPE = "text/event-stream"


class ImagesUsage(BaseModel):
    """OpenAI bills images in tokens; mediagate counts images (the quota), so every count
    here is 0. Present because the event's schema requires it."""

    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(
        default_factory=lambda: {"text_tokens": 0, "image_tokens": 0}
    )


class ImageStreamEvent(BaseModel):
    """One streamed image: a preview (``partial_image``) or a finished one (``completed``)."""

    type: str = Field(description="`image_generation.partial_image`, `image_edit.completed`, ...")
    b64_json: str = Field(description="Base64 of the encoded image.")
    created_at: int = Field(description="Unix time of the event.")
    size: str = Field(description="WIDTHxHEIGHT.")
    quality: Literal["low", "medium", "high"] = Field(description="The quality being made.")
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"] = Field(description="Encoding of the image.")
    image_index: int = Field(
        0, description="mediagate: which of the request's `n` images this is (0-based)."
    )
    partial_image_index: int | None = Field(None, description="Previews only: 0-based.")
    usage: ImagesUsage | None = Field(None, description="Completed images only; counts are 0.")


def partial_event_type(kind: StreamKind) -> str:
    return f"{kind}.partial_image"


def completed_event_type(kind: StreamKind) -> str:
    return f"{kind}.completed"


def sse(event: ImageStreamEvent) -> bytes:
    """One event as server-sent-event bytes."""
    data = event.model_dump_json(exclude_none=True)
    return f"event: {event.type}\ndata: {data}\n\n".encode()


def sse_error(error: MediagateError) -> bytes:
    """A failure after the stream began, as the client's ``APIError`` reads it."""
    return f"event: error\ndata: {json.dumps(error.envelope())}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A line SSE readers ignore: sent first so the caller sees the request was admitted."""
    return f": {text}\n\n".encode()
