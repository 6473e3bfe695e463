"""What the router asks before queueing anything: may this account do this, now?

``TierGuard.admit`` reserves quota in the ledger and returns an ``Admission``;
``settle`` commits it when the work was delivered and releases it otherwise,
exactly once. When the state store is down, tiers with a fail-open budget are
admitted against a small per-replica, per-account budget (logged and counted);
the others get a 503 with ``Retry-After``. The headers a client sees
(``x-ratelimit-*``) are derived from the ledger's usage report.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import dataclass

from mediagate.access.accounts import Account
from mediagate.access.ledger import QuotaLedger
from mediagate.access.quota import Kind, Usage
from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores import StoreUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """A reservation (or a fail-open pass) for one request."""

    account_id: str
    reservation_id: str | None
    usage: Usage | None
    fail_open: bool = False
    units: int = 0  # images a fail-open pass took from the outage budget


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``, ``250ms``."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(usage: Usage | None) -> dict[str, str]:
    """``x-ratelimit-*-requests`` (per minute) and ``x-ratelimit-*-images`` (per day)."""
    if usage is None:
        return {}
    headers: dict[str, str] = {}
    if usage.images_per_minute is not None:
        headers |= {
            "x-ratelimit-limit-requests": str(usage.images_per_minute),
            "x-ratelimit-remaining-requests": str(
                max(0, usage.images_per_minute - usage.images_last_minute)
            ),
            "x-ratelimit-reset-requests": go_duration(usage.minute_resets_in_s),
        }
    if usage.images_per_day is not None:
        headers |= {
            "x-ratelimit-limit-images": str(usage.images_per_day),
            "x-ratelimit-remaining-images": str(max(0, usage.images_per_day - usage.images_today)),
            "x-ratelimit-reset-images": go_duration(usage.day_resets_in_s),
        }
    return headers


class TierGuard:
    """Reserve, commit and release quota for the router; degrade per tier in an outage."""

    def __init__(self, ledger: QuotaLedger, *, clock: Clock = system_clock) -> None:
        self.ledger = ledger
        self.counters: Counter[str] = Counter()
        self._clock = clock
        self._fail_open: dict[str, deque[float]] = {}

    async def admit(self, account: Account, *, kind: Kind, units: int) -> Admission:
        try:
            rid, usage = await self.ledger.reserve(account, kind=kind, units=units)
        except StoreUnavailable as outage:
            return self._admit_without_store(account, kind, units, outage)
        self.counters[f"admitted_{kind}"] += 1
        return Admission(account_id=account.id, reservation_id=rid, usage=usage)

    def _admit_without_store(
        self, account: Account, kind: Kind, units: int, outage: StoreUnavailable
    ) -> Admission:
        tier = self.ledger.policy.tier(account.tier)
        budget = tier.fail_open_images_per_minute
        now = self._clock()
        spent = self._fail_open.setdefault(account.id, deque())
        while spent and spent[0] <= now - 60:
            spent.popleft()
        if kind == "image" and budget and len(spent) + units <= budget:
            spent.extend([now] * units)
            self.counters["store_outage_fail_open"] += 1
            logger.warning(
                "state store down: admitted %d image(s) for %s (%s) without a ledger",
                units,
                account.name,
                account.tier,
            )
            return Admission(
                account_id=account.id, reservation_id=None, usage=None, fail_open=True, units=units
            )
        self.counters["store_outage_fail_closed"] += 1
        logger.warning("state store down: refused %s (%s): %s", account.name, account.tier, outage)
        raise StoreUnavailable(
            "quota checks are unavailable right now; please retry shortly",
            retry_after_s=outage.retry_after_s or 2.0,
        )

    async def settle(self, admission: Admission, *, charge: bool) -> None:
        """Commit work that was done (delivered, or run for a caller who left), release
        anything else; failures here never reach the client."""
        if admission.fail_open and not charge:  # failed on our side: its budget back
            spent = self._fail_open.get(admission.account_id, deque())
            for _ in range(min(admission.units, len(spent))):
                spent.pop()
            self.counters["store_outage_fail_open_returned"] += 1
        if admission.reservation_id is None:
            return
        try:
            await self.ledger.finish(admission.account_id, admission.reservation_id, commit=charge)
        except Exception as error:  # an image reservation left held expires as delivered
            self.counters["settle_failed"] += 1
            logger.warning("could not settle %s: %r", admission.reservation_id, error)
        else:
            self.counters["committed" if charge else "released"] += 1
