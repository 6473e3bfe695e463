"""What the quota ledger costs per request, early and late in a busy account's minute.

For each backend (SQLite under a temporary directory; Redis when ``--redis-url`` is
given or a ``redis-server`` binary can be started), many accounts each make
``--requests`` reserve + commit pairs within one minute of a fake clock (the paid
tier's limits raised so nothing is refused). The wall time of the reserve and of the
commit is recorded at request 1 and at request N; the figures are medians over the
accounts, in milliseconds, and the ratio N / 1 says whether the cost grows with the
account's activity.

Last line: one JSON object, e.g.
``{"sqlite": {"reserve_ms_first": 0.3, "reserve_ms_last": 0.3, "ratio_last_to_first": 1.0, ...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarking import free_port

from mediagate.access.accounts import Account
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.stores import StateConfig, open_state_store


def busy_policy(requests: int) -> TierPolicy:
    """The shipped policy with the pro tier allowed ``requests`` images a minute and a day
    (the windows are then kept and counted, as for a real limit)."""
    data = load_tier_policy().model_dump()
    data["tiers"]["pro"].update(images_per_minute=requests, images_per_day=requests)
    return TierPolicy.model_validate(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def measure(config: StateConfig, *, accounts: int, requests: int) -> dict[str, float]:
    store = open_state_store(config)
    clock = Clock()
    ledger = QuotaLedger(store, busy_policy(requests), clock=clock)
    step_s = 50.0 / requests  # all of an account's requests within 50 s: one minute
    first: dict[str, list[float]] = {"reserve": [], "finish": []}
    last: dict[str, list[float]] = {"reserve": [], "finish": []}
    try:
        for index in range(accounts):
            account = Account(id=f"acct_bench{index}", name=f"b{index}", tier="pro", created_at=0)
            clock.now = 1_800_000_000.0 + index * 3600  # each account its own minute
            for number in range(1, requests + 1):
                clock.now += step_s
                started = time.perf_counter()
                rid, _ = await ledger.reserve(account, kind="image", units=1)
                reserved = time.perf_counter()
                await ledger.finish(account.id, rid, commit=True)
                finished = time.perf_counter()
                if number in (1, requests):
                    into = first if number == 1 else last
                    into["reserve"].append((reserved - started) * 1000)
                    into["finish"].append((finished - reserved) * 1000)
    finally:
        await store.close()
    figures: dict[str, float] = {}
    for step in ("reserve", "finish"):
        figures[f"{step}_ms_first"] = round(statistics.median(first[step]), 3)
        figures[f"{step}_ms_last"] = round(statistics.median(last[step]), 3)
    both_first = figures["reserve_ms_first"] + figures["finish_ms_first"]
    both_last = figures["reserve_ms_last"] + figures["finish_ms_last"]
    figures["ratio_last_to_first"] = round(both_last / both_first, 3)
    figures["requests"] = requests
    figures["accounts"] = accounts
    return figures


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return process, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=30)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, same code path")
    args = parser.parse_args()
    if args.smoke:
        args.accounts, args.requests = 2, 50
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        results["sqlite"] = asyncio.run(
            measure(
                StateConfig.embedded(directory / "state.db"),
                accounts=args.accounts,
                requests=args.requests,
            )
        )
        redis = None if args.redis_url else start_redis(directory)
        url = args.redis_url or (redis[1] if redis else None)
        try:
            if url is not None:
                results["redis"] = asyncio.run(
                    measure(
                        StateConfig(backend="redis", redis_url=url),
                        accounts=args.accounts,
                        requests=args.requests,
                    )
                )
        finally:
            if redis is not None:
                redis[0].terminate()
                redis[0].wait()
    for backend, figures in results.items():
        print(f"{backend}: {figures}", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
