"""What every benchmark script shares: percentiles, free ports, and the tier file that
takes quotas out of the way (a benchmark measures the serving path, not the quotas).

The scripts import it by name (a script's own folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import socket
from importlib import resources
from pathlib import Path

import yaml


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_tiers_without_quotas(home: Path) -> Path:
    """The shipped tiers without daily quotas, rates, cooldowns and queue caps: with
    them, a pro key gets 429 after 60 images a minute and the figures measure the quota."""
    data = yaml.safe_load(resources.files("mediagate").joinpath("configs/tiers.yaml").read_text())
    for tier in data["tiers"].values():
        tier.update(images_per_day=None, images_per_minute=None, cooldown=None, max_queued=None)
    path = home / "tiers.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
