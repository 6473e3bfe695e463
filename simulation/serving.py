"""One model's scheduler, driven in simulated time by mediagate's own decisions.

Each call below is the real code the Serve scheduler runs (``deployments/scheduler``):
the ``FairQueue`` (classes, accounts in turn, batches of one shape, held-back classes
for seat shares), ``admit_or_shed`` on the queue as it stands, the ``Deadlines`` heap,
``hold_for_fuller_batch_s``, ``class_to_preempt_for`` and ``batch_to_preempt``, the
smoothed service time and the scheduler's settings model. What is simulated is only
what the asyncio plumbing and the GPU do: time passes and a batch comes back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from autoscaling.policy import report_metrics
from deployments.scheduler.admission import admit_or_shed, updated_service_time
from deployments.scheduler.deadlines import Deadlines
from deployments.scheduler.preemption import RunningBatch, batch_to_preempt, class_to_preempt_for
from deployments.scheduler.queue import FairQueue, Ticket
from deployments.scheduler.settings import ImageSchedulerSettings, VideoSchedulerSettings
from deployments.scheduler.turned_away import TurnedAwayDemand
from mediagate.protocol.catalog import Batching
from mediagate.protocol.errors import Overloaded
from simulation.fleet import Replica
from simulation.requests import Answer, SimJob
from simulation.scenario import ModelProfile


@dataclass(eq=False)
class SimBatch:
    batch_id: int
    tickets: list[Ticket[SimJob]]
    replica: Replica
    started_at: float
    service_s: float
    priority_class: int
    batch_key: Hashable
    most_preempted: int  # the most times any of its requests was preempted already
    stopping: bool = False  # being preempted


@dataclass
class Outcomes:
    """What the server tells the engine: set by the engine."""

    started: Callable[[Ticket[SimJob], float], None]
    served: Callable[[Ticket[SimJob], float], None]
    expired: Callable[[Ticket[SimJob], float], None]
    failed: Callable[[Ticket[SimJob], float], None]
    batch_ran: Callable[[ModelServer, SimBatch, float], None]


@dataclass
class ModelServer:
    """The scheduler of one model and the slots of its running replicas."""

    name: str
    profile: ModelProfile
    schedule: Callable[[float, str, object], None]
    outcomes: Outcomes
    settings: ImageSchedulerSettings | VideoSchedulerSettings = field(init=False)
    batching: Batching = field(init=False)  # the profile's, under the settings' override
    queue: FairQueue[SimJob] = field(default_factory=FairQueue)
    deadlines: Deadlines[SimJob] = field(default_factory=Deadlines)
    turned_away: TurnedAwayDemand = field(default_factory=TurnedAwayDemand)
    service_s: dict[Hashable, float] = field(default_factory=dict)
    batches: dict[int, SimBatch] = field(default_factory=dict)
    free_replicas: dict[int, Replica] = field(default_factory=dict)  # running, with a free slot
    classes_seen: set[int] = field(default_factory=set)
    # Running batches preemption may take (not being stopped, none of their requests
    # preempted its allowed times yet) by class, in start order, and how many of each
    # shape: its candidates, found without walking every batch (see ``_preempt``).
    preemptable: dict[int, dict[int, SimBatch]] = field(default_factory=dict)
    preemptable_shapes: dict[int, Counter[Hashable]] = field(default_factory=dict)
    stopping_batches: int = 0
    busy_slots: int = 0
    slots: int = 0
    running_by_class: Counter[int] = field(default_factory=Counter)
    preemptions: int = 0
    _batch_ids: int = 0
    _dispatch_at: float = math.inf  # a dispatch pass already on the calendar

    def __post_init__(self) -> None:
        model = ImageSchedulerSettings if self.profile.kind == "image" else VideoSchedulerSettings
        self.settings = model.model_validate(self.profile.scheduler)
        catalog = Batching(
            max_batch_size=self.profile.max_batch_size, batch_wait_s=self.profile.batch_wait_s
        )
        self.batching = catalog
        if isinstance(self.settings, ImageSchedulerSettings):  # as the scheduler's reconfigure
            self.batching = self.settings.batching.over(catalog)
        self.queue.min_shares = dict(self.settings.min_shares)

    @property
    def running_requests(self) -> int:
        return self.running_by_class.total()

    @property
    def slots_per_replica(self) -> int:
        return self.settings.slots_per_replica

    # Requests.
    def submit(
        self, job: SimJob, now: float, max_wait_s: float, estimated_wait_s: float | None
    ) -> Ticket[SimJob]:
        """Queue a job ``admission`` admitted on the queue as it stands."""
        ticket: Ticket[SimJob] = Ticket(
            job=job,
            enqueued_at=now,
            future=Answer(),  # type: ignore[arg-type]
            deadline=now + max_wait_s,
            estimated_wait_s=estimated_wait_s,
        )
        self.queue.push(ticket)
        self.deadlines.add(ticket, queued=len(self.queue))
        self.dispatch(now)
        return ticket

    def admission(
        self, job: SimJob, now: float, max_wait_s: float, max_queued: int | None
    ) -> float | None:
        """``admit_or_shed`` on the queue as it stands: the router's early refusal (from
        the load the scheduler publishes, exact here) and the scheduler's own. A shed
        request's slot time is kept as demand turned away, as both count it."""
        cls = job.priority_class
        self.classes_seen.add(cls)
        service_s = self.service_s.get(job.batch_key)
        try:
            return admit_or_shed(
                ahead=self.queue.ahead_of(job),
                busy=self.busy_slots,
                slots=self.slots,
                service_s=service_s,
                max_wait_s=max_wait_s,
                queued_in_class=self.queue.queued(cls),
                max_queued=max_queued,
                share_above=self.queue.share_above(cls),
            )
        except Overloaded:
            self.turned_away.add(job.account_id, cls, service_s or 0.0, now)
            raise

    def withdraw(self, ticket: Ticket[SimJob]) -> bool:
        """A client left: True if its ticket was still queued (it never runs)."""
        return self.queue.discard(ticket)

    # Replicas.
    def replica_running(self, replica: Replica, now: float) -> None:
        self.slots += self.slots_per_replica
        self.free_replicas[replica.replica_id] = replica
        self.dispatch(now)

    def replica_stopping(self, replica: Replica) -> None:
        """Told to stop while busy: no new work; its slots leave with it."""
        self.free_replicas.pop(replica.replica_id, None)
        self.slots -= self.slots_per_replica

    def replica_removed(self, replica: Replica) -> None:
        """An idle running replica stopped (a downscale)."""
        self.free_replicas.pop(replica.replica_id, None)
        self.slots -= self.slots_per_replica

    def replica_lost(self, replica: Replica, now: float, *, was_running: bool) -> None:
        """The replica's node died: its batches come back as the scheduler's
        ``_after_worker_loss`` does: run again once after a pause, a second loss fails."""
        self.free_replicas.pop(replica.replica_id, None)
        if was_running:
            self.slots -= self.slots_per_replica
        for batch_id in list(replica.batches):
            batch = self._drop_batch(batch_id)
            self._slot_freed(batch, now)
            again = []
            for ticket in batch.tickets:
                ticket.workers_lost += 1
                if ticket.workers_lost > 1:
                    self.outcomes.failed(ticket, now)
                else:
                    again.append(ticket)
            self.schedule(now + self.settings.redispatch_delay_s, "requeue", (self, again, False))
        replica.batches.clear()

    # Dispatching.
    def dispatch(self, now: float) -> None:
        """The scheduler's ``_dispatch_ready``: expire, fill free slots, preempt."""
        self._drop_expired(now)
        while self.free_replicas and len(self.queue):
            self.queue.held_back = self.settings.held_back(busy=self.busy_slots, slots=self.slots)
            head = self.queue.head()
            if head is None:
                break
            if self.profile.kind == "image":
                max_images = self.batching.max_batch_size
                hold_s = self.queue.hold_for_fuller_batch_s(
                    max_images=max_images,
                    batch_wait_s=self.batching.batch_wait_s,
                    waited_s=now - head.enqueued_at,
                )
                if hold_s is not None:  # (at least 1 us: the loop's clock always moves on)
                    self.wake_at(now + max(hold_s, 1e-6))
                    return
                tickets = self.queue.take_batch(max_images)
            else:
                tickets = [ticket] if (ticket := self.queue.take_next()) is not None else []
            if tickets:
                self._start(tickets, now)
        if not self.free_replicas and len(self.queue):
            self._preempt(now)

    def wake_at(self, at: float) -> None:
        if at < self._dispatch_at:
            self._dispatch_at = at
            self.schedule(at, "dispatch", self)

    def woken(self, now: float) -> None:
        self._dispatch_at = math.inf
        self.dispatch(now)

    def _start(self, tickets: list[Ticket[SimJob]], now: float) -> None:
        replica = next(iter(self.free_replicas.values()))
        self._batch_ids += 1
        images = sum(ticket.job.images for ticket in tickets)
        head = tickets[0].job
        batch = SimBatch(
            self._batch_ids,
            tickets,
            replica,
            now,
            self.profile.service.of(images),
            head.priority_class,
            head.batch_key,
            max(ticket.preemptions for ticket in tickets),
        )
        self.batches[batch.batch_id] = batch
        if (
            isinstance(self.settings, ImageSchedulerSettings)
            and batch.most_preempted < self.settings.preemption.max_per_request
        ):
            self.preemptable.setdefault(batch.priority_class, {})[batch.batch_id] = batch
            shapes = self.preemptable_shapes.setdefault(batch.priority_class, Counter())
            shapes[batch.batch_key] += 1
        replica.batches.add(batch.batch_id)
        if len(replica.batches) >= self.slots_per_replica:
            del self.free_replicas[replica.replica_id]
        self.busy_slots += 1
        self.running_by_class[batch.priority_class] += len(tickets)
        for ticket in tickets:
            self.outcomes.started(ticket, now)
        self.schedule(now + batch.service_s, "batch_done", batch)

    def batch_done(self, batch: SimBatch, now: float) -> None:
        if self.batches.get(batch.batch_id) is not batch or batch.stopping:
            return  # lost with its replica, or preempted
        self._drop_batch(batch.batch_id)
        key = batch.tickets[0].job.batch_key
        self.service_s[key] = updated_service_time(self.service_s.get(key), batch.service_s)
        self.outcomes.batch_ran(self, batch, now)
        for ticket in batch.tickets:
            self.outcomes.served(ticket, now)
        self._slot_freed(batch, now)
        self.dispatch(now)

    def _drop_batch(self, batch_id: int) -> SimBatch:
        batch = self.batches.pop(batch_id)
        self._not_preemptable(batch)
        if batch.stopping:
            self.stopping_batches -= 1
        return batch

    def _not_preemptable(self, batch: SimBatch) -> None:
        if self.preemptable.get(batch.priority_class, {}).pop(batch.batch_id, None) is None:
            return
        shapes = self.preemptable_shapes[batch.priority_class]
        shapes[batch.batch_key] -= 1
        if not shapes[batch.batch_key]:
            del shapes[batch.batch_key]

    def _slot_freed(self, batch: SimBatch, now: float) -> None:
        replica = batch.replica
        replica.batches.discard(batch.batch_id)
        self.busy_slots -= 1
        self.running_by_class[batch.priority_class] -= len(batch.tickets)
        if replica.state == "running":
            self.free_replicas[replica.replica_id] = replica
        elif replica.state == "stopping" and not replica.batches:
            self.schedule(now, "replica_drained", replica)

    def _preempt(self, now: float) -> None:
        """The scheduler's ``_preempt_for_waiting_work``: ``class_to_preempt_for`` and
        ``batch_to_preempt`` decide. The latter is shown, per class from the lowest up,
        only the newest preemptable batch of each shape: it takes the lowest class first
        and there the most work left, which among batches of one shape (one expected
        time) is the one started last; so its choice is the one it would make over all
        of them, without a walk of thousands of batches at every dispatch."""
        waiting_class = class_to_preempt_for(
            self.queue.length_by_class(), stopping=self.stopping_batches
        )
        if waiting_class is None or not isinstance(self.settings, ImageSchedulerSettings):
            return
        policy = self.settings.preemption
        victim = None
        for cls in sorted(c for c in self.preemptable if c < waiting_class):
            candidates: dict[Hashable, SimBatch] = {}
            shapes = len(self.preemptable_shapes[cls])
            for batch in reversed(self.preemptable[cls].values()):
                if batch.batch_key not in candidates:
                    candidates[batch.batch_key] = batch
                    if len(candidates) == shapes:
                        break
            victim = batch_to_preempt(
                [
                    RunningBatch(
                        batch_id=b.batch_id,
                        priority_class=b.priority_class,
                        started_at=b.started_at,
                        expected_s=self.service_s.get(b.batch_key),
                        preemptions=b.most_preempted,
                        stopping=b.stopping,
                    )
                    for b in candidates.values()
                ],
                waiting_class,
                now=now,
                policy=policy,
            )
            if victim is not None:
                break
        if victim is None:
            return
        batch = self.batches[victim.batch_id]
        batch.stopping = True
        self._not_preemptable(batch)
        self.stopping_batches += 1
        self.preemptions += 1
        self.queue.charge(waiting_class)
        self.schedule(now + self.profile.preempt_stop_s, "preempted", batch)

    def preempted(self, batch: SimBatch, now: float) -> None:
        """The preempted batch's worker stopped: its requests go back first in line."""
        if batch.batch_id not in self.batches:
            return
        self._drop_batch(batch.batch_id)
        self._slot_freed(batch, now)
        self.requeue(batch.tickets, now, preempted=True)

    def requeue(self, tickets: list[Ticket[SimJob]], now: float, *, preempted: bool) -> None:
        """The scheduler's ``_requeue``: first in line, no queue deadline any more."""
        for ticket in reversed(tickets):
            ticket.deadline = math.inf
            self.queue.requeue(ticket)
            if preempted:
                ticket.preemptions += 1
        self.dispatch(now)

    def _drop_expired(self, now: float) -> None:
        for ticket in self.deadlines.due(now):
            if self.queue.discard(ticket):
                self.outcomes.expired(ticket, now)

    # What the scheduler reports to the autoscaler (``record_autoscaling_stats``).
    def autoscaling_metrics(self, now: float) -> dict[str, float]:
        by_class = self.queue.length_by_class()
        return report_metrics(
            by_class,
            self.running_requests,
            self.settings.weights(),
            self.classes_seen,
            self.running_by_class,
            self.turned_away.concurrency_by_class(now),
        )
