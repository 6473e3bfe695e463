"""The queue-length autoscaling policy, driven with constructed Serve contexts.

``scale_workers`` alone is checked for its arithmetic (weights, target, bounds,
missing reports); scripted queue histories then run it inside Ray Serve's own
wrapper for application-level policies (the code the controller runs), with a fake
clock, for what the delays and the cold-start path add: scale-up after the
upscale delay, hold, scale-down after the downscale delay, to zero and back.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.naming import DEFAULT_DRAIN_S_BY_TASK, worker_drain_s
from autoscaling.policy import (
    desired_replicas,
    queue_weights_from_config,
    read_report,
    report_metrics,
    scale_workers,
)
from mediagate.protocol.catalog import Scaling

APP = "mediagate"
WORKER = DeploymentID(name="TextToImage-sim", app_name=APP)
SCHEDULER = DeploymentID(name="Scheduler-sim", app_name=APP)
ROUTER = DeploymentID(name="Router", app_name=APP)


def context(
    deployment_id: DeploymentID,
    *,
    replicas: int,
    metrics: dict[str, float] | None = None,
    policy_state: dict[str, Any] | None = None,
    total_requests: float = 0.0,
    now: float = 0.0,
    **config: Any,
) -> AutoscalingContext:
    """An AutoscalingContext like the controller builds, for one deployment."""
    settings = AutoscalingConfig(**({"min_replicas": 1, "max_replicas": 8} | config))
    replica_ids = [ReplicaID(f"{deployment_id.name}-{i}", deployment_id) for i in range(replicas)]
    reporter = ReplicaID("only", deployment_id)
    return AutoscalingContext(
        deployment_id=deployment_id,
        deployment_name=deployment_id.name,
        app_name=APP,
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=replica_ids,
        total_num_requests=total_requests,
        total_queued_requests=0.0,
        aggregated_metrics={name: {reporter: value} for name, value in (metrics or {}).items()},
        raw_metrics={},
        capacity_adjusted_min_replicas=settings.min_replicas,
        capacity_adjusted_max_replicas=settings.max_replicas,
        policy_state=policy_state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=settings,
    )


def queue(
    free: int = 0, pro: int = 0, inflight: int = 0, free_weight: float = 0.5
) -> dict[str, float]:
    return report_metrics({0: free, 2: pro}, inflight, {0: free_weight}, {0, 2})


def decide(worker_replicas: int, metrics: dict[str, float] | None, **config: Any) -> int:
    contexts = {
        WORKER: context(WORKER, replicas=worker_replicas, target_ongoing_requests=2, **config),
        SCHEDULER: context(SCHEDULER, replicas=1, metrics=metrics, max_replicas=1),
        ROUTER: context(ROUTER, replicas=1),
    }
    decisions, _ = scale_workers(contexts)
    assert set(decisions) == {WORKER}  # routers and schedulers are left to Serve
    return decisions[WORKER]


def test_desired_replicas_is_weighted_demand_over_target_within_bounds() -> None:
    assert decide(1, queue(pro=6, inflight=2)) == 4  # (6 + 2) / 2
    assert decide(1, queue(free=8, inflight=0)) == 2  # free counts half: 8 x 0.5 / 2
    assert decide(1, queue(free=8, free_weight=0.0, inflight=1)) == 1
    assert decide(1, queue(free=8, free_weight=1.0)) == 4
    assert decide(3, queue(pro=100)) == 8  # max_replicas
    assert decide(3, queue()) == 1  # min_replicas
    assert decide(3, queue(), min_replicas=0) == 0
    assert decide(2, None) == 2  # no report yet: hold
    assert desired_replicas(4.0, target=2, min_replicas=0, max_replicas=10) == 2
    assert desired_replicas(4.01, target=2, min_replicas=0, max_replicas=10) == 3


def test_demand_turned_away_at_admission_buys_replicas_by_its_weight() -> None:
    """A flood refused at admission never reaches the queue; its slot time, weighed like
    the queue, is demand all the same."""
    refused = {0: 20.0, 1: 3.0}  # requests that would run at once: free and plus
    metrics = report_metrics({}, 2, {0: 0.5}, {0, 1}, {1: 2}, refused)
    assert metrics["weighted_turned_away"] == 20.0 * 0.5 + 3.0
    assert (metrics["turned_away_class_0"], metrics["turned_away_class_1"]) == (20.0, 3.0)
    assert decide(1, metrics) == 8  # (2 running + 13 weighed) / 2, rounded up
    none_refused = report_metrics({}, 2, {0: 0.5}, {0, 1}, {1: 2})
    assert decide(1, none_refused) == 1
    zero_weight = report_metrics({}, 2, {0: 0.0}, {0, 1}, {1: 2}, {0: 20.0})
    assert decide(1, zero_weight) == 1  # a weight of 0: free buys nothing, refused or queued


def test_running_work_is_weighed_as_its_class_so_a_weight_is_a_share() -> None:
    """Free work counted fully once running bought a free flood the whole fleet once any
    of it was admitted; weighed like its queue, free demand buys its weight's share:
    in equilibrium free runs on w x its demand, and w x (that + the rest refused) is
    again w x its demand."""
    free_demand, weight = 40.0, 0.25  # free requests that would run at once
    running = int(weight * free_demand)  # what the fleet sized for it runs
    metrics = report_metrics(
        {}, running, {0: weight}, {0}, {0: running}, {0: free_demand - running}
    )
    assert metrics["weighted_inflight_requests"] == weight * running
    report = read_report({name: {"only": value} for name, value in metrics.items()})
    assert report is not None and report.demand == pytest.approx(weight * free_demand)
    paid = report_metrics({}, 6, {0: weight}, {0, 2}, {0: 4, 2: 2})
    assert paid["weighted_inflight_requests"] == 0.25 * 4 + 2
    unweighed = {name: {"only": value} for name, value in paid.items()}
    del unweighed["weighted_inflight_requests"]  # a scheduler from before: counts all of it
    assert (report := read_report(unweighed)) is not None and report.demand == 6.0


def test_a_worker_the_policy_removes_drains_what_it_runs(tmp_path: Path) -> None:
    """Weighed running work can ask for fewer replicas than are busy: a replica Serve
    stops then takes no new work and finishes its runs (the worker's graceful stop is
    the model's drain_s, not Serve's 20 s, which a video run outlasts)."""
    from deployments.model_app import build_model_app

    def worker_config(model: str) -> Any:
        scheduler = build_model_app({"home": str(tmp_path), "model": model})._bound_deployment
        return scheduler.init_args[0]._bound_deployment._deployment_config

    images, videos = worker_config("tiny-sd"), worker_config("tiny-wan")
    assert images.graceful_shutdown_timeout_s == DEFAULT_DRAIN_S_BY_TASK["text-to-image"]
    assert videos.graceful_shutdown_timeout_s == 120  # the catalog's drain_s for it
    assert videos.graceful_shutdown_wait_loop_s == 1
    assert worker_drain_s(Scaling(), "text-to-video") == 1800
    assert worker_drain_s(Scaling(drain_s=5), "text-to-image") == 5


def test_reports_and_weights_are_plain_numbers() -> None:
    metrics = report_metrics({2: 3}, 1, {0: 0.25}, {0, 2}, {2: 1})
    assert metrics == {
        "queue_len": 3.0,
        "inflight_requests": 1.0,
        "weighted_inflight_requests": 1.0,
        "weighted_queue_len": 3.0,  # only class 0 is weighed, and it is empty
        "queue_len_class_0": 0.0,  # an emptied class reads as 0, not as missing
        "queue_len_class_2": 3.0,
        "weighted_turned_away": 0.0,
        "turned_away_class_0": 0.0,
        "turned_away_class_2": 0.0,
    }
    reporter = ReplicaID("only", SCHEDULER)
    report = read_report({name: {reporter: value} for name, value in metrics.items()})
    assert report is not None and report.demand == 4.0
    assert read_report({}) is None
    assert not any("weight_" in name for name in metrics)  # settings are never metrics
    older = {name: {reporter: value} for name, value in metrics.items()}
    del older["weighted_queue_len"]  # a scheduler from before weights were applied there
    assert (report := read_report(older)) is not None and report.demand == 4.0
    other = ReplicaID("other", SCHEDULER)  # two scheduler replicas: their demands add up
    both = report_metrics({0: 4}, 0, {0: 0.5}, {0})
    report = read_report({name: {reporter: value, other: value} for name, value in both.items()})
    assert report is not None and report.demand == 4.0
    assert queue_weights_from_config({"0": "0.1"}) == {0: 0.1}
    del older["weighted_turned_away"]  # nor refused demand: it counts none
    assert (report := read_report(older)) is not None and report.demand == 4.0
    with pytest.raises(ValueError, match="between 0 and 10"):
        queue_weights_from_config({"0": -1})


class ControllerLoop:
    """Runs the policy the way the Serve controller does: inside Serve's wrapper, each
    tick feeding back the decision and the policy state, with a fake clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **worker_config: Any) -> None:
        self.now = 1_000.0
        fake_time = types.SimpleNamespace(time=lambda: self.now)
        monkeypatch.setattr("ray.serve.autoscaling_policy.time", fake_time)
        # Ray declares the policy's result as `dict[DeploymentID, int | float]`, and dict is
        # invariant, so a policy returning `dict[..., int]` (which Serve accepts) is refused.
        self.policy = _apply_app_level_autoscaling_config(scale_workers)  # type: ignore[arg-type]
        self.replicas = worker_config.pop("replicas", 1)
        self.config = {"target_ongoing_requests": 2} | worker_config
        self.states: dict[Any, dict[str, Any]] = {WORKER: {}, SCHEDULER: {}}

    def tick(self, metrics: dict[str, float], seconds: float = 0.1) -> int:
        self.now += seconds
        contexts = {
            WORKER: context(
                WORKER,
                replicas=self.replicas,
                policy_state=self.states[WORKER],
                now=self.now,
                **self.config,
            ),
            SCHEDULER: context(
                SCHEDULER,
                replicas=1,
                metrics=metrics,
                policy_state=self.states[SCHEDULER],
                now=self.now,
                max_replicas=1,
            ),
        }
        decisions, states = self.policy(contexts)
        self.states = {deployment: states.get(deployment, {}) for deployment in contexts}
        self.replicas = decisions[WORKER]
        return self.replicas

    def run(self, metrics: dict[str, float], seconds: float) -> Iterator[tuple[float, int]]:
        """Ticks for ``seconds``; yields (elapsed, replicas) after each."""
        start = self.now
        while self.now - start < seconds - 1e-9:
            replicas = self.tick(metrics)
            yield round(self.now - start, 3), replicas


