"""Serve's controller in simulated time: mediagate's autoscaling policy
(``autoscaling.policy.scale_workers``) wrapped by Ray Serve's own application-level
wrapper (``_apply_app_level_autoscaling_config``: scaling factors, min/max, the
upscale/downscale/to-zero delays), fed ``AutoscalingContext`` objects as the
controller builds them.

Ray's wrapper reads the wall clock (``time.time()``) for its delays; ``simulated_time``
points that module's clock at the simulator's for the run. Schedulers' reports are
averaged over each worker's ``look_back_period_s`` as Serve's default aggregation
(mean) does, sampled every ``metrics_interval_s``.
"""

from __future__ import annotations

import contextlib
import types
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

from autoscaling.naming import scheduler_name, worker_name
from autoscaling.policy import scale_workers

APP_NAME = "mediagate"
TASK_BY_KIND = {"image": "text-to-image", "video": "text-to-video"}


@contextlib.contextmanager
def simulated_time(clock: Callable[[], float]) -> Iterator[None]:
    """Ray Serve's autoscaling wrapper measures its delays on ``clock``, not the wall."""
    import ray.serve.autoscaling_policy as serve_policy

    real = serve_policy.time
    serve_policy.time = cast(Any, types.SimpleNamespace(time=clock))
    try:
        yield
    finally:
        serve_policy.time = real


class ModelControl:
    """One model's worker deployment as Serve's controller sees it."""

    def __init__(self, model: str, kind: str, autoscaling: dict[str, Any]) -> None:
        from ray.serve._private.common import DeploymentID
        from ray.serve.config import AutoscalingConfig

        self.model = model
        self.config = AutoscalingConfig(**autoscaling)
        self.worker_id = DeploymentID(
            name=worker_name(TASK_BY_KIND[kind], model), app_name=APP_NAME
        )
        self.scheduler_id = DeploymentID(name=scheduler_name(model), app_name=APP_NAME)
        self.target = self.config.initial_replicas or self.config.min_replicas
        self.policy_state: dict[str, Any] = {}
        self.scheduler_state: dict[str, Any] = {}
        self._reports: deque[tuple[float, dict[str, float]]] = deque()
        self._next_report_at = 0.0

    def record(self, now: float, metrics: Callable[[float], dict[str, float]]) -> None:
        """The scheduler's ``record_autoscaling_stats``, every ``metrics_interval_s``."""
        if now < self._next_report_at:
            return
        self._next_report_at = now + self.config.metrics_interval_s
        self._reports.append((now, metrics(now)))
        while self._reports and self._reports[0][0] < now - self.config.look_back_period_s:
            self._reports.popleft()

    def aggregated(self) -> dict[str, dict[str, float]]:
        """Each metric's mean over the look-back window (one scheduler replica)."""
        names = {name for _, report in self._reports for name in report}
        count = len(self._reports) or 1
        return {
            name: {"scheduler#1": sum(r.get(name, 0.0) for _, r in self._reports) / count}
            for name in names
        }


class Controller:
    """Runs the wrapped policy over every model's contexts, as one application."""

    def __init__(self, controls: list[ModelControl], clock: Callable[[], float]) -> None:
        from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

        self.controls = controls
        self._clock = clock
        self._policy = _apply_app_level_autoscaling_config(cast(Any, scale_workers))

    def decide(
        self, running: Callable[[str], int], ongoing: Callable[[str], int]
    ) -> dict[str, int]:
        """Each model's new target: ``running(model)`` replicas serve now and
        ``ongoing(model)`` requests run on them."""
        from ray.serve.config import AutoscalingContext

        now = self._clock()
        contexts: dict[Any, Any] = {}
        for control in self.controls:
            contexts[control.worker_id] = AutoscalingContext(
                deployment_id=control.worker_id,
                deployment_name=control.worker_id.name,
                app_name=APP_NAME,
                current_num_replicas=running(control.model),
                target_num_replicas=control.target,
                running_replicas=[],
                total_num_requests=float(ongoing(control.model)),
                total_queued_requests=0.0,
                aggregated_metrics={},
                raw_metrics={},
                capacity_adjusted_min_replicas=control.config.min_replicas,
                capacity_adjusted_max_replicas=control.config.max_replicas,
                policy_state=control.policy_state,
                last_scale_up_time=None,
                last_scale_down_time=None,
                current_time=now,
                config=control.config,
            )
            contexts[control.scheduler_id] = AutoscalingContext(
                deployment_id=control.scheduler_id,
                deployment_name=control.scheduler_id.name,
                app_name=APP_NAME,
                current_num_replicas=1,
                target_num_replicas=1,
                running_replicas=[],
                total_num_requests=0.0,
                total_queued_requests=0.0,
                aggregated_metrics=cast(Any, control.aggregated()),
                raw_metrics={},
                capacity_adjusted_min_replicas=1,
                capacity_adjusted_max_replicas=1,
                policy_state=control.scheduler_state,
                last_scale_up_time=None,
                last_scale_down_time=None,
                current_time=now,
                config=None,
            )
        decisions, states = self._policy(contexts)
        targets = {}
        for control in self.controls:
            control.policy_state = states.get(control.worker_id, control.policy_state)
            control.scheduler_state = states.get(control.scheduler_id, control.scheduler_state)
            if control.worker_id in decisions:
                control.target = int(decisions[control.worker_id])
            targets[control.model] = control.target
        return targets
