"""What the router's request handlers (image requests, video jobs) need of the router:
its settings, stores, quota guard, schedulers and clock, the tier policy, and model
resolution. ``Gateway`` provides it; the handlers do not import it (no cycle)."""

from __future__ import annotations

from typing import Any, Protocol

from deployments.router.settings import RouterSettings
from mediagate.access.guard import TierGuard
from mediagate.access.tiers import TierPolicy
from mediagate.protocol.catalog import ModelSpec, Task
from mediagate.protocol.clock import Clock
from mediagate.stores.artifacts import ArtifactStore


class RouterServices(Protocol):
    """The router's parts a request handler uses."""

    settings: RouterSettings
    artifacts: ArtifactStore
    guard: TierGuard
    schedulers: dict[str, Any]
    clock: Clock

    @property
    def policy(self) -> TierPolicy: ...

    def check_prompt(self, prompt: str) -> None: ...

    def task_model(self, model_id: str | None, task: Task) -> ModelSpec: ...
