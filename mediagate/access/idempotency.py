"""``Idempotency-Key``: a repeated POST gets the first answer and costs nothing more.

The first request with a key claims it (a per-account document in the state
store, so the claim is atomic across router replicas) and stores its answer
when it succeeds. A repeat with the same body gets that answer back (a video
job's *current* state); a repeat while the first still runs gets 409; the same
key with a different body gets 422. A failed request gives its key back, so a
retry runs again. Keys are kept for 24 hours.

What is kept is bounded: an answer larger than ``INLINE_ANSWER_BYTES`` (base64
images) is written to the artifact store and the record keeps its id, so a record is
a few hundred bytes whatever was generated; an account may start at most
``MAX_KEYS_PER_WINDOW`` keys per 24-hour window (429 beyond, naming the header); the
state store drops expired records (Redis by its TTL, SQLite by the router's sweep), and
the sweep deletes kept answers once no record can point at them.

Each claim has its own id: only the request that holds the claim may complete or
release it, so a request whose claim was taken over as stale (its router seemed
dead) cannot overwrite or delete the claim of the request that took it over.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel

from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import (
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unprocessable,
)
from mediagate.stores import JobStore
from mediagate.stores.artifacts import ArtifactStore

IDEMPOTENCY_TTL_S = 24 * 3600.0
# A claim whose request never finished (its router died) can be taken over after this.
# Longer than any request may live: the pro tier may wait 600 s in the queue, then
# generate; a takeover of a live request would run (and charge) the work twice.
STALE_CLAIM_S = 1800.0
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
# Answers above this size (images in base64) live in the artifact store, not the record.
INLINE_ANSWER_BYTES = 4096
# New keys an account may start per IDEMPOTENCY_TTL_S window (records alive at once are
# at most twice this, across a window's edge). Far above any tier's daily images.
MAX_KEYS_PER_WINDOW = 10_000
KEY_WINDOW_DOCUMENT = "idem-window"


class StoredAnswer(BaseModel):
    """What a completed request answered."""

    status_code: int
    body: str | None = None
    body_artifact: str | None = None  # a large body, kept in the artifact store
    headers: dict[str, str] = {}
    video_id: str | None = None


class IdempotencyRecord(BaseModel):
    fingerprint: str
    state: Literal["running", "done"]
    started_at: float
    claim_id: str | None = None  # which request holds a running claim
    answer: StoredAnswer | None = None


class KeyWindow(BaseModel):
    """How many keys the account started since ``started_at``."""

    started_at: float
    keys: int = 0


class Claim(BaseModel):
    """The outcome of ``claim``: the key is ours (``claim_id``), or the answer to replay."""

    claim_id: str | None = None
    answer: StoredAnswer | None = None


def check_key(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces",
            param="Idempotency-Key",
        )
    return key


def keep_answer(
    artifacts: ArtifactStore,
    status_code: int,
    body: bytes,
    headers: dict[str, str],
    video_id: str | None = None,
) -> StoredAnswer:
    """What to keep of an answer: a video job by its id (a repeat shows it as it is now),
    a small body inline, a large one as an artifact (blocking: run it in a thread)."""
    if video_id is not None:
        return StoredAnswer(status_code=status_code, headers=headers, video_id=video_id)
    if len(body) <= INLINE_ANSWER_BYTES:
        return StoredAnswer(status_code=status_code, body=body.decode(), headers=headers)
    kept = artifacts.put(body, "json", "ans")
    return StoredAnswer(status_code=status_code, body_artifact=kept, headers=headers)


def kept_body(artifacts: ArtifactStore, answer: StoredAnswer) -> Any:
    """The JSON body ``answer`` had (blocking); 410 if its artifact is gone."""
    if answer.body_artifact is None:
        return json.loads(answer.body or "null")
    try:
        return json.loads(artifacts.read(answer.body_artifact))
    except NotFound:
        raise Gone(
            "the answer to this Idempotency-Key is no longer kept; send the request again "
            "with a new key",
            param="Idempotency-Key",
        ) from None


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for (canonical JSON, not raw bytes: multipart
    boundaries differ between a client's retries of the same request)."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyKeys:
    """Claim, complete and release keys in the state store."""

    def __init__(self, store: JobStore, *, clock: Clock = system_clock) -> None:
        self.store = store
        self._clock = clock

    @staticmethod
    def _name(key: str) -> str:
        return f"idem:{hashlib.sha256(key.encode()).hexdigest()}"

    async def claim(self, account_id: str, key: str, digest: str) -> Claim:
        """The key for this request (``claim_id`` set: go ahead), or the first answer to
        send again (``answer`` set). 422 for another body, 409 while the first runs."""
        now = self._clock()
        claim_id = uuid.uuid4().hex

        def change(text: str | None) -> tuple[str | None, Claim]:
            record = IdempotencyRecord.model_validate_json(text) if text else None
            if record is None or (
                record.state == "running" and now - record.started_at > STALE_CLAIM_S
            ):
                claimed = IdempotencyRecord(
                    fingerprint=digest, state="running", started_at=now, claim_id=claim_id
                )
                return claimed.model_dump_json(), Claim(claim_id=claim_id)
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
            return text, Claim(answer=record.answer)

        claim = await self.store.mutate(
            account_id, self._name(key), change, ttl_s=IDEMPOTENCY_TTL_S
        )
        if claim.claim_id is None:
            return claim
        full_for_s = await self._start_key(account_id, now)
        if full_for_s is not None:
            await self.release(account_id, key, claim.claim_id)
            raise RateLimited(
                f"this account started more than {MAX_KEYS_PER_WINDOW} Idempotency-Keys in "
                "24 hours; send requests without the header or retry later",
                param="Idempotency-Key",
                retry_after_s=max(1.0, full_for_s),
            )
        return claim

    async def _start_key(self, account_id: str, now: float) -> float | None:
        """Count one more key in the account's window; once it is full, nothing is
        counted and the answer is how long until the window ends."""

        def change(text: str | None) -> tuple[str | None, float | None]:
            window = KeyWindow.model_validate_json(text) if text else None
            if window is None or now - window.started_at >= IDEMPOTENCY_TTL_S:
                window = KeyWindow(started_at=now)
            if window.keys >= MAX_KEYS_PER_WINDOW:
                return text, window.started_at + IDEMPOTENCY_TTL_S - now
            window.keys += 1
            return window.model_dump_json(), None

        return await self.store.mutate(
            account_id, KEY_WINDOW_DOCUMENT, change, ttl_s=IDEMPOTENCY_TTL_S
        )

    async def complete(
        self, account_id: str, key: str, claim_id: str, digest: str, answer: StoredAnswer
    ) -> bool:
        """Keep ``answer`` for repeats; ``False`` (nothing written) if the claim is no
        longer this request's."""
        record = IdempotencyRecord(
            fingerprint=digest, state="done", started_at=self._clock(), answer=answer
        )

        def change(text: str | None) -> tuple[str | None, bool]:
            if not _holds(text, claim_id):
                return text, False
            return record.model_dump_json(), True

        return await self.store.mutate(account_id, self._name(key), change, ttl_s=IDEMPOTENCY_TTL_S)

    async def release(self, account_id: str, key: str, claim_id: str) -> bool:
        """The request failed: a retry with this key runs again (if the claim is still
        this request's; ``False`` otherwise)."""

        def change(text: str | None) -> tuple[str | None, bool]:
            if not _holds(text, claim_id):
                return text, False
            return None, True

        return await self.store.mutate(account_id, self._name(key), change)


def _holds(text: str | None, claim_id: str) -> bool:
    """Whether the stored record is the running claim ``claim_id``."""
    if text is None:
        return False
    record = IdempotencyRecord.model_validate_json(text)
    return record.state == "running" and record.claim_id == claim_id
