"""What a simulated run measured, per tier and hour, and the figures an SRE asks for:
waits and success rates through the spike, refusals by reason, GPUs provisioned
against busy, GPU-hours against a perfect-foresight oracle, scale-up lag and cost;
and the run's invariants (conservation of requests, quota, replica limits, no top-tier
request shed while lower work runs).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from mediagate.access.tiers import TierPolicy
from simulation.scenario import HOUR_S, Scenario

if TYPE_CHECKING:
    from simulation.control import ModelControl
    from simulation.fleet import Fleet
    from simulation.requests import Request
    from simulation.serving import ModelServer, SimBatch

MINUTE_S = 60.0
SERVED = "served"
# Outcomes the service is answerable for (the rest are the tier's rules working).
SERVICE_OUTCOMES = (SERVED, "server_overloaded", "expired", "model_unavailable", "abandoned")
LAG_TOLERANCE = 0.95  # ready replicas "match" the policy's target at 95% of it
# Both curves are averaged over this many samples first: a video model's target jumps
# for a few seconds with each burst of jobs, which no replica can follow.
LAG_SMOOTHING_SAMPLES = 10
# A lag needs a rise to lag behind: a model whose smoothed target at its spike peak is
# less than this many times its level at the spike's start saw only its own noise (a
# video model the free tier cannot use), and its lag is not measured (``None``).
LAG_MIN_RISE = 3.0
LAG_LEVELS = 50  # levels of the rise at which the fleet's lag is measured


def percentile(values: Any, q: float) -> float:
    """Nearest-rank percentile, as the benchmarks report them."""
    if not len(values):
        return math.nan
    ordered = np.sort(np.frombuffer(values, dtype=float) if isinstance(values, array) else values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


class Recorder:
    """Counts as the run goes; ``summary`` turns them into the report."""

    def __init__(self, scenario: Scenario, policy: TierPolicy) -> None:
        self.scenario = scenario
        self.policy = policy
        minutes = math.ceil(scenario.duration_s / MINUTE_S) + 1
        self.waits: dict[tuple[int, str, str], array[float]] = defaultdict(lambda: array("d"))
        self.finals: Counter[tuple[int, str, str]] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self.arrivals: Counter[tuple[int, str]] = Counter()
        self.attempts = 0
        self.busy_gpu_s = {name: np.zeros(minutes) for name in scenario.node_types}
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.violations: Counter[str] = Counter()
        # Images served today per account of a tier with a daily quota, counted apart
        # from the ledger, to check it.
        self.images_today: Counter[int] = Counter()
        self._counting_day = ""
        self.preemptions = 0

    # Requests.
    def arrived(self, request: Request) -> None:
        self.arrivals[int(request.first_at // HOUR_S), request.tier] += 1

    def refused(self, request: Request, reason: str, now: float) -> None:
        self.attempts += 1
        self.refusals[request.tier, reason] += 1

    def started(self, request: Request, waited_s: float, now: float) -> None:
        self.attempts += 1
        model = self.scenario.model_for_kind[request.kind]  # type: ignore[index]
        self.waits[int(now // HOUR_S), request.tier, model].append(waited_s)

    def finished(self, request: Request, outcome: str, now: float) -> None:
        self.finals[int(now // HOUR_S), request.tier, outcome] += 1

    def served_images(self, request: Request, day: str) -> None:
        """Images served from reservations of ``day``: never more than the tier's daily
        quota for one account (counted apart from the ledger, to check it)."""
        limit = self.policy.tier(request.tier).images_per_day
        if request.kind == "video" or limit is None or day < self._counting_day:
            return
        if day != self._counting_day:  # only the current day's counts are kept
            self._counting_day = day
            self.images_today.clear()
        self.images_today[request.account] += request.size
        if self.images_today[request.account] > limit:
            self.violations["images_over_daily_quota"] += 1

    def batch_ran(self, server: ModelServer, batch: SimBatch, now: float) -> None:
        """A completed batch's GPU time, spread over the minutes it ran (the oracle's need)."""
        gpus = server.profile.gpus_per_replica / server.slots_per_replica
        bins = self.busy_gpu_s[server.profile.node_type]
        start, left = batch.started_at, now - batch.started_at
        while left > 1e-9:
            minute = int(start // MINUTE_S)
            chunk = min(left, (minute + 1) * MINUTE_S - start)
            bins[minute] += chunk * gpus
            start += chunk
            left -= chunk

    # Invariants.
    def violation_if_lower_running(self, server: ModelServer, priority_class: int) -> None:
        """A top-class request shed or expired while a lower class's batch runs (by model:
        a video model preempts nothing, so there a running plus job keeps its slot)."""
        if any(
            b.priority_class < priority_class and not b.stopping for b in server.batches.values()
        ):
            self.violations[f"top_class_shed_while_lower_runs:{server.name}"] += 1

    def check_replicas(self, fleet: Fleet, control: ModelControl) -> None:
        config = control.config
        if not config.min_replicas <= fleet.live_count(control.model) <= config.max_replicas:
            self.violations["replicas_outside_limits"] += 1
        for type_name, spec in self.scenario.node_types.items():
            if fleet.node_count(type_name) > max(fleet.max_nodes[type_name], spec.max_nodes):
                self.violations["nodes_over_cap"] += 1

    # The fleet over time.
    def sample(
        self,
        now: float,
        fleet: Fleet,
        servers: dict[str, ModelServer],
        controls: list[ModelControl],
    ) -> None:
        add = self.samples
        add["t_h"].append(now / HOUR_S)
        add["gpus_provisioned"].append(fleet.gpus())
        add["gpus_up"].append(fleet.gpus(up_only=True))
        for type_name, spec in self.scenario.node_types.items():
            add[f"{type_name}.gpus"].append(fleet.node_count(type_name) * spec.gpus)
        busy = 0.0
        for name, server in servers.items():
            gpus = server.profile.gpus_per_replica
            ready = len(fleet.running[name]) * gpus
            add[f"{name}.ready_gpus"].append(ready)
            add[f"{name}.busy_gpus"].append(server.busy_slots * gpus / server.slots_per_replica)
            add[f"{name}.pending"].append(len(fleet.pending[name]))
            for cls in sorted(server.classes_seen | {0}):
                add[f"{name}.queued.{cls}"].append(server.queue.queued(cls))
            busy += server.busy_slots * gpus / server.slots_per_replica
        add["gpus_busy"].append(busy)
        for control in controls:
            add[f"{control.model}.target"].append(control.target)

    # The report.
    def summary(
        self,
        fleet: Fleet,
        servers: dict[str, ModelServer],
        controls: list[ModelControl],
        in_flight: int,
        *,
        wall_s: float,
        requests: int,
    ) -> dict[str, Any]:
        scenario, duration = self.scenario, self.scenario.duration_s
        gpu_hours, cost = fleet.node_cost(duration)
        oracle = self.oracle_gpu_hours()
        finals: Counter[tuple[str, str]] = Counter()
        for (_, tier, outcome), count in self.finals.items():
            finals[tier, outcome] += count
        return {
            "scenario": scenario.name,
            "requests": requests,
            "attempts": self.attempts,
            "simulated_s": duration,
            "wall_s": round(wall_s, 2),
            "simulated_s_per_wall_s": round(duration / max(wall_s, 1e-9), 1),
            "requests_per_wall_s": round(requests / max(wall_s, 1e-9)),
            "peak_gpus": max(self.samples["gpus_provisioned"], default=0),
            "peak_gpus_by_type": {
                name: max(self.samples[f"{name}.gpus"], default=0) for name in scenario.node_types
            },
            "gpu_hours": round(gpu_hours, 1),
            "oracle_gpu_hours": round(oracle, 1),
            "gpu_hours_over_oracle": round(gpu_hours / oracle, 3) if oracle else None,
            "cost": round(cost, 2),
            "scale_up_lag_s": self.scale_up_lag_s(servers, controls),
            "spike_demand_rise": self.demand_rise(controls),
            "tiers": self.tier_figures(finals),
            "outcomes": {t: dict(sorted(c for c in _of(finals, t))) for t in self._tiers()},
            "refusals": {t: dict(sorted(_of(self.refusals, t))) for t in self._tiers()},
            "preemptions": sum(s.preemptions for s in servers.values()),
            "conservation": {
                "arrived": sum(self.arrivals.values()),
                "finished": sum(finals.values()),
                "in_flight": in_flight,
                "holds": sum(self.arrivals.values()) == sum(finals.values()) + in_flight,
            },
            "violations": dict(self.violations),
        }

    def _tiers(self) -> list[str]:
        return sorted({tier for _, tier in self.arrivals})

    def tier_figures(self, finals: Counter[tuple[str, str]]) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        spike_hours = self.spike_hours()
        for tier in self._tiers():
            by_model: dict[str, Any] = {}
            for model, profile in self.scenario.models.items():
                hours = sorted({h for h, t, m in self.waits if t == tier and m == model})
                if not hours:
                    continue
                joined = np.concatenate([np.frombuffer(self.waits[h, tier, model]) for h in hours])
                hourly = {h: percentile(self.waits[h, tier, model], 0.99) for h in hours}
                worst = max(hourly, key=lambda h: hourly[h])
                by_model[model] = {
                    "p50_wait_s": round(percentile(joined, 0.5), 3),
                    "p99_wait_s": round(percentile(joined, 0.99), 3),
                    "worst_hour_p99_wait_s": round(hourly[worst], 3),
                    "worst_hour": worst,
                    "service_s": profile.service.of(profile.max_batch_size),
                }
            hourly_outcomes: dict[int, Counter[str]] = defaultdict(Counter)
            for (hour, of_tier, outcome), count in self.finals.items():
                if of_tier == tier:
                    hourly_outcomes[hour][outcome] += count
            spike: Counter[str] = Counter()
            for hour in spike_hours:
                spike.update(hourly_outcomes.get(hour, Counter()))
            hourly_rates = [r for c in hourly_outcomes.values() if (r := _rate(c)) is not None]
            figures[tier] = {
                "wait": by_model,
                "success_rate": _rate(Counter({o: n for (t, o), n in finals.items() if t == tier})),
                "spike_success_rate": _rate(spike),
                "worst_hour_success_rate": min(hourly_rates, default=None),
            }
        return figures

    def spike_hours(self) -> range:
        spike = self.scenario.workload.spike
        if spike is None:
            return range(0)
        start = int(spike.start_h)
        return range(start, int(spike.start_h + spike.ramp_h + 2 * spike.decay_h) + 1)

    def oracle_gpu_hours(self) -> float:
        """GPU-hours of a fleet that had, each minute, just the nodes the finished work
        kept busy that minute (whole nodes of each type, no boot, no idle)."""
        total = 0.0
        for type_name, busy in self.busy_gpu_s.items():
            per_node = self.scenario.node_types[type_name].gpus
            nodes = np.ceil(busy / MINUTE_S / per_node - 1e-9)
            total += float(nodes.sum()) * per_node * MINUTE_S / HOUR_S
        return total

    def scale_up_lag_s(
        self, servers: dict[str, ModelServer], controls: list[ModelControl]
    ) -> dict[str, float | None]:
        """Per model, how long after the demand reached a level the fleet did, through
        the spike's rise: for each of ``LAG_LEVELS`` levels between the policy's target
        at the spike's start and its highest (within the replicas the fleet cap allows),
        the time from the target's first reaching it to the ready replicas' first
        reaching 95% of it (rounded down: 9 of 10), both averaged over ten samples; the
        lag is the longest. First crossings: a fleet that follows a noisy target a few
        percent below it, later, is not late. It is the path from a decision to a
        replica serving: Serve's delays, Ray's node launch and boot, the model's load.
        ``None`` for a model whose demand did not rise ``LAG_MIN_RISE`` times
        (``demand_rise``), or whose ready replicas never reached a level in the window."""
        window = self._spike_window()
        if window is None:
            return {}
        first, last = window
        step_s = self.scenario.sample_interval_s
        rises = self.demand_rise(controls)
        lags: dict[str, float | None] = {}
        for control in controls:
            lags[control.model] = None
            if (rises.get(control.model) or 0.0) < LAG_MIN_RISE:
                continue
            profile = servers[control.model].profile
            node_type = self.scenario.node_types[profile.node_type]
            cap = node_type.max_nodes * node_type.gpus // profile.gpus_per_replica
            ready = _smoothed(
                np.array(self.samples[f"{control.model}.ready_gpus"]) / profile.gpus_per_replica
            )[first:last]
            target = _smoothed(np.minimum(np.array(self.samples[f"{control.model}.target"]), cap))[
                first:last
            ]
            crossings = []
            for level in np.linspace(target[0], target.max(), LAG_LEVELS + 1)[1:]:
                reached = np.flatnonzero(ready >= np.floor(LAG_TOLERANCE * level))
                if not len(reached):
                    break
                asked = int(np.argmax(target >= level))
                crossings.append(max(0, int(reached[0]) - asked))
            else:
                lags[control.model] = max(crossings, default=0) * step_s
        return lags

    def _spike_window(self) -> tuple[int, int] | None:
        """Sample indexes from the spike's start to an hour past its peak (later, the
        fleet follows a falling target within its noise: not a scale-up)."""
        spike = self.scenario.workload.spike
        t_h = np.array(self.samples["t_h"])
        if spike is None or not len(t_h):
            return None
        first = int(np.searchsorted(t_h, spike.start_h))
        last = int(np.searchsorted(t_h, spike.start_h + spike.ramp_h + 1))
        return (first, last) if last > first else None

    def demand_rise(self, controls: list[ModelControl]) -> dict[str, float]:
        """Per model, the policy's smoothed target at its highest in the spike window
        over its level at the spike's start."""
        window = self._spike_window()
        if window is None:
            return {}
        first, last = window
        rises = {}
        for control in controls:
            target = _smoothed(np.array(self.samples[f"{control.model}.target"], dtype=float))
            rises[control.model] = round(float(target[first:last].max() / target[first]), 2)
        return rises


def _rate(outcomes: Counter[str]) -> float | None:
    """Served over the outcomes the service is answerable for."""
    total = sum(outcomes[outcome] for outcome in SERVICE_OUTCOMES)
    return round(outcomes[SERVED] / total, 5) if total else None


def _smoothed(values: np.ndarray) -> np.ndarray:
    """The trailing mean over ``LAG_SMOOTHING_SAMPLES`` samples (fewer at the start)."""
    sums = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - LAG_SMOOTHING_SAMPLES)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _of(counts: Counter[tuple[str, str]], tier: str) -> list[tuple[str, int]]:
    return [(key, n) for (t, key), n in counts.items() if t == tier]
