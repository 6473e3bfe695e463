"""The one place deployments are named: the builder names them, the autoscaling policy
and `mediagate scale` find them by these names, and a Serve config overrides their
options under them. Stable names (``Router``, ``Scheduler-<model>``,
``TextToImage-<model>``, ``TextToVideo-<model>``) make a changed config a lightweight
update. Also the one default for how often schedulers report their queues.
"""

from __future__ import annotations

from typing import Any

from mediagate.protocol.catalog import Scaling

ROUTER = "Router"
WEBHOOKS = "Webhooks"  # the deployment that delivers webhook events
SCHEDULER_PREFIX = "Scheduler-"
WORKER_PREFIX_BY_TASK: dict[str, str] = {
    "text-to-image": "TextToImage-",
    "text-to-video": "TextToVideo-",
}
WORKER_PREFIXES = tuple(WORKER_PREFIX_BY_TASK.values())
# How often schedulers and workers report to Serve's autoscaler: the queue reaches the
# policy within a second.
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


def scheduler_name(model_id: str) -> str:
    return f"{SCHEDULER_PREFIX}{model_id}"


def worker_name(task: str, model_id: str) -> str:
    return f"{WORKER_PREFIX_BY_TASK[task]}{model_id}"


def worker_model(deployment_name: str) -> str | None:
    """The model a worker deployment serves; None for any other deployment."""
    for prefix in WORKER_PREFIXES:
        if deployment_name.startswith(prefix):
            return deployment_name.removeprefix(prefix)
    return None


def is_image_worker(deployment_name: str) -> bool:
    return deployment_name.startswith(WORKER_PREFIX_BY_TASK["text-to-image"])


# How long a removed worker replica may finish its running work (``Scaling.drain_s``):
# longer than an image batch or a video run on the GPUs these models are sized for. The
# policy may ask for fewer replicas than are busy (running free work weighs less), so a
# replica told to stop must not lose what it runs.
DEFAULT_DRAIN_S_BY_TASK: dict[str, float] = {"text-to-image": 60.0, "text-to-video": 1800.0}


def worker_drain_s(scaling: Scaling, task: str) -> float:
    return scaling.drain_s if scaling.drain_s is not None else DEFAULT_DRAIN_S_BY_TASK[task]


def worker_autoscaling_config(scaling: Scaling) -> dict[str, Any]:
    """A worker deployment's Serve ``autoscaling_config`` from its catalog entry."""
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": max(1, scaling.min_replicas),
        "target_ongoing_requests": scaling.target_per_replica,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        # Decide in about a second, not Serve's defaults (10 s / 30 s) made for CPUs.
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
    }
    if scaling.downscale_to_zero_delay_s is not None:
        config["downscale_to_zero_delay_s"] = scaling.downscale_to_zero_delay_s
    return config
