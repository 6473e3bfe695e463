"""Signing outputs with a C2PA manifest (``c2pa-python``): who made the file (mediagate,
its version), with which model, by which action (``c2pa.created``, or ``c2pa.edited``
with the input image as the parent ingredient), when; the prompt only if the operator
opts in. The manifest is embedded in the file (PNG, JPEG, WebP, MP4), so the file
carries its provenance wherever it goes."""

from __future__ import annotations

import datetime
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mediagate.provenance.settings import ProvenanceSettings

GENERATOR = "mediagate"
GENERATOR_VERSION = "0.1.0"
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
GENERATION_LABEL = "org.mediagate.generation"
PARENT = "parent"  # the edited input's ingredient label
MIME_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
}


@dataclass(frozen=True)
class Provenance:
    """What one output's manifest states (plain data)."""

    model: str
    action: Literal["c2pa.created", "c2pa.edited"] = "c2pa.created"
    prompt: str | None = None
    parent: bytes | None = None  # the input an edit started from (its file, as uploaded)
    parent_format: str | None = None  # png, jpeg or webp


def manifest(provenance: Provenance, *, include_prompt: bool, when: float) -> dict[str, Any]:
    """The manifest definition ``c2pa.Builder`` takes."""
    stamp = datetime.datetime.fromtimestamp(when, tz=datetime.UTC).isoformat()
    action: dict[str, Any] = {
        "action": provenance.action,
        "when": stamp,
        "digitalSourceType": TRAINED if provenance.action == "c2pa.created" else COMPOSITE,
        "softwareAgent": {"name": GENERATOR, "version": GENERATOR_VERSION},
    }
    # C2PA 2: a manifest's first action is created or opened; an edit opens its parent
    # (the ingredient) and then edits it.
    actions = [action]
    if provenance.action == "c2pa.edited":
        opened = {"action": "c2pa.opened", "when": stamp, "parameters": {"ingredientIds": [PARENT]}}
        actions = [opened, action]
    generation: dict[str, Any] = {"model": provenance.model}
    if include_prompt and provenance.prompt is not None:
        generation["prompt"] = provenance.prompt
    return {
        "claim_generator_info": [{"name": GENERATOR, "version": GENERATOR_VERSION}],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": actions}},
            {"label": GENERATION_LABEL, "data": generation},
        ],
    }


def image_format_of(data: bytes) -> str | None:
    """png, jpeg or webp from a file's first bytes (None: none of them)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class ContentSigner:
    """Signs files with one certificate and key (thread-safe: every call builds its own
    c2pa signer and builder)."""

    def __init__(
        self, settings: ProvenanceSettings, chain_pem: bytes, key_pem: bytes, *, clock: Any = None
    ) -> None:
        import time

        import c2pa

        self.settings = settings
        self._chain = chain_pem
        self._key = key_pem
        self._algorithm = getattr(c2pa.C2paSigningAlg, settings.algorithm.upper())
        self._clock = clock or time.time
        self._sign(b"", "png", Provenance(model="check"), probe=True)  # a bad key fails here

    @classmethod
    def from_files(cls, settings: ProvenanceSettings) -> ContentSigner:
        if not settings.certificate_chain or not settings.private_key:
            raise ValueError("signing needs certificate_chain and private_key files")
        return cls(
            settings,
            Path(settings.certificate_chain).read_bytes(),
            Path(settings.private_key).read_bytes(),
        )

    def sign(self, data: bytes, file_format: str, provenance: Provenance) -> bytes:
        """``data`` (a ``file_format`` file) with its manifest embedded."""
        return self._sign(data, file_format, provenance)

    def _sign(
        self, data: bytes, file_format: str, provenance: Provenance, *, probe: bool = False
    ) -> bytes:
        import c2pa

        if probe:  # a 1x1 PNG: the certificate and key are checked once, at start
            data = PROBE_PNG
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                alg=self._algorithm,
                sign_cert=self._chain,
                private_key=self._key,
                ta_url=self.settings.timestamp_url,
            )
        )
        # No thumbnail: the file is its own preview (a PNG's would add ~30 kB).
        context = c2pa.Context(
            settings=c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}),
            signer=signer,
        )
        definition = manifest(
            provenance, include_prompt=self.settings.include_prompt, when=self._clock()
        )
        signed = io.BytesIO()
        with c2pa.Builder(json.dumps(definition), context=context) as builder:
            parent_format = provenance.parent_format or (
                image_format_of(provenance.parent) if provenance.parent else None
            )
            if provenance.parent is not None and parent_format in MIME_TYPES:
                builder.add_ingredient(
                    {
                        "title": f"input.{parent_format}",
                        "relationship": "parentOf",
                        "label": PARENT,
                    },
                    MIME_TYPES[parent_format],
                    io.BytesIO(provenance.parent),
                )
            builder.sign(MIME_TYPES[file_format], io.BytesIO(data), signed)
        return signed.getvalue()


def read_manifest(data: bytes, file_format: str) -> dict[str, Any]:
    """The manifest store of a signed file, as ``c2pa.Reader`` reports it."""
    import c2pa

    with c2pa.Reader(MIME_TYPES[file_format], io.BytesIO(data)) as reader:
        store: dict[str, Any] = json.loads(reader.json())
    return store


PROBE_PNG = bytes.fromhex(  # 1x1 black, as PIL writes it
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c49444154789c63606060000000040001f61738550000000049454e44ae426082"
)
