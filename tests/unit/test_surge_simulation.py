"""The surge simulator (issue 21) on a small fleet for a simulated hour or two: its
invariants hold (every request accounted for, quota never exceeded, replicas and nodes
within their limits, no top-tier request shed while lower work runs), the real policy
code decides (switching preemption off in the scheduler's settings stops preemptions),
traces are reproducible and replay from CSV, and the script prints its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mediagate.access.tiers import load_tier_policy
from simulation.engine import Simulation
from simulation.report import LAG_MIN_RISE
from simulation.scenario import Scenario, load_scenario
from simulation.trace import read_trace_csv, synthetic_trace

ROOT = Path(__file__).resolve().parents[2]
TIERS = sorted(load_tier_policy().tiers)

SMALL = {
    "days": 1.5 / 24,
    "node_types": {"l4": {"max_nodes": 24, "boot_s": 60}, "h100x8": {"max_nodes": 2, "boot_s": 90}},
    "models": {
        "flux": {
            "load_s": 20,
            "service": {"base_s": 1.0, "per_image_s": 2.0},
            "autoscaling": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 20},
        },
        "wan": {
            "load_s": 30,
            "service": {"base_s": 40.0, "per_image_s": 0.0},
            "autoscaling": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 12},
        },
    },
    "workload": {
        "accounts": 800,
        "base_rate_per_s": 0.6,
        "spike": {
            "start_h": 0.25,
            "ramp_h": 0.2,
            "multiplier": 15,
            "decay_h": 1,
            "new_accounts": 3000,
        },
    },
}


def small_scenario(**changes: Any) -> Scenario:
    return load_scenario().with_changes(SMALL).with_changes(changes)


def simulate(scenario: Scenario) -> tuple[Simulation, dict[str, Any]]:
    trace = synthetic_trace(
        scenario.workload, duration_s=scenario.duration_s, tiers=TIERS, seed=scenario.seed
    )
    simulation = Simulation(scenario, trace)
    return simulation, simulation.run()


@pytest.fixture(scope="module")
def baseline() -> tuple[Simulation, dict[str, Any]]:
    return simulate(small_scenario())


def test_every_request_is_accounted_for(baseline: tuple[Simulation, dict[str, Any]]) -> None:
    _, result = baseline
    counted = result["conservation"]
    assert counted["arrived"] == result["requests"] > 1000
    assert counted["arrived"] == counted["finished"] + counted["in_flight"]
    assert counted["holds"]
    # Retries are attempts of the same requests, not new arrivals.
    assert result["attempts"] > result["requests"]
    outcomes = result["outcomes"]
    assert outcomes["pro"]["served"] > 0 and outcomes["free"]["served"] > 0, outcomes


def test_the_invariants_hold(baseline: tuple[Simulation, dict[str, Any]]) -> None:
    simulation, result = baseline
    assert result["violations"] == {}, result["violations"]
    # The checks behind them ran: free accounts reached their daily quota, and were
    # refused by the real ledger rules, not by a count of the simulator's own.
    assert result["refusals"]["free"].get("insufficient_quota", 0) > 0, result["refusals"]
    assert result["refusals"]["free"].get("tier_not_allowed", 0) > 0  # no video for free
    limits = {c.model: c.config for c in simulation.controls}
    for model, server in simulation.servers.items():
        assert simulation.fleet.live_count(model) <= limits[model].max_replicas
        assert server.busy_slots >= 0 and server.running_requests >= 0
    assert result["peak_gpus_by_type"]["l4"] <= 24


def test_the_fleet_follows_the_spike(baseline: tuple[Simulation, dict[str, Any]]) -> None:
    simulation, result = baseline
    ready = np.array(simulation.recorder.samples["flux.ready_gpus"])
    assert ready.max() > 2 * ready[0], "the autoscaling policy never scaled the image model up"
    assert result["gpu_hours"] > result["oracle_gpu_hours"] > 0
    rises = result["spike_demand_rise"]
    assert rises["flux"] >= LAG_MIN_RISE, rises  # images rise with the free flood
    lags = result["scale_up_lag_s"]
    assert lags.keys() == rises.keys() == {"flux", "wan"}
    assert lags["flux"] is None or lags["flux"] >= 0  # (a toy fleet's lag may not close)
    # A model whose demand stayed within its noise has no lag to measure.
    assert all(lags[model] is None for model, rise in rises.items() if rise < LAG_MIN_RISE)


def test_the_lag_is_how_long_after_the_demand_the_fleet_reached_each_level(
    baseline: tuple[Simulation, dict[str, Any]],
) -> None:
    """A fleet trailing a rising target by k samples lags k samples, noise a few
    percent below the target after the rise does not count, and a fleet that never
    gets there has no lag to report."""
    simulation, _ = baseline
    recorder, scenario = simulation.recorder, simulation.scenario
    spike = scenario.workload.spike
    assert spike is not None
    samples = dict(recorder.samples)
    t_h = np.array(samples["t_h"])
    rise = np.clip((t_h - spike.start_h) / spike.ramp_h, 0, 1)
    target = np.round(2 + 18 * rise).astype(int)  # 2 to 20 replicas over the rise
    for shift in (0, 3, 7):
        ready = np.concatenate([np.full(shift, 2), target[: len(target) - shift]])
        ready = np.where(t_h > spike.start_h + spike.ramp_h + 0.2, ready - 1, ready)  # 95%
        recorder.samples = samples | {"flux.target": list(target), "flux.ready_gpus": list(ready)}
        lags = recorder.scale_up_lag_s(simulation.servers, simulation.controls)
        assert lags["flux"] == shift * scenario.sample_interval_s, (shift, lags)
    recorder.samples = samples | {"flux.target": list(target), "flux.ready_gpus": [2] * len(t_h)}
    assert recorder.scale_up_lag_s(simulation.servers, simulation.controls)["flux"] is None
    recorder.samples = samples


def test_preemption_is_the_schedulers_setting() -> None:
    on = simulate(small_scenario())[1]
    off = simulate(
        small_scenario(
            models={
                "flux": {"scheduler": {"queue_weights": {0: 0.5}, "preemption": {"enabled": False}}}
            }
        )
    )[1]
    assert on["preemptions"] > 0
    assert off["preemptions"] == 0


def test_a_trace_is_reproducible_and_replays_from_csv(tmp_path: Path) -> None:
    scenario = small_scenario()
    first = synthetic_trace(scenario.workload, duration_s=scenario.duration_s, tiers=TIERS, seed=3)
    again = synthetic_trace(scenario.workload, duration_s=scenario.duration_s, tiers=TIERS, seed=3)
    other = synthetic_trace(scenario.workload, duration_s=scenario.duration_s, tiers=TIERS, seed=4)
    assert np.array_equal(first.time_s, again.time_s) and np.array_equal(
        first.account, again.account
    )
    assert not np.array_equal(first.time_s[:100], other.time_s[:100])
    first.write_csv(tmp_path / "trace.csv")
    replayed = read_trace_csv(tmp_path / "trace.csv", tiers=TIERS, default_age_s=0)
    assert len(replayed) == len(first)
    assert np.allclose(replayed.time_s, first.time_s, atol=1e-3)
    assert [replayed.tier_of(i) for i in range(50)] == [first.tier_of(i) for i in range(50)]
    assert np.array_equal(replayed.kind, first.kind) and np.array_equal(replayed.size, first.size)


def test_the_script_prints_its_result_as_json() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_surge.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    baseline = result["baseline"]
    assert baseline["conservation"]["holds"] and baseline["violations"] == {}
    assert set(baseline["targets"]) >= {
        "speed_at_least_1000x",
        "gpu_hours_over_oracle_at_most_1.15",
    }


def test_preemption_sees_the_newest_batch_of_each_shape_and_chooses_as_over_all() -> None:
    """``_preempt`` shows ``batch_to_preempt`` a few candidates per class; its choice
    is the one the real function makes over every running batch."""
    import random

    from deployments.scheduler.preemption import RunningBatch, batch_to_preempt
    from deployments.scheduler.queue import Ticket
    from deployments.scheduler.settings import ImageSchedulerSettings
    from simulation.fleet import Replica
    from simulation.requests import Answer, Request, SimJob
    from simulation.serving import ModelServer, Outcomes

    rng = random.Random(5)
    scenario = small_scenario()
    calendar: list[tuple[float, str, object]] = []

    def ignore(*_: object) -> None:
        pass

    for trial in range(40):
        server = ModelServer(
            "flux",
            scenario.models["flux"],
            lambda at, event, payload: calendar.append((at, event, payload)),
            Outcomes(ignore, ignore, ignore, ignore, ignore),
        )
        shapes = [("image", 1), ("edit", 1)]
        server.service_s = {shape: rng.uniform(10, 60) for shape in shapes}
        for index in range(rng.randint(1, 30)):
            replica = Replica(index, "flux", 1, state="running")
            server.replica_running(replica, 0.0)
        now = 100.0
        starts = iter(sorted(now - rng.uniform(0, 50) for _ in range(len(server.free_replicas))))
        while server.free_replicas:  # started in time order, as the simulation starts them
            job = SimJob(
                "a",
                rng.choice([0, 0, 1]),
                rng.choice(shapes),
                1,
                Request(0, 0, "free", "image", 1, 0.0),
            )
            ticket: Ticket[SimJob] = Ticket(job=job, enqueued_at=now, future=Answer())  # type: ignore[arg-type]
            ticket.preemptions = rng.choice([0, 0, 1])
            server._start([ticket], next(starts))
            if rng.random() < 0.1:
                batch = next(reversed(server.batches.values()))
                batch.stopping = True  # as _preempt marks one it takes
                server._not_preemptable(batch)
                server.stopping_batches += 1
        for _ in range(server.stopping_batches + 1):  # more waiting than being stopped
            waiting = SimJob("b", 2, shapes[0], 1, Request(1, 1, "pro", "image", 1, now))
            server.queue.push(Ticket(job=waiting, enqueued_at=now))
        everything = [
            RunningBatch(
                b.batch_id,
                b.priority_class,
                b.started_at,
                server.service_s[b.batch_key],
                b.most_preempted,
                b.stopping,
            )
            for b in server.batches.values()
        ]
        assert isinstance(server.settings, ImageSchedulerSettings)
        expected = batch_to_preempt(everything, 2, now=now, policy=server.settings.preemption)
        before = {b.batch_id for b in server.batches.values() if b.stopping}
        server._preempt(now)
        chosen = {b.batch_id for b in server.batches.values() if b.stopping} - before
        if expected is None:
            assert not chosen, trial
            continue
        [victim] = chosen
        mine = server.batches[victim]

        theirs = server.batches[expected.batch_id]
        assert mine.priority_class == expected.priority_class, trial
        assert (now - mine.started_at) / server.service_s[mine.batch_key] == pytest.approx(
            (now - theirs.started_at) / server.service_s[theirs.batch_key]
        ), trial
