"""Generated files on local disk, handed out through signed, expiring URLs.

The URL carries the artifact id, an expiry time and an HMAC-SHA256 of both under
a secret kept in ``MEDIAGATE_HOME/secrets``; every router replica on the machine
reads the same secret, so any of them can verify any URL.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from deployments.errors import Forbidden, NotFound

ARTIFACT_ID = re.compile(r"^art_[0-9a-f]{32}\.(png|jpeg|webp|mp4)$")


def load_or_create_secret(path: Path) -> bytes:
    """The signing secret at ``path``, created (0600) by whichever process comes first."""
    path.parent.mkdir(parents=True, exist_ok=True)
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

    def __init__(
        self, root: str | Path, secret: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self._clock = clock

    def put(self, data: bytes, extension: str) -> str:
        """Store ``data``; returns its artifact id. The write is atomic (temp file + rename)."""
        artifact_id = f"art_{uuid.uuid4().hex}.{extension}"
        staging = self.root / f".{artifact_id}.tmp"
        staging.write_bytes(data)
        staging.rename(self.root / artifact_id)
        return artifact_id

    def signature(self, artifact_id: str, expires_at: int) -> str:
        message = f"{artifact_id}:{expires_at}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def signed_path(self, artifact_id: str, ttl_s: int) -> str:
        """A path+query (no host) that downloads ``artifact_id`` until ``ttl_s`` from now."""
        expires_at = int(self._clock()) + ttl_s
        signature = self.signature(artifact_id, expires_at)
        return f"/v1/files/{artifact_id}/content?expires={expires_at}&signature={signature}"

    def read_signed(self, artifact_id: str, expires_at: int, signature: str) -> bytes:
        """The artifact's bytes if the signature holds and has not expired."""
        if not ARTIFACT_ID.match(artifact_id):
            raise NotFound(f"no file {artifact_id!r}", param="file_id")
        expected = self.signature(artifact_id, expires_at)
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("the URL's signature is not valid", code="invalid_signature")
        if self._clock() > expires_at:
            raise Forbidden("the URL has expired; generate the image again", code="url_expired")
        path = self.root / artifact_id
        if not path.exists():
            raise NotFound(f"file {artifact_id} no longer exists", param="file_id")
        return path.read_bytes()

    def delete_older_than(self, age_s: float) -> int:
        """Remove artifacts (and abandoned temp files) older than ``age_s``; returns the count."""
        cutoff = self._clock() - age_s
        removed = 0
        for path in self.root.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
