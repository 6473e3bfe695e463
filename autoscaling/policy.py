"""Application-level Ray Serve autoscaling policy: worker replicas follow the queue.

Each model has a scheduler (``Scheduler-<model>``) that holds its queue and a worker
deployment (``TextToImage-<model>`` / ``TextToVideo-<model>``) that runs the work.
Serve cannot see a queue that our code holds, so the scheduler reports it through
``record_autoscaling_stats``: per priority class the requests waiting
(``queue_len_class_<c>``), the requests running (``inflight_requests``), and the
three parts of its demand weighed by class: waiting (``weighted_queue_len``),
running (``weighted_inflight_requests``) and turned away at admission
(``weighted_turned_away``: the requests that would run at once had the refused ones
been served, over the last minute; ``deployments/scheduler/turned_away.py``). Each
class's weight is a setting of the scheduler's ``user_config`` that an SRE changes
live (the weights stay in the scheduler, they are not metrics). This policy sizes
each worker:

    desired = ceil(weighted (queued + running + turned away) / target)

where ``target`` is the worker's ``autoscaling_config.target_ongoing_requests``
(requests per replica), bounded by its ``min_replicas`` / ``max_replicas``. Paid
work counts fully; free work can count less, and then a free flood buys GPUs for
that share of itself. Every part must be weighed for that to hold: weighing only
the queue made the weight a cliff (refused demand bought nothing, and admitted free
work, counted fully while running, bought the rest: docs/SCALE.md). Weighed running
work can ask for fewer replicas than are busy; Serve drains the replicas it removes
(no new work, running work finishes, up to the model's ``drain_s``:
``autoscaling.naming.worker_drain_s``).

A downscale is stabilized (``stabilized``): while the demand asks for fewer replicas
than the target, the policy asks for the most it has asked since it began to, so that
Serve, which shrinks to the last ask after ``downscale_delay_s``, shrinks to what the
whole delay needed and not to a trough of a noisy demand.

The function is pure: it reads only the contexts (no I/O, no clock of its own) and
runs in the Serve controller about ten times a second. Serve wraps it: the
``upscale_delay_s`` / ``downscale_delay_s`` / ``downscale_to_zero_delay_s`` of each
worker's ``autoscaling_config``, its scaling factors and the cold-start path
(0 -> 1 at once when work waits) apply to what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoscaling.naming import scheduler_name, worker_model

QUEUE_PREFIX = "queue_len_class_"
WEIGHTED_QUEUE = "weighted_queue_len"
WEIGHTED_INFLIGHT = "weighted_inflight_requests"
TURNED_AWAY_PREFIX = "turned_away_class_"
WEIGHTED_TURNED_AWAY = "weighted_turned_away"
RETIRED = "retired"  # reported by a scheduler whose model version leaves service


@dataclass(frozen=True)
class QueueReport:
    """What one model's scheduler reported (summed over its replicas)."""

    queued_by_class: dict[int, float]
    inflight: float
    weighted_queued: float
    retired: bool = False
    weighted_turned_away: float = 0.0
    weighted_inflight: float | None = None  # None: a scheduler that weighed no running work

    @property
    def demand(self) -> float:
        """Weighted waiting, running and refused work, in requests."""
        running = self.inflight if self.weighted_inflight is None else self.weighted_inflight
        return self.weighted_queued + running + self.weighted_turned_away


DEFAULT_QUEUE_WEIGHTS = {0: 0.5}  # class 0 (free by default) counts half; others fully


def queue_weights_from_config(config: Mapping[Any, Any] | None) -> dict[int, float]:
    """A scheduler's ``queue_weights`` user_config ({class: weight}, keys may be strings)."""
    if config is None:
        return dict(DEFAULT_QUEUE_WEIGHTS)
    weights = {int(cls): float(weight) for cls, weight in config.items()}
    if any(not 0.0 <= weight <= 10.0 for weight in weights.values()):
        raise ValueError("queue_weights must be between 0 and 10")
    return weights


def weighted_queue_len(queued_by_class: Mapping[int, float], weights: Mapping[int, float]) -> float:
    """Waiting (or turned-away) work as the autoscaler counts it: each class's amount
    times its weight (1 for a class without one)."""
    return float(sum(weights.get(cls, 1.0) * queued for cls, queued in queued_by_class.items()))


def retired_metric(retired: str | None) -> dict[str, float]:
    """What a retired scheduler adds to its report (``scale_workers`` then keeps its
    workers until it holds nothing, and then takes them all away)."""
    return {RETIRED: 1.0} if retired is not None else {}


