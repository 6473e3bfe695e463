"""The router's behaviour, independent of Ray: authentication (with an outage cache), model
resolution and the status view; image requests (``images.ImageRequests``) and video
jobs (``videos.VideoJobs``) hang off it. Tests drive it with fake handles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from deployments.router.account_views import AccountViews
from deployments.router.image_processing import ImageProcessing
from deployments.router.images import ImageRequests
from deployments.router.operations import Operations, ServeControl
from deployments.router.settings import RouterSettings
from deployments.router.videos import VideoJobs
from mediagate.access.accounts import Account, AccountStore, hash_key
from mediagate.access.guard import TierGuard
from mediagate.access.idempotency import IdempotencyKeys
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.moderation.moderator import Moderator, moderation_level
from mediagate.moderation.prompts import Level
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.catalog import Catalog, LiveModel, ModelSpec, Task
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import (
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from mediagate.protocol.listing import ModelObject
from mediagate.protocol.scheduling import DECISIONS, QueueStats
from mediagate.protocol.work import ImageJob
from mediagate.provenance.signing import ContentSigner
from mediagate.stores import (
    JobStore,
    StoreUnavailable,
)
from mediagate.stores.artifacts import (
    ArtifactStore,
)
from mediagate.webhooks.endpoints import WebhookEndpoints
from mediagate.webhooks.settings import WebhookSettings

logger = logging.getLogger(__name__)


# While the state store is down, a key this router verified within this long keeps
# working (a Redis restart does not log every caller out); never one it saw revoked.
AUTH_STALE_IF_ERROR_S = 60.0


# A key's account (tier included) is looked up in the store at most once per this long
# per router replica: a revoked key or a tier change takes effect within it.
AUTH_CACHE_S = 2.0


class Gateway:
    """The router's behaviour, independent of Ray: tests drive it with fake handles."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        schedulers: Mapping[str, Any],
        accounts: AccountStore,
        artifacts: ArtifactStore,
        jobs: JobStore,
        settings: RouterSettings,
        guard: TierGuard | None = None,
        serve_control: ServeControl | None = None,
        webhook_settings: WebhookSettings | None = None,
        webhook_sender: Any = None,
        signer: ContentSigner | None = None,
        moderator: Moderator | None = None,
        image_processing: ImageProcessing | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.catalog = catalog
        self.schedulers = dict(schedulers)
        # What the router was built with; live models (``route_live_models``) go on top.
        self._built_catalog = catalog
        self._built_schedulers = dict(schedulers)
        self.live_models: dict[str, LiveModel] = {}
        self.accounts = accounts
        self.artifacts = artifacts
        self.jobs = jobs
        self.guard = guard or TierGuard(QuotaLedger(jobs, load_tier_policy(), clock=clock))
        self.idempotency = IdempotencyKeys(jobs, clock=clock)
        self.settings = settings
        self.clock = clock
        self.started_at = int(clock())
        # Called with (tier, error code) for each refusal of a known caller; the router
        # deployment counts them in Prometheus (``RouterMetrics``).
        self.on_refusal: Callable[[str, str], None] = lambda tier, code: None
        # Accounts last seen per key hash, used only while the store is unreachable.
        self._seen: dict[str, tuple[Account, float]] = {}
        self.webhooks = WebhookEndpoints(jobs, webhook_settings or WebhookSettings(), clock=clock)
        self.webhook_sender = webhook_sender  # the Webhooks deployment's handle (status)
        self.moderator = moderator or Moderator(ModerationSettings(enabled=False))
        # checks, encoding and signing of images: given (a Router's processes), or in
        # this process's threads with ``moderator`` and ``signer``
        self.image_processing = image_processing or ImageProcessing.in_threads(
            self.moderator, signer
        )
        self.images = ImageRequests(self)
        self.videos = VideoJobs(self)
        self.own_account = AccountViews(self)
        self.ops = Operations(
            control=serve_control,
            jobs=jobs,
            clock=clock,
            limit_changes=settings.ops_limit_changes,
            free_class=lambda: self.policy.lowest_priority_class,
        )

    async def authenticate(self, authorization: str | None) -> Account:
        if not authorization:
            raise Unauthorized(
                "no API key: send `Authorization: Bearer YOUR_KEY`", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be `Bearer YOUR_KEY`")
        key_hash = hash_key(key.strip())
        seen = self._seen.get(key_hash)
        if seen is not None and self.clock() - seen[1] < AUTH_CACHE_S:
            return seen[0]
        try:
            account = await self.accounts.authenticate(key.strip())
        except StoreUnavailable:
            if seen is None or self.clock() - seen[1] > AUTH_STALE_IF_ERROR_S:
                raise
            return seen[0]  # the store is down: trust a recent answer for a while
        if account is None:
            self._seen.pop(key_hash, None)
            raise Unauthorized("incorrect or revoked API key")
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[key_hash] = (account, self.clock())
        return account

    async def remember_images(
        self, job: ImageJob, model: str, kind: str, stored: list[str]
    ) -> None:
        await self.own_account.remember(job, model, kind, stored)

    @property
    def policy(self) -> TierPolicy:
        return self.guard.ledger.policy

    def route_live_models(
        self, live: Mapping[str, LiveModel], scheduler_of: Callable[[LiveModel], Any]
    ) -> list[str]:
        """Serve the models of other applications as ``live`` says (the router's
        ``user_config``), over the ones this router was built with: a live model of the
        same id takes its place, one taken out of ``live`` is no longer served (404), or
        again the built one. ``scheduler_of`` makes the handle of a live model's
        scheduler. Returns the ids whose route changed."""
        routed = {model_id: entry for model_id, entry in live.items() if entry.accepting}
        changed = [
            model_id
            for model_id in set(self.live_models) | set(live)
            if self.live_models.get(model_id) != live.get(model_id)
        ]
        schedulers = dict(self._built_schedulers)
        models = dict(self._built_catalog.models)
        for model_id in live:  # accepting or not, a live entry hides the built model
            schedulers.pop(model_id, None)
            models.pop(model_id, None)
        for model_id, entry in routed.items():
            unchanged = self.live_models.get(model_id)
            same_app = unchanged is not None and unchanged.app == entry.app
            schedulers[model_id] = (
                self.schedulers[model_id]
                if same_app and model_id in self.schedulers
                else scheduler_of(entry)
            )
            models[model_id] = entry.spec
        defaults = {
            task: model_id
            for task, model_id in self._built_catalog.default_models.items()
            if model_id in models
        }
        self.catalog = Catalog(models=models, default_models=defaults)
        self.schedulers = schedulers
        self.live_models = dict(live)
        for model_id in changed:
            self.images.forget_load(model_id)
        return sorted(changed)

    def served_models(self) -> list[ModelSpec]:
        return [
            spec for model_id, spec in self.catalog.models.items() if model_id in self.schedulers
        ]

    def model(self, model_id: str) -> ModelSpec:
        spec = self.catalog.get(model_id)
        if spec is None or model_id not in self.schedulers:
            raise NotFound(
                f"the model {model_id!r} does not exist; GET /v1/models lists the models served",
                param="model",
                code="model_not_found",
            )
        return spec

    def task_model(self, model_id: str | None, task: Task) -> ModelSpec:
        """The model to use for ``task``: the one named, or the task's default."""
        if model_id is None:
            default = self.catalog.default_for(task)
            if default is None or default.id not in self.schedulers:
                kind = task.removeprefix("text-to-")
                raise InvalidRequest(
                    f"no default {kind} model is served; set `model`", param="model"
                )
            return default
        spec = self.model(model_id)
        if spec.task != task:
            raise InvalidRequest(
                f"model {model_id} is a {spec.task} model; use it through its own endpoint",
                param="model",
            )
        return spec

    async def status(self, account: Account) -> dict[str, Any]:
        """Every model's queue, image or video alike (``QueueStats``), per tier name
        rather than priority class; nothing else of a scheduler's stats (job ids) shows."""
        names: dict[int, list[str]] = {}
        for name, tier in self.policy.tiers.items():
            names.setdefault(tier.priority_class, []).append(name)

        def by_tier(values: Mapping[Any, Any]) -> dict[str, Any]:
            return {"/".join(names.get(int(cls), [f"class-{cls}"])): v for cls, v in values.items()}

        async def queue_of(spec: ModelSpec) -> QueueStats | None:
            try:
                stats = await asyncio.wait_for(self.schedulers[spec.id].queue_stats.remote(), 5)
            except Exception as error:  # one scheduler down must not hide the others
                logger.warning("no queue stats from %s: %r", spec.id, error)
                return None
            return stats

        served = self.served_models()
        models: dict[str, Any] = {}
        for spec, queue in zip(served, await asyncio.gather(*map(queue_of, served)), strict=True):
            if queue is None:  # what failed stays in the log, not in the answer
                models[spec.id] = {"task": spec.task, "error": "scheduler unavailable"}
                continue
            models[spec.id] = {
                "task": spec.task,
                "queue_len": queue.queue_len,
                "queue_by_tier": by_tier(queue.queue_by_class),
                "running_by_tier": by_tier(queue.running_by_class),
                "busy_slots": queue.busy_slots,
                "capacity": queue.capacity,
                "replicas": queue.replicas,
                "wait_estimate_s_by_tier": by_tier(queue.wait_estimate_s_by_class),
                "wait_beyond_estimate_s_by_tier": by_tier(queue.wait_beyond_estimate_s_by_class),
                **{decision: by_tier(queue.by_class(decision)) for decision in DECISIONS},
            }
            if queue.step_level:  # a step-level model's workers
                models[spec.id]["step_level"] = queue.step_level | {
                    "first_step_wait_s_by_tier": by_tier(queue.first_step_wait_s_by_class)
                }
        return {
            "object": "status",
            "tier": account.tier,
            "models": models,
            "shed_by_this_router": dict(self.images.shed_by_router),
        }

    def check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"`prompt` must be at most {self.settings.max_prompt_chars} characters, "
                f"got {len(prompt)}",
                param="prompt",
                code="string_above_max_length",
            )

    def moderation_level(self, tier_name: str, requested: Level | None = None) -> Level:
        """The moderation level of a request of ``tier_name`` (400 on ``moderation`` if
        it asks for one its tier does not allow)."""
        terms = self.policy.tier(tier_name).moderation
        return moderation_level(tier_name, terms.default, terms.allow_low, requested)

    def model_object(self, spec: ModelSpec) -> ModelObject:
        return ModelObject(
            id=spec.id,
            created=self.started_at,
            owned_by=spec.owned_by,
            task=spec.task,
            tasks=list(spec.tasks),
        )
