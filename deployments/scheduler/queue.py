"""The scheduler's queue discipline, kept apart from Ray so it can be tested alone.

Strict priority between classes (higher first), with optional minimum shares so
that a lower class with work still gets, say, 10% of dispatches; round-robin
between accounts inside a class, so one account flooding its class does not
starve the others. Batches gather tickets of the head's shape from the head's
class, in the same round-robin order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mediagate.protocol.scheduling import ClassLoad
from mediagate.protocol.work import PartialImage


def tickets_ahead(*, queued_above: int, depths: Mapping[int, int], own_depth: int) -> int:
    """Tickets dispatched before a new one from an account with ``own_depth`` queued:
    every ticket of higher classes (strict priority), and in its own class one per
    account per round it waits (round-robin), ``own_depth + 1`` rounds. ``depths``
    counts the class's accounts by how many tickets each has queued."""
    rounds = own_depth + 1
    ahead = queued_above
    for depth, accounts in depths.items():  # (a loop: a generator's sum costs three times)
        ahead += accounts * (depth if depth < rounds else rounds)
    return ahead


class Queueable(Protocol):
    """What the discipline needs of any queued job: whose it is and its class."""

    @property
    def account_id(self) -> str: ...

    @property
    def priority_class(self) -> int: ...


class Batchable(Queueable, Protocol):
    """A job that can share a pipeline call with others of the same ``batch_key``."""

    @property
    def batch_key(self) -> Hashable: ...

    @property
    def images(self) -> int: ...


JobT = TypeVar("JobT", bound=Queueable)
BatchableT = TypeVar("BatchableT", bound=Batchable)
RECENT_DISPATCHES = 100
# How far past the head a batch looks for same-shape work: a batch fills from the next
# tickets in turn, and a dispatch never walks a long queue of other shapes.
BATCH_LOOKAHEAD = 256


@dataclass(eq=False)
class Ticket(Generic[JobT]):
    """A queued job, and the future its submitter awaits when one waits for the answer
    (an image request does; a durable video job has nobody waiting on the call)."""

    job: JobT
    enqueued_at: float
    future: asyncio.Future[Any] | None = field(default=None, repr=False)
    deadline: float = float("inf")
    preemptions: int = 0  # times a running batch holding it was taken back
    workers_lost: int = 0  # times the worker running it died under it
    estimated_wait_s: float | None = None  # what admission expected, to check it against
    # A streamed job's previews, handed to its submitter as the worker makes them; each
    # once, though a batch taken back and run again makes them again.
    partials: asyncio.Queue[PartialImage] | None = field(default=None, repr=False)
    partials_sent: set[tuple[int, int]] = field(default_factory=set, repr=False)

    @property
    def answered(self) -> bool:
        """Its submitter has its answer, or left: nothing more to send it."""
        return self.future is not None and self.future.done()

    def answer(self, result: Any) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(error)

    def send_partial(self, partial: PartialImage) -> None:
        sent = (partial.image_index, partial.partial_image_index)
        if self.partials is not None and not self.answered and sent not in self.partials_sent:
            self.partials_sent.add(sent)
            self.partials.put_nowait(partial)


class _Class(Generic[JobT]):
    """One priority class: a FIFO per account, served round-robin. It counts its
    accounts by depth as tickets come and go, so what admission asks of it (how many
    accounts have 1, 2, ... queued) costs the number of distinct depths, not a walk."""

    def __init__(self) -> None:
        self.accounts: OrderedDict[str, deque[Ticket[JobT]]] = OrderedDict()
        self.size = 0
        self.depths: Counter[int] = Counter()  # depth -> accounts queued that deep

    def _resized(self, old_depth: int, new_depth: int) -> None:
        self.size += new_depth - old_depth
        if old_depth:
            self.depths[old_depth] -= 1
            if not self.depths[old_depth]:
                del self.depths[old_depth]
        if new_depth:
            self.depths[new_depth] += 1

    def push(self, ticket: Ticket[JobT]) -> None:
        own = self.accounts.setdefault(ticket.job.account_id, deque())
        own.append(ticket)
        self._resized(len(own) - 1, len(own))

    def push_front(self, ticket: Ticket[JobT]) -> None:
        """Put a taken-back ticket first in its account's line, and that account first."""
        account = ticket.job.account_id
        own = self.accounts.setdefault(account, deque())
        own.appendleft(ticket)
        self.accounts.move_to_end(account, last=False)
        self._resized(len(own) - 1, len(own))

    def discard(self, ticket: Ticket[JobT]) -> bool:
        own = self.accounts.get(ticket.job.account_id)
        if own is None or ticket not in own:  # a walk of one account's line only
            return False
        own.remove(ticket)
        self._resized(len(own) + 1, len(own))
        if not own:
            del self.accounts[ticket.job.account_id]
        return True

    def in_turn(self) -> Iterator[Ticket[JobT]]:
        """Every ticket in the order this class would dispatch them, produced lazily (the
        head costs one step); the class must not change while this is being read."""
        for depth in itertools.count():
            found = False
            for own in self.accounts.values():
                if depth < len(own):
                    found = True
                    yield own[depth]
            if not found:
                return

    def position(self, ticket: Ticket[JobT]) -> int:
        """1-based place of a queued ticket in this class's dispatch order, 0 if absent:
        counted from the depths and the accounts before its own, not by walking tickets."""
        own = self.accounts.get(ticket.job.account_id, deque())
        try:
            rounds = own.index(ticket)  # rounds before its turn, each account's next ticket
        except ValueError:
            return 0
        earlier_rounds = sum(
            accounts * min(depth, rounds) for depth, accounts in self.depths.items()
        )
        earlier_in_round = 0
        for line in self.accounts.values():
            if line is own:
                break
            earlier_in_round += len(line) > rounds
        return earlier_rounds + earlier_in_round + 1

    def take(self, tickets: list[Ticket[JobT]]) -> None:
        """Remove ``tickets`` (the head's account goes to the back of the rotation)."""
        head_account = tickets[0].job.account_id
        for ticket in tickets:
            self.discard(ticket)
        if head_account in self.accounts:
            self.accounts.move_to_end(head_account)