def report_metrics(
    queued_by_class: Mapping[int, int],
    inflight_requests: int,
    weights: Mapping[int, float],
    classes_seen: set[int],
    running_by_class: Mapping[int, int] | None = None,
    turned_away_by_class: Mapping[int, float] | None = None,
) -> dict[str, float]:
    """What a scheduler returns from ``record_autoscaling_stats`` (read by ``read_report``).
    Every class seen so far is reported, at 0 when empty, so that an emptied queue reads
    as empty rather than as missing. ``running_by_class``: the ``inflight_requests`` by
    class (without it they count fully); ``turned_away_by_class``: the requests refused
    at admission would run this many at once (``TurnedAwayDemand``)."""
    turned_away = turned_away_by_class or {}
    metrics = {
        "queue_len": float(sum(queued_by_class.values())),
        "inflight_requests": float(inflight_requests),
        WEIGHTED_QUEUE: weighted_queue_len(queued_by_class, weights),
        WEIGHTED_TURNED_AWAY: weighted_queue_len(turned_away, weights),
    }
    if running_by_class is not None:
        metrics[WEIGHTED_INFLIGHT] = weighted_queue_len(running_by_class, weights)
    for cls in classes_seen | set(queued_by_class):
        metrics[f"{QUEUE_PREFIX}{cls}"] = float(queued_by_class.get(cls, 0))
    for cls in classes_seen | set(turned_away):
        metrics[f"{TURNED_AWAY_PREFIX}{cls}"] = float(turned_away.get(cls, 0.0))
    return metrics


def read_report(metrics: Mapping[str, Mapping[Any, float]] | None) -> QueueReport | None:
    """The scheduler's report from ``ctx.aggregated_metrics`` (name -> replica -> value);
    None when nothing has arrived yet (a scheduler that just started or died)."""
    if not metrics or not any(metrics.values()):
        return None

    def total(name: str) -> float:
        return float(sum((metrics.get(name) or {}).values()))

    def per_class(prefix: str) -> dict[int, float]:
        return {
            int(name.removeprefix(prefix)): total(name)
            for name in metrics
            if name.startswith(prefix) and name.removeprefix(prefix).lstrip("-").isdigit()
        }

    queued_by_class = per_class(QUEUE_PREFIX)
    weighted = (
        total(WEIGHTED_QUEUE) if WEIGHTED_QUEUE in metrics else sum(queued_by_class.values())
    )  # a scheduler of an older version reported no weighted length: count it all
    return QueueReport(
        queued_by_class=queued_by_class,
        inflight=total("inflight_requests"),
        weighted_queued=max(0.0, weighted),
        retired=total(RETIRED) > 0,
        weighted_turned_away=max(0.0, total(WEIGHTED_TURNED_AWAY)),  # (0 from older ones)
        weighted_inflight=max(0.0, total(WEIGHTED_INFLIGHT))
        if WEIGHTED_INFLIGHT in metrics
        else None,
    )


def desired_replicas(demand: float, *, target: float, min_replicas: int, max_replicas: int) -> int:
    """ceil(demand / target) within [min_replicas, max_replicas]."""
    wanted = math.ceil(demand / target - 1e-9) if demand > 0 else 0
    return max(min_replicas, min(max_replicas, wanted))


SHRINK = "shrink"  # policy state: [the target it began below, the most asked since]


def stabilized(
    desired: int, current_target: int, state: Mapping[str, Any]
) -> tuple[int, list[int] | None]:
    """What to ask Serve for, and the state to carry: while ``desired`` stays below the
    current target, the most it has been since it went below. Serve shrinks a deployment
    once the ask has stayed below its target for ``downscale_delay_s``, to the last ask;
    a noisy demand made that last ask a trough, and the replicas removed there were
    started again seconds later (on new nodes, the removed ones being busy to the end
    of their batches). Asking for the highest value of the streak shrinks to what the
    whole delay needed, as Kubernetes' scale-down stabilization window does, with the
    same timing: the ask is below the target exactly when ``desired`` is. A new target
    (Serve shrank, or an operator moved it) starts a new streak."""
    if desired >= current_target:
        return desired, None
    streak = state.get(SHRINK)  # [the target it began below, the most asked since]
    if streak is None or streak[0] != current_target:
        return desired, [current_target, desired]
    highest = max(streak[1], desired)
    return highest, [current_target, highest]


def scale_workers(contexts: Mapping[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
    """Serve's application-level policy entry point: ``{DeploymentID: AutoscalingContext}``
    in, ``({DeploymentID: replicas}, {DeploymentID: policy_state})`` out. Deployments
    other than workers (routers, schedulers) are left out, so Serve leaves them be."""
    by_name = {deployment_id.name: (deployment_id, ctx) for deployment_id, ctx in contexts.items()}
    decisions: dict[Any, int] = {}
    states: dict[Any, dict[str, Any]] = {}
    for name, (deployment_id, ctx) in by_name.items():
        model = worker_model(name)
        scheduler = by_name.get(scheduler_name(model)) if model else None
        if scheduler is None:
            continue
        report = read_report(scheduler[1].aggregated_metrics)
        if report is None:  # no news from the scheduler: keep what was decided
            decisions[deployment_id] = ctx.target_num_replicas
            continue
        desired = desired_replicas(
            report.demand,
            target=float(ctx.config.target_ongoing_requests or 1.0),
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        desired, shrink = stabilized(desired, ctx.target_num_replicas, ctx.policy_state)
        if report.retired and report.demand > 0:
            # A version leaving service never shrinks while it holds work: Serve would
            # stop any replica, busy or not. Once it holds nothing, it goes to zero.
            desired = max(desired, ctx.target_num_replicas)
        decisions[deployment_id] = desired
        states[deployment_id] = {"demand": round(report.demand, 3), SHRINK: shrink}
    return decisions, states
