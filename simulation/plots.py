"""PNG plots of a simulated run (docs/SCALE.md): the fleet against the work, and each
tier's hourly p99 wait and success rate."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from simulation.report import MINUTE_S, SERVICE_OUTCOMES, Recorder, percentile
from simulation.scenario import HOUR_S


def plot_run(recorder: Recorder, directory: Path, *, prefix: str, title: str) -> list[Path]:
    """Write ``<prefix>-fleet.png`` and ``<prefix>-tiers.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    samples = recorder.samples
    t_h = np.array(samples["t_h"])
    fleet_png, tiers_png = directory / f"{prefix}-fleet.png", directory / f"{prefix}-tiers.png"

    figure, axis = plt.subplots(figsize=(10, 4.5))
    axis.plot(t_h, samples["gpus_provisioned"], label="GPUs provisioned (incl. booting)")
    axis.plot(t_h, samples["gpus_up"], label="GPUs up")
    axis.plot(t_h, samples["gpus_busy"], label="GPUs busy")
    oracle = np.sum(list(recorder.busy_gpu_s.values()), axis=0) / MINUTE_S
    axis.plot(
        np.arange(len(oracle)) / 60,
        oracle,
        label="oracle: GPUs the served work needed",
        lw=0.8,
        alpha=0.7,
    )
    axis.set_xlabel("hours")
    axis.set_ylabel("GPUs")
    axis.set_title(f"{title}: the fleet")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(fleet_png, dpi=110)
    plt.close(figure)

    figure, (waits, rates) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    hours = int(recorder.scenario.duration_s // HOUR_S) + 1
    for tier in sorted({t for _, t in recorder.arrivals}):
        for model in recorder.scenario.models:
            p99 = [
                percentile(recorder.waits[h, tier, model], 0.99)
                if (h, tier, model) in recorder.waits
                else np.nan
                for h in range(hours)
            ]
            if not np.all(np.isnan(p99)):
                waits.plot(range(hours), p99, label=f"{tier} / {model}")
        outcomes: dict[int, Counter[str]] = defaultdict(Counter)
        for (hour, of_tier, outcome), count in recorder.finals.items():
            if of_tier == tier:
                outcomes[hour][outcome] += count
        rate = [
            outcomes[h]["served"] / total
            if (total := sum(outcomes[h][o] for o in SERVICE_OUTCOMES))
            else np.nan
            for h in range(hours)
        ]
        rates.plot(range(hours), rate, label=tier)
    waits.set_yscale("log")
    waits.set_ylabel("p99 queue wait (s)")
    waits.set_title(f"{title}: each tier, hour by hour")
    waits.legend(loc="upper right", fontsize=8)
    rates.set_ylabel("success rate")
    rates.set_xlabel("hours")
    rates.set_ylim(0, 1.02)
    rates.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(tiers_png, dpi=110)
    plt.close(figure)
    return [fleet_png, tiers_png]
