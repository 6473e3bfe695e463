"""What the router's request handlers (image requests, video jobs) need of the router:
its settings, stores, quota guard, schedulers and clock, the tier policy, and model
resolution. ``Gateway`` provides it; the handlers do not import it (no cycle)."""

from __future__ import annotations

from typing import Any, Protocol

from deployments.router.image_processing import ImageProcessing
from deployments.router.settings import RouterSettings
from mediagate.access.guard import TierGuard
from mediagate.access.tiers import TierPolicy
from mediagate.moderation.moderator import Moderator
from mediagate.moderation.prompts import Level
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
    moderator: Moderator  # prompts (images: ``image_processing``)
    image_processing: ImageProcessing  # checks, encoding and C2PA signing of images

    @property
    def policy(self) -> TierPolicy: ...

    def check_prompt(self, prompt: str) -> None: ...

    def moderation_level(self, tier_name: str, requested: Level | None = None) -> Level: ...

    def task_model(self, model_id: str | None, task: Task) -> ModelSpec: ...
