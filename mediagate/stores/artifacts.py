"""Generated files (and uploaded references): local files by default, S3 in production.

Both backends share one interface. An artifact id says what it is and how it is
encoded (``img_<hex>.png``, ``vid_<hex>.mp4``, ``ref_<hex>.png``, and
``ans_<hex>.json`` for answers kept for Idempotency-Key repeats, ``ckp_<hex>.pt`` for
a step-level video job's checkpoint), so the sweep of
expired image URLs never touches a video whose job has a longer life. Kept answers are
never handed out by URL.

Local files are handed out through URLs signed with an HMAC secret kept in
``MEDIAGATE_HOME/secrets`` (every router replica on the machine reads the same
secret, so any of them can verify any URL). S3 hands out presigned URLs. Calls
are blocking (boto3 is): async callers run them in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import Forbidden, NotFound, StoreUnavailable
from mediagate.protocol.media import CONTENT_TYPES

logger = logging.getLogger(__name__)

ArtifactKind = Literal["img", "vid", "ref", "ans", "ckp"]
ARTIFACT_ID = re.compile(r"^(img|vid|ref|ans|ckp)_[0-9a-f]{32}\.(png|jpeg|webp|mp4|json|pt)$")
# read by the service only: no URL ever downloads them (kept answers, video checkpoints)
PRIVATE_KINDS = ("ans_", "ckp_")


def new_artifact_id(kind: ArtifactKind, extension: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}.{extension}"


def content_type(artifact_id: str) -> str:
    return CONTENT_TYPES.get(artifact_id.rsplit(".", 1)[-1], "application/octet-stream")


def check_artifact_id(artifact_id: str) -> None:
    if not ARTIFACT_ID.match(artifact_id):
        raise NotFound(f"no file {artifact_id!r}", param="file_id")


class ArtifactStore(Protocol):
    """Put, read, hand out and delete artifacts."""

    def put(self, data: bytes, extension: str, kind: ArtifactKind) -> str:
        """Store ``data``; returns its new artifact id."""

    def read(self, artifact_id: str) -> bytes:
        """The artifact's bytes; ``NotFound`` when it is gone."""

    def url(self, artifact_id: str, ttl_s: int, base_url: str) -> str:
        """A URL that downloads the artifact without an API key until ``ttl_s`` from now."""

    def delete(self, artifact_id: str) -> None:
        """Remove the artifact; no error if it is already gone."""

    def delete_older_than(self, age_s: float, kind: ArtifactKind) -> int:
        """Remove artifacts of ``kind`` older than ``age_s``; returns how many."""


