"""The quota ledger: the pure rules of ``mediagate.access.quota`` run atomically in the state store.

One JSON document per account (``quota``) holds the ledger; every reserve,
commit and release is one read-modify-write transaction on it (SQLite
``BEGIN IMMEDIATE`` or Redis WATCH/MULTI in the account's hash slot), so the
limits are exact under any concurrency. Commit and release take effect once:
finishing a reservation that is no longer held changes nothing.
"""

from __future__ import annotations

import uuid

from mediagate.access.accounts import Account
from mediagate.access.quota import Kind, LedgerState, Usage, finish, reserve, usage
from mediagate.access.tiers import TierPolicy
from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores import JobStore

LEDGER_DOCUMENT = "quota"


def _load(text: str | None) -> LedgerState:
    return LedgerState.model_validate_json(text) if text else LedgerState()


async def finish_reservation(store: JobStore, account_id: str, rid: str, *, commit: bool) -> bool:
    """Commit (the work was delivered) or release (it failed server-side) ``rid``, once."""

    def change(text: str | None) -> tuple[str | None, bool]:
        state, held = finish(_load(text), rid, commit=commit)
        return (state.model_dump_json() if held else text), held

    return await store.mutate(account_id, LEDGER_DOCUMENT, change)


class QuotaLedger:
    """Reservations against an account's tier limits."""

    def __init__(self, store: JobStore, policy: TierPolicy, *, clock: Clock = system_clock) -> None:
        self.store = store
        self.policy = policy
        self._clock = clock

    async def reserve(self, account: Account, *, kind: Kind, units: int) -> tuple[str, Usage]:
        """Admit ``units`` of ``kind`` or raise ``QuotaExceeded`` / ``RateLimited``."""
        tier = self.policy.tier(account.tier)
        rid = f"res_{uuid.uuid4().hex}"
        now, zone = self._clock(), self.policy.zone

        def change(text: str | None) -> tuple[str | None, Usage]:
            state = reserve(_load(text), tier, kind=kind, units=units, rid=rid, now=now, zone=zone)
            return state.model_dump_json(), usage(state, tier, now=now, zone=zone)

        return rid, await self.store.mutate(account.id, LEDGER_DOCUMENT, change)

    async def finish(self, account_id: str, rid: str, *, commit: bool) -> bool:
        return await finish_reservation(self.store, account_id, rid, commit=commit)

    async def usage(self, account: Account) -> Usage:
        tier = self.policy.tier(account.tier)
        now, zone = self._clock(), self.policy.zone

        def read(text: str | None) -> tuple[str | None, Usage]:
            return text, usage(_load(text), tier, now=now, zone=zone)

        return await self.store.mutate(account.id, LEDGER_DOCUMENT, read)
