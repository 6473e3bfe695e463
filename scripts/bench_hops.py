"""The floor of a Ray Serve request path on this machine: what the ingress and each
handle hop cost with no mediagate code in them, measured in one run.

mediagate's image path is client -> ingress (HAProxy, or Serve's Python proxy) ->
router -> scheduler -> worker, two handle round trips behind the ingress. This script
deploys the same shape with empty deployments (each returns at once) and times, over
HTTP, sequential requests that stop at the ingress replica (0 hops), go one handle
round trip further (1 hop) or two (2 hops, mediagate's shape). Requests are spaced by
``--gap-ms`` (default 150 ms, about one tiny-sd pipeline call) so the processes go idle
between requests as they do in ``bench_overhead.py``; the routes are interleaved so
they share the machine's noise.

What it tells: the absolute serving overhead ``bench_overhead.py`` reports cannot go
below ``two_hops_p50_ms`` with three Serve deployments; what mediagate adds is the
difference. The Ray instance is set up as `mediagate up` sets up its own.

Prints, on its last line, one JSON object: per route the client p50/p99 in ms, the
handle round trips as timed inside the replicas, and the derived per-hop costs.
Usage: python scripts/bench_hops.py [--requests 200] [--gap-ms 150]
       [--ingress haproxy|serve-proxy] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
from benchmarking import add_ingress_argument, percentile, start_local_serve

ROUTES = ("0", "1", "2")  # how many handle round trips behind the ingress
ELAPSED_HEADER = "x-bench-handle-ms"


def build_app() -> Any:
    """Ingress -> Middle -> Leaf, each returning at once (no model, no mediagate code)."""
    from fastapi import FastAPI, Response
    from ray import serve
    from ray.serve.deployment import Deployment

    http = FastAPI()

    class Leaf:
        async def __call__(self, payload: bytes) -> bytes:
            return payload

    class Middle:
        def __init__(self, leaf: Any) -> None:
            self.leaf = leaf

        async def __call__(self, payload: bytes) -> bytes:
            result: bytes = await self.leaf.remote(payload)
            return result

    class Ingress:
        def __init__(self, middle: Any, leaf: Any) -> None:
            self.first_hop = {"1": leaf, "2": middle}

        @http.get("/hops/{route}")
        async def hops(self, route: str) -> Response:
            started = time.perf_counter()
            if route in self.first_hop:
                await self.first_hop[route].remote(b"x" * 64)
            elapsed_ms = (time.perf_counter() - started) * 1000
            return Response(b"{}", headers={ELAPSED_HEADER: f"{elapsed_ms:.3f}"})

    def deployment(cls: type) -> Deployment:
        return cast(Deployment, serve.deployment(cls)).options(ray_actor_options={"num_cpus": 0})

    leaf = deployment(Leaf).bind()
    return deployment(serve.ingress(http)(Ingress)).bind(deployment(Middle).bind(leaf), leaf)


def measure(base_url: str, requests: int, gap_s: float) -> dict[str, dict[str, list[float]]]:
    """Sequential requests, the routes interleaved: client and in-replica times in ms."""
    timings: dict[str, dict[str, list[float]]] = {
        route: {"client": [], "handle": []} for route in ROUTES
    }
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for route in ROUTES:  # warm every path up
            for _ in range(3):
                client.get(f"/hops/{route}").raise_for_status()
        for _ in range(requests):
            for route in ROUTES:
                time.sleep(gap_s)
                started = time.perf_counter()
                response = client.get(f"/hops/{route}")
                elapsed_ms = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                timings[route]["client"].append(elapsed_ms)
                timings[route]["handle"].append(float(response.headers[ELAPSED_HEADER]))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per route")
    parser.add_argument("--gap-ms", type=float, default=150, help="idle time between requests")
    add_ingress_argument(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="a few requests: checks the script runs (the suite)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.gap_ms = 3, 0

    from ray import serve

    from mediagate.cli.service import stop_own_ray

    with tempfile.TemporaryDirectory() as scratch:
        port = start_local_serve(Path(scratch), args.ingress)
        serve.run(build_app(), name="hops", route_prefix="/")
        timings = measure(f"http://127.0.0.1:{port}", args.requests, args.gap_ms / 1000)
        stop_own_ray()

    def p(route: str, kind: str, q: float) -> float:
        return round(percentile(timings[route][kind], q), 2)

    result = {
        "ingress": args.ingress,
        "requests_per_route": args.requests,
        "gap_ms": args.gap_ms,
        "client_p50_ms": {f"{route}_hops": p(route, "client", 50) for route in ROUTES},
        "client_p99_ms": {f"{route}_hops": p(route, "client", 99) for route in ROUTES},
        "handle_round_trips_p50_ms": {
            "1_hop": p("1", "handle", 50),
            "2_hops": p("2", "handle", 50),
        },
        "ingress_p50_ms": p("0", "client", 50),
        "per_hop_p50_ms": round(p("2", "handle", 50) / 2, 2),
        "floor_two_hops_p50_ms": p("2", "client", 50),
    }
    print(
        f"ingress alone {result['ingress_p50_ms']} ms, one hop more {p('1', 'handle', 50)} ms, "
        f"two hops {p('2', 'handle', 50)} ms; mediagate's shape costs at least "
        f"{result['floor_two_hops_p50_ms']} ms at p50"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