def first_change(history: Iterator[tuple[float, int]], start: int) -> tuple[float, int]:
    for elapsed, replicas in history:
        if replicas != start:
            return elapsed, replicas
    raise AssertionError("no change")


def test_a_burst_scales_up_after_the_upscale_delay_then_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = ControllerLoop(monkeypatch, upscale_delay_s=1.0, downscale_delay_s=5.0)
    elapsed, replicas = first_change(loop.run(queue(pro=7, inflight=1), 3.0), 1)
    assert replicas == 4 and elapsed == pytest.approx(1.0, abs=0.11)
    # The same queue keeps the same size: no flapping.
    assert {replicas for _, replicas in loop.run(queue(pro=7, inflight=1), 10.0)} == {4}


def test_a_short_blip_does_not_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = ControllerLoop(monkeypatch, upscale_delay_s=1.0, downscale_delay_s=5.0)
    assert {r for _, r in loop.run(queue(pro=9), 0.5)} == {1}
    assert {r for _, r in loop.run(queue(), 3.0)} == {1}


def test_scale_down_waits_for_the_downscale_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = ControllerLoop(monkeypatch, replicas=4, upscale_delay_s=1.0, downscale_delay_s=5.0)
    elapsed, replicas = first_change(loop.run(queue(inflight=1), 10.0), 4)
    assert replicas == 1 and elapsed == pytest.approx(5.0, abs=0.11)


