"""Request traces: synthetic ones modelled on the surge, reproducible from a seed, and
recorded ones read from a CSV (``time_s,account,tier,kind,size``) so real logs replay.

A trace is columns (numpy arrays), one row per first attempt, sorted by time; retries
are not in it: the simulator makes them from the answers clients get.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulation.scenario import DAY_S, HOUR_S, KINDS, Workload

MINUTE_S = 60.0


@dataclass
class Trace:
    """Arrivals (``time_s`` ascending) and the accounts they come from."""

    tiers: list[str]  # tier names; ``tier`` columns index into it
    time_s: np.ndarray  # float64
    account: np.ndarray  # int64, index into the account columns
    kind: np.ndarray  # int8, index into KINDS
    size: np.ndarray  # int16: images asked for (1 for a video)
    account_tier: np.ndarray  # int8 per account
    account_created_s: np.ndarray  # float64 per account (negative: before the start)

    def __len__(self) -> int:
        return len(self.time_s)

    def tier_of(self, row: int) -> str:
        return self.tiers[int(self.account_tier[self.account[row]])]

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["time_s", "account", "tier", "kind", "size", "account_created_s"])
            for row in range(len(self)):
                account = int(self.account[row])
                writer.writerow(
                    [
                        f"{self.time_s[row]:.3f}",
                        account,
                        self.tiers[int(self.account_tier[account])],
                        KINDS[int(self.kind[row])],
                        int(self.size[row]),
                        f"{self.account_created_s[account]:.0f}",
                    ]
                )


def spike_factor(t_s: np.ndarray, workload: Workload) -> np.ndarray:
    """Demand over the baseline's: 1 before the spike, rising linearly to the
    multiplier over the ramp, decaying exponentially after."""
    spike = workload.spike
    if spike is None:
        return np.ones_like(t_s)
    start, peak = spike.start_h * HOUR_S, (spike.start_h + spike.ramp_h) * HOUR_S
    rise = np.clip((t_s - start) / (peak - start), 0.0, 1.0)
    decay = np.where(t_s > peak, np.exp(-(t_s - peak) / (spike.decay_h * HOUR_S)), 1.0)
    return 1.0 + (spike.multiplier - 1.0) * rise * decay


def arrival_rate_per_s(t_s: np.ndarray, workload: Workload) -> np.ndarray:
    """Arrivals per second at ``t_s``: the baseline, its day cycle, the spike."""
    phase = 2 * math.pi * (t_s / DAY_S - workload.diurnal_peak_h / 24)
    diurnal = 1.0 + workload.diurnal_amplitude * np.cos(phase)
    return workload.base_rate_per_s * diurnal * spike_factor(t_s, workload)


def _shares(shares: dict[str, float], names: list[str]) -> np.ndarray:
    weights = np.array([shares.get(name, 0.0) for name in names], dtype=float)
    if weights.sum() <= 0:
        raise ValueError(f"shares {shares} name none of {names}")
    return weights / weights.sum()


def synthetic_trace(workload: Workload, *, duration_s: float, tiers: list[str], seed: int) -> Trace:
    """Arrivals as a Poisson process of the workload's rate (drawn per minute), from
    accounts weighted by tier and a log-normal activity; the spike's extra demand comes
    from the accounts it creates, when it has any."""
    rng = np.random.default_rng(seed)
    spike = workload.spike
    old = workload.accounts
    new = spike.new_accounts if spike is not None else 0
    account_tier = np.concatenate(
        [
            rng.choice(len(tiers), size=old, p=_shares(workload.tier_shares, tiers)),
            rng.choice(
                len(tiers),
                size=new,
                p=_shares((spike.new_tier_shares or workload.tier_shares) if spike else {}, tiers)
                if new
                else None,
            ),
        ]
    ).astype(np.int8)
    activity = rng.lognormal(0.0, workload.account_activity_sigma, size=old + new)
    activity *= np.array([workload.activity_by_tier.get(t, 1.0) for t in tiers])[account_tier]

    minutes = np.arange(0.0, duration_s, MINUTE_S)
    rate = arrival_rate_per_s(minutes + MINUTE_S / 2, workload)
    counts = rng.poisson(rate * MINUTE_S)
    time_s = np.repeat(minutes, counts) + rng.random(int(counts.sum())) * MINUTE_S
    time_s = np.minimum(np.sort(time_s), duration_s - 1e-3)
    rows = len(time_s)

    created = np.full(old + new, -workload.old_account_age_days * DAY_S)
    account = _draw_accounts(rng, activity[:old], rows)
    if new and spike is not None:
        # New accounts join as the spike's extra demand rises, in proportion to it.
        grid = np.arange(spike.start_h * HOUR_S, duration_s, MINUTE_S)
        extra = spike_factor(grid, workload) - 1.0
        if extra.sum() > 0:
            joined = np.sort(
                rng.choice(grid, size=new, p=extra / extra.sum()) + rng.random(new) * MINUTE_S
            )
            created[old:] = joined
            baseline = 1.0 / spike_factor(time_s, workload)
            from_new = rng.random(rows) > baseline
            available = np.searchsorted(joined, time_s[from_new], side="right")
            usable = available > 0
            picked = (rng.random(int(from_new.sum())) * np.maximum(available, 1)).astype(np.int64)
            rows_new = np.flatnonzero(from_new)[usable]
            account[rows_new] = old + picked[usable]

    tier_of_row = account_tier[account]
    kind = np.zeros(rows, dtype=np.int8)
    size = np.ones(rows, dtype=np.int16)
    for index, tier in enumerate(tiers):
        mine = np.flatnonzero(tier_of_row == index)
        shares = workload.kind_shares.get(tier, {"image": 1.0})
        kind[mine] = rng.choice(
            len(KINDS),
            size=len(mine),
            p=_shares({str(k): v for k, v in shares.items()}, list(KINDS)),
        )
        sizes = workload.images_per_request.get(tier, {1: 1.0})
        names = sorted(sizes)
        drawn = rng.choice(
            len(names),
            size=len(mine),
            p=_shares({str(n): sizes[n] for n in names}, [str(n) for n in names]),
        )
        size[mine] = np.array(names, dtype=np.int16)[drawn]
    size[kind == KINDS.index("video")] = 1
    return Trace(tiers, time_s, account, kind, size, account_tier, created)


def _draw_accounts(rng: np.random.Generator, activity: np.ndarray, rows: int) -> np.ndarray:
    cumulative = np.cumsum(activity)
    drawn = rng.random(rows) * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, drawn, side="right"), len(activity) - 1)


def read_trace_csv(path: str | Path, *, tiers: list[str], default_age_s: float) -> Trace:
    """A recorded trace: ``time_s,account,tier,kind,size`` (and optionally
    ``account_created_s``); accounts are any strings, renumbered here."""
    ids: dict[str, int] = {}
    account_tier: list[int] = []
    created: list[float] = []
    time_s, account, kind, size = [], [], [], []
    with open(path, newline="") as source:
        for row in csv.DictReader(source):
            name = row["account"]
            if name not in ids:
                ids[name] = len(ids)
                account_tier.append(tiers.index(row["tier"]))
                age = row.get("account_created_s")
                created.append(float(age) if age not in (None, "") else -default_age_s)
            time_s.append(float(row["time_s"]))
            account.append(ids[name])
            kind.append(KINDS.index(row["kind"]))
            size.append(int(row.get("size") or 1))
    order = np.argsort(np.array(time_s), kind="stable")
    return Trace(
        tiers,
        np.array(time_s, dtype=float)[order],
        np.array(account, dtype=np.int64)[order],
        np.array(kind, dtype=np.int8)[order],
        np.array(size, dtype=np.int16)[order],
        np.array(account_tier, dtype=np.int8),
        np.array(created, dtype=float),
    )