class FairQueue(Generic[JobT]):
    """Priority classes with optional minimum shares; round-robin accounts within a class."""

    def __init__(self, min_shares: Mapping[int, float] | None = None) -> None:
        self._classes: dict[int, _Class[JobT]] = {}
        self.min_shares = dict(min_shares or {})
        # Classes not to dispatch now (step-level models: they fill their share of the
        # seats); the next class is then the best of the others, so a lower class that
        # min_shares put first never keeps a higher one from the seats left to it.
        self.held_back: frozenset[int] = frozenset()
        self._recent: deque[int] = deque(maxlen=RECENT_DISPATCHES)
        self._recent_by_class: Counter[int] = Counter()  # the same, counted per class

    def __len__(self) -> int:
        total = 0
        for queued in self._classes.values():
            total += queued.size
        return total

    def queued(self, priority_class: int) -> int:
        """Tickets queued in one class (admission asks at every request)."""
        queued = self._classes.get(priority_class)
        return queued.size if queued is not None else 0

    def length_by_class(self) -> dict[int, int]:
        return {cls: queued.size for cls, queued in self._classes.items() if queued.size}

    def _class(self, priority_class: int) -> _Class[JobT]:
        # (not ``setdefault(cls, _Class())``: that builds a class, and its Counter, per push)
        queued = self._classes.get(priority_class)
        if queued is None:  # a class seen for the first time: classes stay in order
            queued = self._classes[priority_class] = _Class()
            self._classes = dict(sorted(self._classes.items()))
        return queued

    def push(self, ticket: Ticket[JobT]) -> None:
        self._class(ticket.job.priority_class).push(ticket)

    def requeue(self, ticket: Ticket[JobT]) -> None:
        """Return a ticket whose batch was preempted: it keeps its place at the front."""
        self._class(ticket.job.priority_class).push_front(ticket)

    def discard(self, ticket: Ticket[JobT]) -> bool:
        """Remove a ticket whose submitter went away; ``False`` if it was not queued."""
        queued = self._classes.get(ticket.job.priority_class)
        return queued is not None and queued.discard(ticket)

    def tickets(self) -> Iterator[Ticket[JobT]]:
        """Every queued ticket, in no particular order."""
        for queued in self._classes.values():
            for own in queued.accounts.values():
                yield from own

    def _next_class(self) -> int | None:
        waiting = [
            cls
            for cls, queued in self._classes.items()
            if queued.size and cls not in self.held_back
        ]
        if not waiting:
            return None
        dispatched = len(self._recent) or 1
        starved = [
            cls
            for cls in waiting
            if self._recent_by_class[cls] / dispatched < self.min_shares.get(cls, 0.0)
        ]
        return max(starved) if starved else max(waiting)

    def head(self) -> Ticket[JobT] | None:
        cls = self._next_class()
        if cls is None:
            return None
        return next(self._classes[cls].in_turn())

    def take_next(self) -> Ticket[JobT] | None:
        """Remove and return the next ticket alone (work that is never batched)."""
        cls = self._next_class()
        if cls is None:
            return None
        ticket = next(self._classes[cls].in_turn())
        self._classes[cls].take([ticket])
        self._record_dispatch(cls)
        return ticket

    def _plan_batch(self: FairQueue[BatchableT], max_images: int) -> list[Ticket[BatchableT]]:
        cls = self._next_class()
        if cls is None:
            return []
        order = self._classes[cls].in_turn()
        head = next(order)
        batch, images = [head], head.job.images
        for ticket in itertools.islice(order, BATCH_LOOKAHEAD):
            if images >= max_images:
                break
            if (
                ticket.job.batch_key == head.job.batch_key
                and images + ticket.job.images <= max_images
            ):
                batch.append(ticket)
                images += ticket.job.images
        return batch

    def batch_images_available(self: FairQueue[BatchableT], max_images: int) -> int:
        """How many images ``take_batch(max_images)`` would return now."""
        return sum(ticket.job.images for ticket in self._plan_batch(max_images))

    def hold_for_fuller_batch_s(
        self: FairQueue[BatchableT], *, max_images: int, batch_wait_s: float, waited_s: float
    ) -> float | None:
        """How long to hold the head's partial batch hoping for more of its shape (the
        head has waited ``waited_s``); ``None``: dispatch now."""
        if batch_wait_s > waited_s and self.batch_images_available(max_images) < max_images:
            return batch_wait_s - waited_s
        return None

    def take_batch(self: FairQueue[BatchableT], max_images: int) -> list[Ticket[BatchableT]]:
        """Remove and return the next ticket plus same-shape ones of its class, up to
        ``max_images`` (the first is always taken, even when it alone exceeds it)."""
        batch = self._plan_batch(max_images)
        if batch:
            cls = batch[0].job.priority_class
            self._classes[cls].take(batch)
            self._record_dispatch(cls)
        return batch

    def charge(self, priority_class: int) -> None:
        """Count capacity used by ``priority_class`` outside a dispatch (the work a batch
        it preempted had done and will redo), so lower classes' wait estimates and
        minimum shares see that the capacity was not theirs."""
        self._record_dispatch(priority_class)

    def _record_dispatch(self, priority_class: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_by_class[self._recent[0]] -= 1  # about to fall out of the window
        self._recent.append(priority_class)
        self._recent_by_class[priority_class] += 1

    def position(self, ticket: Ticket[JobT]) -> int:
        """1-based place of a queued ticket in dispatch order under strict priority
        (minimum shares aside); 0 when it is not queued."""
        same = self._classes.get(ticket.job.priority_class)
        in_class = same.position(ticket) if same is not None else 0
        return self.queued_above(ticket.job.priority_class) + in_class if in_class else 0

    def queued_above(self, priority_class: int) -> int:
        above = 0
        for cls, queued in self._classes.items():
            if cls > priority_class:
                above += queued.size
        return above

    def depths(self, priority_class: int) -> Counter[int]:
        """How many accounts of the class have 1, 2, ... tickets queued (no account ids)."""
        same = self._classes.get(priority_class)
        return Counter(same.depths) if same else Counter()

    def depth_by_account(self, priority_class: int) -> dict[str, int]:
        """How many tickets each account of the class has queued (those with any)."""
        same = self._classes.get(priority_class)
        return {account: len(own) for account, own in same.accounts.items()} if same else {}

    def class_loads(self, classes_seen: set[int]) -> dict[int, ClassLoad]:
        """Per class (every one seen, and every one queued now) what a router needs to
        decide admission as this queue would (``PublishedLoad.classes``)."""
        by_class = self.length_by_class()
        return {
            cls: ClassLoad(
                queued=by_class.get(cls, 0),
                queued_above=self.queued_above(cls),
                share_above=self.share_above(cls),
                depths=dict(self.depths(cls)),
                depth_by_account=self.depth_by_account(cls),
            )
            for cls in classes_seen | set(by_class)
        }

    def ahead_of(self, job: JobT) -> int:
        """Tickets that would be dispatched before ``job`` if it were pushed now."""
        same = self._classes.get(job.priority_class)
        if same is None:
            return self.queued_above(job.priority_class)
        return tickets_ahead(
            queued_above=self.queued_above(job.priority_class),
            depths=same.depths,  # read, not copied: this runs for every admission
            own_depth=len(same.accounts.get(job.account_id, ())),
        )

    def ahead_of_new(self, priority_class: int) -> int:
        """Tickets ahead of a request from an account with nothing queued, in ``priority_class``."""
        return tickets_ahead(
            queued_above=self.queued_above(priority_class),
            depths=self.depths(priority_class),
            own_depth=0,
        )

    def share_above(self, priority_class: int) -> float:
        """Fraction of recent dispatches that went to classes above ``priority_class``: the
        part of the capacity a request of this class cannot count on."""
        if not self._recent:
            return 0.0
        above = 0
        for cls, dispatched in self._recent_by_class.items():
            if cls > priority_class:
                above += dispatched
        return above / len(self._recent)
