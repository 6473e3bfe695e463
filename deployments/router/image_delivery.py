"""How an answer's images go out: checked, encoded as asked and signed (a C2PA manifest,
when the router has a signer) by the router's image processes, then inlined as base64 or
stored behind signed URLs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from deployments.router.image_processing import Encoding, ImageProcessing
from mediagate.moderation.prompts import Level
from mediagate.protocol.images import ImageData, ImageRequest
from mediagate.protocol.media import ImageFormat
from mediagate.protocol.work import ImageResult
from mediagate.provenance.signing import Provenance
from mediagate.stores.artifacts import ArtifactStore


@dataclass(frozen=True)
class Delivery:
    """How the answer's images are handed out: encoding, and inline or by URL."""

    response_format: str  # "b64_json" or "url"
    output_format: ImageFormat
    output_compression: int | None
    base_url: str  # for URLs of local files

    @classmethod
    def of(cls, body: ImageRequest, base_url: str) -> Delivery:
        return cls(body.response_format, body.output_format, body.output_compression, base_url)

    def encoding(self, *, inline: bool) -> Encoding:
        """How its files are written (``inline``: as base64 text, for an answer's body)."""
        return Encoding(self.output_format, self.output_compression, base64=inline)


@dataclass(frozen=True)
class Delivered:
    data: list[ImageData]
    moderate_ms: float
    encode_ms: float
    sign_ms: float
    stored: list[str]  # artifact ids (URL answers)
    checked: bool = False  # an image checker ran (else no `moderate` stage)
    signed: bool = False  # a signer ran (else no `sign` stage)
    hand_over_ms: float = 0.0  # to the image processes and back, beyond their work

    def timings_ms(self) -> dict[str, float]:
        """Its stages for ``Server-Timing``: only what ran."""
        timings = {"encode": self.encode_ms, "hand_over": self.hand_over_ms}
        if self.checked:
            timings["moderate"] = self.moderate_ms
        if self.signed:
            timings["sign"] = self.sign_ms
        return timings


async def deliver(
    result: ImageResult,
    delivery: Delivery,
    provenance: Provenance,
    *,
    processing: ImageProcessing,
    level: Level,
    artifacts: ArtifactStore,
    url_ttl_s: int,
) -> Delivered:
    """The images checked (one flagged refuses them all: ``ModerationBlocked``, nothing
    charged), encoded, signed, and inlined or stored."""
    inline = delivery.response_format == "b64_json"
    prepared, hand_over_ms = await processing.prepare(
        result.images, level, delivery.encoding(inline=inline), provenance
    )
    ran = (prepared.moderate_ms, prepared.encode_ms, prepared.sign_ms)
    checked, signed = processing.checks_images, processing.signs
    if inline:
        data = [ImageData(b64_json=text.decode()) for text in prepared.files]
        return Delivered(data, *ran, [], checked, signed, hand_over_ms)

    def store() -> list[str]:
        return [artifacts.put(image, delivery.output_format, "img") for image in prepared.files]

    stored = await asyncio.to_thread(store)
    urls = [ImageData(url=artifacts.url(id_, url_ttl_s, delivery.base_url)) for id_ in stored]
    return Delivered(urls, *ran, stored, checked, signed, hand_over_ms)