def test_a_noisy_demand_shrinks_to_the_most_it_asked_for_then_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Demand worth 1 and 3 replicas by turns: Serve alone would shrink to whichever came
    last after the delay (1: a trough, the replicas removed there wanted again within
    a tick). The policy asks for the streak's highest, so the 10 replicas go to 3 after
    the delay and stay there: no replica removed only to be started again."""
    loop = ControllerLoop(monkeypatch, replicas=10, upscale_delay_s=1.0, downscale_delay_s=5.0)

    def noisy(seconds: float) -> Iterator[tuple[float, int]]:
        for step in range(round(seconds / 0.1)):
            replicas = loop.tick(queue(pro=6 if step % 2 else 2))
            yield round((step + 1) * 0.1, 3), replicas

    elapsed, replicas = first_change(noisy(10.0), 10)
    assert replicas == 3 and elapsed == pytest.approx(5.0, abs=0.11)
    assert {replicas for _, replicas in noisy(20.0)} == {3}
    # A real drop still shrinks after the delay, from the new target.
    elapsed, replicas = first_change(loop.run(queue(pro=2), 10.0), 3)
    assert replicas == 1 and elapsed == pytest.approx(5.0, abs=0.11)


def test_free_floods_buy_fewer_replicas_than_paid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    paid = ControllerLoop(monkeypatch, upscale_delay_s=0.5, downscale_delay_s=5.0)
    assert list(paid.run(queue(pro=12), 1.0))[-1][1] == 6
    free = ControllerLoop(monkeypatch, upscale_delay_s=0.5, downscale_delay_s=5.0)
    assert list(free.run(queue(free=12, free_weight=0.25), 1.0))[-1][1] == 2


def test_idle_video_goes_to_zero_and_a_job_brings_it_back_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = ControllerLoop(
        monkeypatch,
        min_replicas=0,
        upscale_delay_s=5.0,
        downscale_delay_s=5.0,
        downscale_to_zero_delay_s=8.0,
    )
    elapsed, replicas = first_change(loop.run(queue(), 20.0), 1)
    assert replicas == 0 and elapsed == pytest.approx(8.0, abs=0.11)
    # Cold start: one queued job, no upscale delay (5 s) waited.
    assert loop.tick(queue(pro=1)) == 1
    # Bounds are Serve's too: max_replicas caps a flood.
    assert list(loop.run(queue(pro=100), 6.0))[-1][1] == 8
