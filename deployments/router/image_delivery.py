"""How an answer's images go out: encoded as asked, signed (a C2PA manifest, when the
router has a signer), then inlined as base64 or stored behind signed URLs. Runs in a
thread, off the event loop."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from mediagate.moderation.moderator import Moderator
from mediagate.moderation.prompts import Level
from mediagate.protocol.images import ImageData, ImageRequest
from mediagate.protocol.media import ImageFormat
from mediagate.protocol.work import ImageResult, RawImage
from mediagate.provenance.signing import ContentSigner, Provenance
from mediagate.stores.artifacts import ArtifactStore
from models.encoding import encode_raw_image, from_raw_image


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


@dataclass(frozen=True)
class Delivered:
    data: list[ImageData]
    moderate_ms: float
    encode_ms: float
    sign_ms: float
    stored: list[str]  # artifact ids (URL answers)
    checked: bool = False  # an image checker ran (else no `moderate` stage)
    signed: bool = False  # a signer ran (else no `sign` stage)

    def timings_ms(self) -> dict[str, float]:
        """Its stages for ``Server-Timing``: only what ran."""
        timings = {"encode": self.encode_ms}
        if self.checked:
            timings["moderate"] = self.moderate_ms
        if self.signed:
            timings["sign"] = self.sign_ms
        return timings


def encoded_and_signed(
    raw: RawImage,
    delivery: Delivery,
    signer: ContentSigner | None,
    provenance: Provenance,
) -> tuple[bytes, float, float]:
    """One image's file, and the ms its encoding and its signing took."""
    started = time.perf_counter()
    encoded = encode_raw_image(raw, delivery.output_format, delivery.output_compression)
    encoded_at = time.perf_counter()
    if signer is not None:
        encoded = signer.sign(encoded, delivery.output_format, provenance)
    signed_at = time.perf_counter()
    return encoded, (encoded_at - started) * 1000, (signed_at - encoded_at) * 1000


def deliver(
    result: ImageResult,
    delivery: Delivery,
    provenance: Provenance,
    *,
    signer: ContentSigner | None,
    moderation: tuple[Moderator, Level],
    artifacts: ArtifactStore,
    url_ttl_s: int,
) -> Delivered:
    """The images checked (one flagged refuses them all: ``ModerationBlocked``, nothing
    charged), encoded, signed, and inlined or stored."""
    started = time.perf_counter()
    moderator, level = moderation
    checked = moderator.checks_images
    if checked:
        moderator.check_images([from_raw_image(raw) for raw in result.images], level, param=None)
    moderate_ms = (time.perf_counter() - started) * 1000
    files, encode_ms, sign_ms = [], 0.0, 0.0
    for raw in result.images:
        data, encoding, signing = encoded_and_signed(raw, delivery, signer, provenance)
        files.append(data)
        encode_ms += encoding
        sign_ms += signing
    if delivery.response_format == "b64_json":
        inline = [ImageData(b64_json=base64.b64encode(image).decode()) for image in files]
        return Delivered(inline, moderate_ms, encode_ms, sign_ms, [], checked, signer is not None)
    stored = [artifacts.put(image, delivery.output_format, "img") for image in files]
    urls = [ImageData(url=artifacts.url(id_, url_ttl_s, delivery.base_url)) for id_ in stored]
    return Delivered(urls, moderate_ms, encode_ms, sign_ms, stored, checked, signer is not None)
