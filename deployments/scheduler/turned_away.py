"""Demand refused at admission, kept so the autoscaler can see it.

A request shed at admission never reaches the queue the autoscaling policy reads: under
a flood, the fleet saw only the free work it had room to admit, so it never grew for
the rest, whatever the tier's ``queue_weights`` said (docs/SCALE.md, finding 1). This
keeps, per priority class, the worker time the refused requests would have taken over
the last ``TURNED_AWAY_WINDOW_S``; as a number of requests running at once (Little's
law: refusals per second x seconds each would hold a slot) it is the demand the
scheduler adds to its report, weighed by class like its queue.

A client refused retries, often honouring Retry-After; counting every attempt would
count one user several times over. An account counts once per window per class (a
refused user wants about one request served). Pure: the time is an argument.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

TURNED_AWAY_WINDOW_S = 60.0


class TurnedAwayDemand:
    """Refused work per class over a sliding window, one refusal per account."""

    def __init__(self, window_s: float = TURNED_AWAY_WINDOW_S) -> None:
        self.window_s = window_s
        self._refusals: deque[tuple[float, str, int, float]] = deque()
        self._counted: set[tuple[str, int]] = set()  # (account, class) in the window
        self._slot_s_by_class: dict[int, float] = {}
        self._unsent: dict[int, float] = {}  # counted since ``take_unsent`` (routers)

    def add(self, account_id: str, priority_class: int, slot_s: float, now: float) -> bool:
        """One refusal of a request that would have held a worker slot ``slot_s``
        seconds; False when its account was already counted in this window."""
        self._expire(now)
        key = (account_id, priority_class)
        if key in self._counted or slot_s <= 0:
            return False
        self._counted.add(key)
        self._keep(now, account_id, priority_class, slot_s)
        _add(self._unsent, priority_class, slot_s)
        return True

    def take_unsent(self) -> dict[int, float]:
        """What ``add`` counted since the last call: a router sends it to the scheduler
        with its next read of the published load (``merge`` there)."""
        unsent, self._unsent = self._unsent, {}
        return unsent

    def give_back(self, unsent: Mapping[int, float]) -> None:
        """``take_unsent``'s counts that could not be sent: they go with the next read."""
        for priority_class, slot_s in unsent.items():
            _add(self._unsent, priority_class, slot_s)

    def merge(self, slot_s_by_class: Mapping[int, float], now: float) -> None:
        """Refusals counted elsewhere (a router's early refusals, each account once in
        its own window), arriving now."""
        for priority_class, slot_s in slot_s_by_class.items():
            if slot_s > 0:
                self._keep(now, "", int(priority_class), float(slot_s))

    def _keep(self, now: float, account_id: str, priority_class: int, slot_s: float) -> None:
        """A refusal in the window (``account_id`` empty: counted by a router)."""
        self._refusals.append((now, account_id, priority_class, slot_s))
        _add(self._slot_s_by_class, priority_class, slot_s)

    def concurrency_by_class(self, now: float) -> dict[int, float]:
        """Per class, the requests that would be running at once had the refused ones
        been served: refused slot-seconds in the window over the window."""
        self._expire(now)
        return {
            cls: slot_s / self.window_s
            for cls, slot_s in self._slot_s_by_class.items()
            if slot_s > 1e-9
        }

    def _expire(self, now: float) -> None:
        while self._refusals and self._refusals[0][0] <= now - self.window_s:
            _, account_id, priority_class, slot_s = self._refusals.popleft()
            self._counted.discard((account_id, priority_class))
            left = self._slot_s_by_class[priority_class] - slot_s
            if left > 1e-9:
                self._slot_s_by_class[priority_class] = left
            else:
                del self._slot_s_by_class[priority_class]


def _add(slot_s_by_class: dict[int, float], priority_class: int, slot_s: float) -> None:
    slot_s_by_class[priority_class] = slot_s_by_class.get(priority_class, 0.0) + slot_s
