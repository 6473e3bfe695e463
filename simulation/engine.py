"""The discrete-event simulator: a trace's requests through mediagate's own checks,
quota, schedulers and autoscaling policy, on a simulated fleet, in simulated time.

A request's path is the router's: the tier's feature gates and caps
(``access/tiers.py``), the quota reservation (``access/quota.py`` ``reserve``, on the
account's ledger state), then the model's scheduler (``simulation.serving``, the real
queue and admission). Every refusal is the real exception with its Retry-After;
clients then retry or give up (``Clients``), and a reservation is given back
(``finish(commit=False)``) whenever the request is not served, as the router does.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from deployments.scheduler.queue import Ticket
from mediagate.access import quota
from mediagate.access.tiers import (
    Tier,
    TierPolicy,
    check_edit_inputs,
    check_image_caps,
    check_video_request,
    load_tier_policy,
)
from mediagate.protocol.errors import MediagateError, ModelUnavailable, Overloaded
from simulation.control import Controller, ModelControl, simulated_time
from simulation.fleet import Fleet, Replica, ReplicaState
from simulation.report import Recorder
from simulation.requests import Answer, Request, SimJob
from simulation.scenario import HOUR_S, KINDS, Scenario
from simulation.serving import ModelServer, Outcomes
from simulation.trace import Trace

IMAGE_SIDE = 1024  # the request shape checked against tier caps (within every tier's)
IMAGE_STEPS = 28
VIDEO_SECONDS = 4
LEDGER_PRUNE_AFTER_S = 12 * HOUR_S  # into a quota day: windows (minutes) long over


class Simulation:
    """One run of a scenario over a trace."""

    def __init__(
        self, scenario: Scenario, trace: Trace, *, policy: TierPolicy | None = None
    ) -> None:
        self.scenario = scenario
        self.trace = trace
        self.policy = policy or load_tier_policy(scenario.tiers_file)
        self.now = 0.0
        self._calendar: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.rng = random.Random(scenario.seed)
        self.ledgers: dict[int, quota.LedgerState] = {}
        self.recorder = Recorder(scenario, self.policy)
        self.fleet = Fleet(
            scenario.node_types,
            scenario.models,
            upscaling_speed=scenario.upscaling_speed,
            schedule=self.schedule,
            on_removed=self._replica_removed,
        )
        outcomes = Outcomes(
            self._started, self._served, self._expired, self._failed, self.recorder.batch_ran
        )
        self.servers = {
            name: ModelServer(name, profile, self.schedule, outcomes)
            for name, profile in scenario.models.items()
        }
        self.controls = [
            ModelControl(name, profile.kind, profile.autoscaling)
            for name, profile in scenario.models.items()
        ]
        self.controller = Controller(self.controls, lambda: self.now)
        self.tier_by_name: dict[str, Tier] = {name: self.policy.tier(name) for name in trace.tiers}
        self._top_class = max(tier.priority_class for tier in self.tier_by_name.values())
        self.requests_in_flight = 0
        self._handlers: dict[str, Callable[[Any], None]] = {
            "retry": self._attempt,
            "abandon": self._abandon,
            "batch_done": lambda batch: self.servers[batch.replica.model].batch_done(
                batch, self.now
            ),
            "preempted": lambda batch: self.servers[batch.replica.model].preempted(batch, self.now),
            "dispatch": lambda server: server.woken(self.now),
            "requeue": lambda args: args[0].requeue(args[1], self.now, preempted=args[2]),
            "replica_ready": self._replica_ready,
            "replica_drained": lambda replica: self.fleet.remove_replica(replica, self.now),
            "node_up": lambda node: self.fleet.node_up(node, self.now),
            "control": self._control,
            "ray_autoscaler": self._ray_autoscaler,
            "sample": self._sample,
            "region_down": self._region_down,
            "region_up": self._region_up,
            "prune_ledgers": self._prune_ledgers,
        }

    def schedule(self, at: float, event: str, payload: object) -> None:
        heapq.heappush(self._calendar, (at, next(self._seq), event, payload))

    # The run.
    def run(self, progress: Callable[[float, float], None] | None = None) -> dict[str, Any]:
        """Simulate the whole scenario; ``progress(simulated_s, wall_s)`` is called each
        simulated hour."""
        started = time.perf_counter()
        next_report = HOUR_S
        end = self.scenario.duration_s
        for control in self.controls:
            self.fleet.set_target(control.model, control.target, 0.0)
        for replica in self.fleet.warm_start(0.0):
            self.servers[replica.model].replica_running(replica, 0.0)
        self.schedule(0.0, "control", None)
        self.schedule(0.0, "ray_autoscaler", None)
        self.schedule(0.0, "sample", None)
        first_prune_s = (
            quota.seconds_to_next_day(0.0, self.policy.zone) % 86_400 + LEDGER_PRUNE_AFTER_S
        )
        self.schedule(first_prune_s, "prune_ledgers", None)
        if (failure := self.scenario.region_failure) is not None:
            self.schedule(failure.at_h * HOUR_S, "region_down", None)
        times, accounts = self.trace.time_s.tolist(), self.trace.account.tolist()
        kinds, sizes = self.trace.kind.tolist(), self.trace.size.tolist()
        account_tier = self.trace.account_tier.tolist()
        tiers = self.trace.tiers
        calendar, handlers = self._calendar, self._handlers
        next_row, rows = 0, len(times)
        with simulated_time(lambda: self.now), _few_collections():
            while True:
                arrival = times[next_row] if next_row < rows else math.inf
                at = calendar[0][0] if calendar else math.inf
                if min(arrival, at) >= end:
                    break
                if progress is not None and min(arrival, at) >= next_report:
                    progress(next_report, time.perf_counter() - started)
                    next_report += HOUR_S
                if arrival <= at:
                    self.now = arrival
                    account = accounts[next_row]
                    request = Request(
                        next_row,
                        account,
                        tiers[account_tier[account]],
                        KINDS[kinds[next_row]],
                        sizes[next_row],
                        arrival,
                    )
                    next_row += 1
                    self.recorder.arrived(request)
                    self.requests_in_flight += 1
                    self._attempt(request)
                else:
                    at, _, event, payload = heapq.heappop(calendar)
                    self.now = at
                    handlers[event](payload)
        self.now = end
        wall_s = time.perf_counter() - started
        return self.recorder.summary(
            self.fleet,
            self.servers,
            self.controls,
            self.requests_in_flight,
            wall_s=wall_s,
            requests=rows,
        )

    # A request's path.
    def _attempt(self, request: Request) -> None:
        now = self.now
        request.attempts += 1
        request.attempt_at = now
        tier = self.tier_by_name[request.tier]
        server = self.servers[self.scenario.model_for_kind[request.kind]]  # type: ignore[index]
        rid = f"{request.rid}.{request.attempts}"
        batch_key = ("video",) if request.kind == "video" else (request.kind, 1)
        job = SimJob(str(request.account), tier.priority_class, batch_key, request.size, request)
        try:
            self._check_tier(request, tier)
            # The router's order: caps, the early refusal from the scheduler's published
            # load (no quota write for what would be shed), the reservation, then the
            # scheduler's own admission. The load is published exactly here and the
            # reservation leaves the queue as it was: the scheduler's check would repeat
            # the early one's answer, so the queue takes that.
            estimated_wait_s = server.admission(job, now, tier.max_queue_wait_s, tier.max_queued)
            state = self.ledgers.get(request.account) or quota.LedgerState()
            units = 1 if request.kind == "video" else request.size
            kind: quota.Kind = "video" if request.kind == "video" else "image"
            self.ledgers[request.account] = quota.reserve(
                state, tier, kind=kind, units=units, rid=rid, now=now, zone=self.policy.zone
            )
            request.held = rid
            request.ticket = server.submit(job, now, tier.max_queue_wait_s, estimated_wait_s)
        except MediagateError as error:
            self._release(request)
            if isinstance(error, Overloaded) and tier.priority_class == self._top_class:
                self.recorder.violation_if_lower_running(server, tier.priority_class)
            self._refused(request, error)
            return
        clients = self.scenario.workload.client(request.tier)
        patience = clients.min_patience_s + self.rng.expovariate(1.0 / clients.patience_s)
        if patience < tier.max_queue_wait_s:
            self.schedule(now + patience, "abandon", request)

    def _check_tier(self, request: Request, tier: Tier) -> None:
        side = min(IMAGE_SIDE, tier.caps.max_side or IMAGE_SIDE)
        steps = min(IMAGE_STEPS, tier.caps.max_steps or IMAGE_STEPS)
        if request.kind == "video":
            age_s = self.now - float(self.trace.account_created_s[request.account])
            seconds = min(VIDEO_SECONDS, tier.caps.max_seconds or VIDEO_SECONDS)
            check_video_request(
                request.tier,
                tier,
                account_age_s=age_s,
                seconds=seconds,
                width=side,
                height=side,
                steps=steps,
            )
            return
        check_image_caps(request.tier, tier, n=request.size, width=side, height=side, steps=steps)
        if request.kind == "edit":
            check_edit_inputs(request.tier, tier, images=1)

    def _release(self, request: Request) -> None:
        """Give the reservation back: the request was not served."""
        if request.held is None:
            return
        state = self.ledgers[request.account]
        self.ledgers[request.account], _ = quota.finish(state, request.held, commit=False)
        request.held = None

    def _refused(self, request: Request, error: MediagateError) -> None:
        reason = error.code or type(error).__name__
        self.recorder.refused(request, reason, self.now)
        clients = self.scenario.workload.client(request.tier)
        retryable = error.status == 503 or (error.status == 429 and error.should_retry is not False)
        wait_s = error.retry_after_s if error.retry_after_s is not None else clients.backoff_s
        if self.rng.random() >= clients.honours_retry_after:
            wait_s = clients.backoff_s * 2 ** (request.attempts - 1)
        if (
            retryable
            and request.attempts <= clients.max_retries
            and wait_s <= clients.max_retry_wait_s
            and self.rng.random() < clients.retry_probability
        ):
            self.schedule(self.now + wait_s, "retry", request)
            return
        self._finish(request, reason)

    def _finish(self, request: Request, outcome: str) -> None:
        request.outcome = outcome
        request.ticket = None
        self.requests_in_flight -= 1
        self.recorder.finished(request, outcome, self.now)

    def _abandon(self, request: Request) -> None:
        ticket = request.ticket
        if request.outcome is not None or ticket is None or ticket.answered:
            return
        if self.servers[self.scenario.model_for_kind[request.kind]].withdraw(ticket):  # type: ignore[index]
            self._release(request)
            self._finish(request, "abandoned")

    # What the schedulers report.
    def _started(self, ticket: Ticket[SimJob], now: float) -> None:
        assert isinstance(ticket.future, Answer)
        ticket.future.settled = True  # out of the queue: no deadline, no abandoning
        if not (ticket.preemptions or ticket.workers_lost):
            self.recorder.started(ticket.job.request, now - ticket.enqueued_at, now)

    def _served(self, ticket: Ticket[SimJob], now: float) -> None:
        request: Request = ticket.job.request
        if request.held is not None:
            state = self.ledgers[request.account]
            day = state.reservations[request.held].day
            self.ledgers[request.account], _ = quota.finish(state, request.held, commit=True)
            request.held = None
            self.recorder.served_images(request, day)
        self._finish(request, "served")

    def _expired(self, ticket: Ticket[SimJob], now: float) -> None:
        request: Request = ticket.job.request
        self._release(request)
        if ticket.job.priority_class == self._top_class:
            self.recorder.violation_if_lower_running(
                self.servers[self.scenario.model_for_kind[request.kind]],  # type: ignore[index]
                ticket.job.priority_class,
            )
        waited = now - ticket.enqueued_at
        self._refused(
            request,
            Overloaded(
                "waited longer than the tier allows", code="expired", retry_after_s=max(1.0, waited)
            ),
        )

    def _failed(self, ticket: Ticket[SimJob], now: float) -> None:
        request: Request = ticket.job.request
        self._release(request)
        self._refused(
            request,
            ModelUnavailable("the worker running it stopped twice", retry_after_s=2),
        )

    # The fleet.
    def _replica_ready(self, replica: Replica) -> None:
        if self.fleet.replica_ready(replica):
            self.servers[replica.model].replica_running(replica, self.now)

    def _replica_removed(self, replica: Replica, was: ReplicaState) -> None:
        if was == "running":
            self.servers[replica.model].replica_removed(replica)

    def _control(self, _: object) -> None:
        now = self.now
        for control in self.controls:
            control.record(now, self.servers[control.model].autoscaling_metrics)
        targets = self.controller.decide(
            running=lambda model: len(self.fleet.running[model]),
            ongoing=lambda model: self.servers[model].running_requests,
        )
        for control in self.controls:
            for replica in self.fleet.set_target(control.model, targets[control.model], now):
                self.servers[control.model].replica_stopping(replica)
            self.recorder.check_replicas(self.fleet, control)
        self.schedule(now + self.scenario.control_interval_s, "control", None)

    def _ray_autoscaler(self, _: object) -> None:
        self.fleet.autoscale_nodes(self.now)
        self.schedule(self.now + self.scenario.ray_autoscaler_interval_s, "ray_autoscaler", None)

    def _sample(self, _: object) -> None:
        self.recorder.sample(self.now, self.fleet, self.servers, self.controls)
        self.schedule(self.now + self.scenario.sample_interval_s, "sample", None)

    def _prune_ledgers(self, _: object) -> None:
        """At midday of each quota day, drop the ledgers of accounts that reserved
        nothing since midnight and hold nothing: ``reserve`` would decide on them as on
        a fresh one (their day rolled over, and every window of the shipped tiers, at
        most minutes long, has long passed). The store would keep them; the simulator
        need not hold millions."""
        today = quota.quota_day(self.now, self.policy.zone)
        idle = [
            account
            for account, state in self.ledgers.items()
            if state.day != today and not state.reservations and state.cooldown_until <= self.now
        ]
        for account in idle:
            del self.ledgers[account]
        next_day_s = quota.seconds_to_next_day(self.now, self.policy.zone)
        self.schedule(self.now + next_day_s + LEDGER_PRUNE_AFTER_S, "prune_ledgers", None)

    def _region_down(self, _: object) -> None:
        failure = self.scenario.region_failure
        assert failure is not None
        for type_name in self.scenario.node_types:
            nodes = self.fleet.nodes_of(type_name)
            lost = self.rng.sample(nodes, int(len(nodes) * failure.fleet_share))
            for node in lost:
                for replica, was in self.fleet.end_node(node, self.now):
                    self.servers[replica.model].replica_lost(
                        replica, self.now, was_running=was == "running"
                    )
            cap = self.scenario.node_types[type_name].max_nodes
            self.fleet.max_nodes[type_name] = int(cap * (1 - failure.fleet_share))
        self.schedule(self.now + failure.duration_h * HOUR_S, "region_up", None)

    def _region_up(self, _: object) -> None:
        for type_name, spec in self.scenario.node_types.items():
            self.fleet.max_nodes[type_name] = spec.max_nodes


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """Python's cyclic collector, rarely: with millions of live objects (the trace, the
    ledgers, the queues) its default thresholds spent a quarter of a run rescanning them
    (35 of 128 s over 43 simulated hours; 2 s frozen and rarer). The objects made before
    the run (the trace) are frozen out of its scans."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