def load_or_create_secret(path: Path) -> bytes:
    """The signing secret at ``path``, created (0600) by whichever process comes first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
    for _ in range(100):  # the creator may not have finished writing
        text = path.read_text().strip()
        if text:
            return bytes.fromhex(text)
        time.sleep(0.01)
    raise RuntimeError(f"signing secret {path} is empty")


class LocalArtifactStore:
    """Artifacts as files under one directory, with signed URLs that expire."""

    def __init__(self, root: str | Path, secret: bytes, *, clock: Clock = system_clock) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._secret = secret
        self._clock = clock

    def put(self, data: bytes, extension: str, kind: ArtifactKind = "img") -> str:
        """The write is atomic (temp file + rename): readers never see half a file."""
        artifact_id = new_artifact_id(kind, extension)
        staging = self.root / f".{artifact_id}.tmp"
        try:
            staging.write_bytes(data)
            staging.rename(self.root / artifact_id)
        except OSError as error:  # the disk full, or gone read-only: ours, not the client's
            staging.unlink(missing_ok=True)
            logger.warning("cannot write %s: %r", artifact_id, error)
            raise StoreUnavailable(
                "generated files cannot be stored right now; please retry shortly",
                retry_after_s=5.0,
            ) from error
        return artifact_id

    def read(self, artifact_id: str) -> bytes:
        check_artifact_id(artifact_id)
        try:
            return (self.root / artifact_id).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"file {artifact_id} no longer exists", param="file_id") from None

    def signature(self, artifact_id: str, expires_at: int) -> str:
        message = f"{artifact_id}:{expires_at}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def signed_path(self, artifact_id: str, ttl_s: int) -> str:
        """A path+query (no host) that downloads ``artifact_id`` until ``ttl_s`` from now."""
        expires_at = int(self._clock()) + ttl_s
        signature = self.signature(artifact_id, expires_at)
        return f"/v1/files/{artifact_id}/content?expires={expires_at}&signature={signature}"

    def url(self, artifact_id: str, ttl_s: int, base_url: str) -> str:
        return base_url.rstrip("/") + self.signed_path(artifact_id, ttl_s)

    def read_signed(self, artifact_id: str, expires_at: int, signature: str) -> bytes:
        """The artifact's bytes if the signature holds and has not expired."""
        check_artifact_id(artifact_id)
        if artifact_id.startswith(PRIVATE_KINDS):
            raise NotFound(f"no file {artifact_id!r}", param="file_id")
        expected = self.signature(artifact_id, expires_at)
        # compared as bytes: compare_digest refuses non-ASCII str (a TypeError, a 500)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise Forbidden("the URL's signature is not valid", code="invalid_signature")
        if self._clock() > expires_at:
            raise Forbidden("the URL has expired; generate the image again", code="url_expired")
        return self.read(artifact_id)

    def delete(self, artifact_id: str) -> None:
        check_artifact_id(artifact_id)
        (self.root / artifact_id).unlink(missing_ok=True)

    def delete_older_than(self, age_s: float, kind: ArtifactKind = "img") -> int:
        """Also removes temp files abandoned by a crashed writer."""
        cutoff = self._clock() - age_s
        removed = 0
        for path in self.root.iterdir():
            name = path.name
            if not (name.startswith(f"{kind}_") or name.startswith(f".{kind}_")):
                continue
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class S3ArtifactStore:
    """Artifacts as objects under ``s3://bucket/prefix``, handed out as presigned URLs.

    ``endpoint_url`` points at any S3-compatible store (MinIO, R2, moto in tests).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "mediagate/",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        clock: Clock = system_clock,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._s3 = client or s3_client(endpoint_url=endpoint_url, region=region)
        self._clock = clock

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}{artifact_id}"

    def put(self, data: bytes, extension: str, kind: ArtifactKind = "img") -> str:
        """One PUT: S3 stores the whole object or nothing (never half a file)."""
        artifact_id = new_artifact_id(kind, extension)
        with s3_errors_as_store_unavailable(f"write {artifact_id}"):
            self._s3.put_object(
                Bucket=self.bucket,
                Key=self._key(artifact_id),
                Body=data,
                ContentType=content_type(artifact_id),
            )
        return artifact_id

    def read(self, artifact_id: str) -> bytes:
        check_artifact_id(artifact_id)
        with s3_errors_as_store_unavailable(f"read {artifact_id}"):
            try:
                response = self._s3.get_object(Bucket=self.bucket, Key=self._key(artifact_id))
            except self._s3.exceptions.NoSuchKey:
                raise NotFound(f"file {artifact_id} no longer exists", param="file_id") from None
            return bytes(response["Body"].read())

    def url(self, artifact_id: str, ttl_s: int, base_url: str) -> str:
        return str(
            self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(artifact_id)},
                ExpiresIn=ttl_s,
            )
        )

    def delete(self, artifact_id: str) -> None:
        check_artifact_id(artifact_id)
        with s3_errors_as_store_unavailable(f"delete {artifact_id}"):
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(artifact_id))

    def delete_older_than(self, age_s: float, kind: ArtifactKind = "img") -> int:
        cutoff = self._clock() - age_s
        removed = 0
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{kind}_"):
            stale = [
                {"Key": item["Key"]}
                for item in page.get("Contents", [])
                if item["LastModified"].timestamp() < cutoff
            ]
            if stale:
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": stale})
                removed += len(stale)
        return removed


# S3 answers that mean "not now" rather than "never": retried by callers that can wait.
S3_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)


@contextmanager
def s3_errors_as_store_unavailable(action: str) -> Iterator[None]:
    """S3 that cannot be reached, times out, throttles or fails on its side is
    ``StoreUnavailable`` (a 503 with Retry-After; never the endpoint or S3's message in
    the answer, both are logged). Other S3 refusals (no such bucket, access denied)
    are a configuration fault: they stay errors, answered as a 500 that hides them."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except BotoCoreError as error:
        logger.warning("S3 could not %s: %r", action, error)
        raise StoreUnavailable(
            "the file store is unavailable right now; please retry shortly", retry_after_s=5.0
        ) from error
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status < 500 and code not in S3_TRANSIENT_CODES:
            logger.error("S3 refused to %s (%s): check the bucket and credentials", action, code)
            raise
        logger.warning("S3 could not %s: %r", action, error)
        raise StoreUnavailable(
            "the file store is unavailable right now; please retry shortly", retry_after_s=5.0
        ) from error


# Bounded waits: botocore's defaults (60 s to connect, 60 s per read, retried) would hold
# a request for minutes on an S3 endpoint that stopped answering.
S3_CONNECT_TIMEOUT_S = 3.0
S3_READ_TIMEOUT_S = 20.0


def s3_client(*, endpoint_url: str | None = None, region: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_READ_TIMEOUT_S,
        ),
    )


class ArtifactConfig(BaseModel):
    """Which backend holds artifacts; plain data that crosses Ray handles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local", "s3"] = Field("local", description="Artifact backend.")
    root: str | None = Field(None, description="Directory (backend local).")
    secret_path: str | None = Field(None, description="URL signing secret (backend local).")
    s3_bucket: str | None = Field(None, description="Bucket (backend s3).")
    s3_prefix: str = Field("mediagate/", description="Key prefix inside the bucket.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint, if not AWS.")
    s3_region: str | None = Field(None, description="AWS region.")


def open_artifact_store(config: ArtifactConfig, *, clock: Clock = system_clock) -> ArtifactStore:
    if config.backend == "s3":
        if not config.s3_bucket:
            raise ValueError("the s3 artifact backend needs s3_bucket")
        return S3ArtifactStore(
            config.s3_bucket,
            prefix=config.s3_prefix,
            endpoint_url=config.s3_endpoint_url,
            region=config.s3_region,
            clock=clock,
        )
    if not config.root or not config.secret_path:
        raise ValueError("the local artifact backend needs root and secret_path")
    secret = load_or_create_secret(Path(config.secret_path))
    return LocalArtifactStore(config.root, secret, clock=clock)
