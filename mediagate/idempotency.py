"""``Idempotency-Key``: a repeated POST gets the first answer and costs nothing more.

The first request with a key claims it (a per-account document in the state
store, so the claim is atomic across router replicas) and stores its answer
when it succeeds. A repeat with the same body gets that answer back (a video
job's *current* state); a repeat while the first still runs gets 409; the same
key with a different body gets 422. A failed request gives its key back, so a
retry runs again. Keys are kept for 24 hours.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from deployments.errors import Conflict, InvalidRequest, Unprocessable
from mediagate.state import JobStore

IDEMPOTENCY_TTL_S = 24 * 3600.0
# A claim whose request never finished (its router died) can be taken over after this.
STALE_CLAIM_S = 600.0
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")


class StoredAnswer(BaseModel):
    """What a completed request answered."""

    status_code: int
    body: str | None = None
    headers: dict[str, str] = {}
    video_id: str | None = None


class IdempotencyRecord(BaseModel):
    fingerprint: str
    state: Literal["running", "done"]
    started_at: float
    answer: StoredAnswer | None = None


def check_key(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces",
            param="Idempotency-Key",
        )
    return key


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for (canonical JSON, not raw bytes: multipart
    boundaries differ between a client's retries of the same request)."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyKeys:
    """Claim, complete and release keys in the state store."""

    def __init__(self, store: JobStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    @staticmethod
    def _name(key: str) -> str:
        return f"idem:{hashlib.sha256(key.encode()).hexdigest()}"

    async def claim(self, account_id: str, key: str, digest: str) -> StoredAnswer | None:
        """``None``: go ahead (the key is now ours). Otherwise the answer to send again."""
        now = self._clock()

        def change(text: str | None) -> tuple[str | None, StoredAnswer | None]:
            record = IdempotencyRecord.model_validate_json(text) if text else None
            if record is None or (
                record.state == "running" and now - record.started_at > STALE_CLAIM_S
            ):
                claimed = IdempotencyRecord(fingerprint=digest, state="running", started_at=now)
                return claimed.model_dump_json(), None
            if record.fingerprint != digest:
                raise Unprocessable(
                    "this Idempotency-Key was used with a different request; use a new key",
                    param="Idempotency-Key",
                )
            if record.state == "running":
                raise Conflict(
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                    param="Idempotency-Key",
                    retry_after_s=1,
                )
            return text, record.answer

        return await self.store.mutate(account_id, self._name(key), change, ttl_s=IDEMPOTENCY_TTL_S)

    async def complete(self, account_id: str, key: str, digest: str, answer: StoredAnswer) -> None:
        record = IdempotencyRecord(
            fingerprint=digest, state="done", started_at=self._clock(), answer=answer
        )

        def change(_: str | None) -> tuple[str | None, None]:
            return record.model_dump_json(), None

        await self.store.mutate(account_id, self._name(key), change, ttl_s=IDEMPOTENCY_TTL_S)

    async def release(self, account_id: str, key: str) -> None:
        """The request failed: a retry with this key runs again."""

        def change(_: str | None) -> tuple[str | None, None]:
            return None, None

        await self.store.mutate(account_id, self._name(key), change)
