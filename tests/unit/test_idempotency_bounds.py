"""What ``Idempotency-Key`` keeps is bounded: large answers live in the artifact store
(the record holds their id), an account may start only so many keys per window, and
expired records leave SQLite for good (issue 15, part 6)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import mediagate.access.idempotency
import mediagate.stores.sqlite_store
from mediagate.access.idempotency import IDEMPOTENCY_TTL_S, IdempotencyKeys
from mediagate.protocol.errors import NotFound
from mediagate.stores import StateConfig
from tests.unit.harness import URL, Service
from tests.unit.test_idempotency import BODY, account_of, client_of, make_service, usage_of


async def stored_record(service: Service, name: str, key: str) -> str | None:
    """The raw idempotency record of ``key`` (read through a change that changes nothing)."""
    account_id = account_of(service, name).id
    record: str | None = await service.jobs.mutate(
        account_id, IdempotencyKeys._name(key), lambda text: (text, text)
    )
    return record


def kept_answers(service: Service) -> list[Path]:
    return sorted(service.artifacts.root.glob("ans_*.json"))


async def test_a_large_answer_is_kept_as_an_artifact_and_replayed_unchanged(
    tmp_path: Path, state_config: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mediagate.access.idempotency, "INLINE_ANSWER_BYTES", 256)
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("keeper", "plus", age_days=30), "Idempotency-Key": "big"}
    async with client_of(service) as client:
        first = await client.post(URL, json=BODY, headers=auth)
        again = await client.post(URL, json=BODY, headers=auth)

    assert first.status_code == 200, first.text
    assert len(first.content) > 256
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(service.scheduler.jobs) == 1
    (kept,) = kept_answers(service)
    record = await stored_record(service, "keeper", "big")
    assert record is not None and kept.name in record
    assert len(record) < 512  # a reference, not the images
    assert "b64_json" not in record
    # Kept answers are the service's own: no URL downloads them, even a validly signed one.
    expires = int(service.clock()) + 60
    signature = service.artifacts.signature(kept.name, expires)
    with pytest.raises(NotFound):
        service.artifacts.read_signed(kept.name, expires, signature)


async def test_a_small_answer_stays_inline(tmp_path: Path, state_config: StateConfig) -> None:
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("small", "plus", age_days=30), "Idempotency-Key": "small"}
    async with client_of(service) as client:
        first = await client.post(URL, json={**BODY, "n": 1, "size": "32x32"}, headers=auth)
    assert first.status_code == 200, first.text
    assert kept_answers(service) == []
    record = await stored_record(service, "small", "small")
    assert record is not None and first.json()["data"][0]["b64_json"] in record


async def test_a_kept_answer_that_is_gone_is_410_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mediagate.access.idempotency, "INLINE_ANSWER_BYTES", 64)
    service = Service(tmp_path)
    auth = {**service.other_auth("lost", "plus", age_days=30), "Idempotency-Key": "lost"}
    async with client_of(service) as client:
        first = await client.post(URL, json=BODY, headers=auth)
        for path in kept_answers(service):
            path.unlink()
        again = await client.post(URL, json=BODY, headers=auth)

    assert first.status_code == 200
    assert again.status_code == 410, again.text
    assert again.json()["error"]["param"] == "Idempotency-Key"
    assert len(service.scheduler.jobs) == 1
    assert (await usage_of(service, "lost")).images_today == 2


async def test_keys_beyond_the_window_cap_are_429_and_change_nothing(
    tmp_path: Path, state_config: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mediagate.access.idempotency, "MAX_KEYS_PER_WINDOW", 2)
    service = make_service(tmp_path, state_config)
    auth = service.other_auth("many", "plus", age_days=30)
    async with client_of(service) as client:
        answers = [
            await client.post(URL, json=BODY, headers={**auth, "Idempotency-Key": f"k{i}"})
            for i in range(3)
        ]
        replay = await client.post(URL, json=BODY, headers={**auth, "Idempotency-Key": "k0"})
        without_key = await client.post(URL, json=BODY, headers=auth)
        # The refused key was given back: it is not "in use" (409) nor kept.
        refused_again = await client.post(URL, json=BODY, headers={**auth, "Idempotency-Key": "k2"})

    assert [a.status_code for a in answers] == [200, 200, 429], answers[2].text
    error = answers[2].json()["error"]
    assert error["param"] == "Idempotency-Key" and error["code"] == "rate_limit_exceeded"
    assert 1 <= int(answers[2].headers["retry-after"]) <= IDEMPOTENCY_TTL_S
    assert refused_again.status_code == 429
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert without_key.status_code == 200
    assert len(service.scheduler.jobs) == 3  # k0, k1 and the request without a key
    assert (await usage_of(service, "many")).images_today == 6
    assert await stored_record(service, "many", "k2") is None


async def test_expired_records_leave_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(tmp_path)
    monkeypatch.setattr(mediagate.stores.sqlite_store, "time", SimpleNamespace(time=service.clock))
    auth = {**service.other_auth("gone", "plus", age_days=30), "Idempotency-Key": "day"}
    async with client_of(service) as client:
        assert (await client.post(URL, json=BODY, headers=auth)).status_code == 200

    def rows() -> int:
        with service.jobs._connect() as db:  # type: ignore[attr-defined]
            return int(db.execute("SELECT COUNT(*) FROM account_docs").fetchone()[0])

    before = rows()
    assert before >= 2  # the key's record and the account's key window (and the ledger)
    assert await service.jobs.purge_expired_documents() == 0  # nothing expired yet
    service.clock.advance(IDEMPOTENCY_TTL_S + 1)
    removed = await service.jobs.purge_expired_documents()
    assert removed >= 2 and rows() == before - removed
    assert await stored_record(service, "gone", "day") is None
