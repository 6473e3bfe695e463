"""Router: the Serve ingress deployment (FastAPI). Thin by design, and free of torch and
diffusers: it builds the gateway from its arguments, serves the routes, reloads the tier
policy live and sweeps expired files.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import ray
from fastapi import FastAPI

from autoscaling.naming import scheduler_name
from deployments.router.gateway import Gateway
from deployments.router.image_processing import ImageProcessing
from deployments.router.metrics import RouterMetrics
from deployments.router.routes import create_api
from deployments.router.serve_control import RayServeControl
from deployments.router.settings import RouterSettings
from mediagate.access.accounts import open_account_store
from mediagate.access.guard import TierGuard
from mediagate.access.idempotency import IDEMPOTENCY_TTL_S
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import load_tier_policy, parse_tier_policy
from mediagate.moderation.moderator import Moderator
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.catalog import LiveModel
from mediagate.protocol.clock import Clock, system_clock
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import ContentSigner
from mediagate.settings import HomeLayout
from mediagate.stores import (
    StateConfig,
    open_state_store,
)
from mediagate.stores.artifacts import (
    ArtifactConfig,
    open_artifact_store,
)
from mediagate.webhooks.settings import WebhookSettings
from models.catalog import load_catalog

logger = logging.getLogger(__name__)


CHECKPOINT_TTL_S = 86_400  # video checkpoints older than this belong to no running job


def live_scheduler(entry: LiveModel) -> Any:
    """The handle of a live model's scheduler, in the application that holds it."""
    from ray import serve

    # Unchecked: a check is a blocking call to the controller, on the event loop, while
    # the controller applies the very deploy that made this reconfigure.
    return serve.get_deployment_handle(
        scheduler_name(entry.spec.id), app_name=entry.app, _check_exists=False
    )


def checks_and_signing(
    moderation: ModerationSettings | None,
    provenance: ProvenanceSettings | None,
    settings: RouterSettings | None,
) -> tuple[Moderator, ImageProcessing]:
    """The router's moderator (its prompts, and its images when it has no image
    processes) and its image checks, encoding and signing: in processes of their own
    (the settings' ``image_processes``, each loading its own checker), or in its threads
    with that same moderator when that is 0."""
    moderation = moderation or ModerationSettings(enabled=False)
    signing = provenance if provenance is not None and provenance.enabled else None
    # here too, so that a key that does not match its certificate says so at start
    signer = ContentSigner.from_files(signing) if signing else None
    processes = (settings or RouterSettings()).image_processes
    if processes == 0:
        moderator = Moderator(moderation)
        return moderator, ImageProcessing.in_threads(moderator, signer)
    prompts_only = Moderator(moderation.model_copy(update={"image_checker": "none"}))
    return prompts_only, ImageProcessing.in_processes(processes, moderation, signing)


class Router:
    """Serve ingress deployment; the builder wraps it with ``serve.ingress()``.

    Its ``user_config`` carries the tier policy (``tiers_file`` or inline
    ``tiers``): a ``serve deploy`` that changes it reloads the policy in place.
    """

    def __init__(
        self,
        schedulers: dict[str, Any],
        *,
        home: str,
        state: StateConfig,
        artifacts: ArtifactConfig,
        catalog: str | None = None,
        settings: RouterSettings | None = None,
        tiers_file: str | None = None,
        accounts: Any = None,
        webhooks: Any = None,
        webhook_settings: WebhookSettings | None = None,
        provenance: ProvenanceSettings | None = None,
        moderation: ModerationSettings | None = None,
        clock: Clock = system_clock,
    ) -> None:
        HomeLayout(home).root.mkdir(parents=True, exist_ok=True)
        jobs = open_state_store(state)
        moderator, image_processing = checks_and_signing(moderation, provenance, settings)
        self.ledger = QuotaLedger(jobs, load_tier_policy(tiers_file), clock=clock)
        self.gateway = Gateway(
            catalog=load_catalog(catalog),
            schedulers=schedulers,
            accounts=accounts or open_account_store(state, clock=clock),
            artifacts=open_artifact_store(artifacts, clock=clock),
            jobs=jobs,
            settings=settings or RouterSettings(),
            guard=TierGuard(self.ledger),
            serve_control=RayServeControl.of_this_replica(),
            webhook_settings=webhook_settings,
            webhook_sender=webhooks,
            moderator=moderator,
            image_processing=image_processing,
            clock=clock,
        )
        if ray.is_initialized():  # a replica (not a router built by hand in a test)
            self.gateway.on_refusal = RouterMetrics().refused
        # Everything loaded so far (FastAPI, pydantic, Ray) lives as long as the replica:
        # keep it out of the garbage collector's full passes, which would walk it all on
        # the event loop. (Kept for every overload measurement in BENCHMARKS.md; its own
        # effect was not measured separately.)
        gc.freeze()

    def __del__(self) -> None:  # Serve's graceful stop of the replica
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.image_processing.close()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Reload the tier policy from ``tiers`` (inline) or ``tiers_file``, and route the
        models served as applications of their own (``live_models``: model id ->
        ``LiveModel``, what ``mediagate models`` writes). Async: on the replica's event
        loop, where requests read the routes (a sync one would run on a thread)."""
        live = {
            model_id: LiveModel.model_validate(entry)
            for model_id, entry in (config.get("live_models") or {}).items()
        }
        changed = self.gateway.route_live_models(live, scheduler_of=live_scheduler)
        for model_id in changed:
            entry = live.get(model_id)
            logger.info(
                "model %s: %s",
                model_id,
                "not served"
                if entry is None or not entry.accepting
                else f"version {entry.spec.version} from application {entry.app}",
            )
        if config.get("tiers"):
            self.ledger.policy = parse_tier_policy(config["tiers"])
        elif config.get("tiers_file"):
            self.ledger.policy = load_tier_policy(config["tiers_file"])
        else:
            return
        logger.info("tier policy loaded: %s", ", ".join(self.ledger.policy.tiers))

    def status(self) -> dict[str, Any]:
        """Counters of admissions, settlements and store-outage decisions."""
        return dict(self.gateway.guard.counters)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.gateway, background=[self._sweep, self.gateway.images.follow_load])

    async def _sweep(self) -> None:
        """Delete image files whose URLs have expired (with a minute's grace), the files
        and records of videos whose content has expired, expired account documents
        (Idempotency-Key records, quota windows), the answers kept for expired keys, and
        video checkpoints left by jobs that ended without their worker (a day old: a
        running job's is replaced every few steps)."""
        gateway = self.gateway
        settings = gateway.settings
        while True:
            try:
                images = await asyncio.to_thread(
                    gateway.artifacts.delete_older_than, settings.url_ttl_s + 60, "img"
                )
                videos = await gateway.videos.purge_expired()
                documents = await gateway.jobs.purge_expired_documents()
                answers = await asyncio.to_thread(
                    gateway.artifacts.delete_older_than, IDEMPOTENCY_TTL_S + 60, "ans"
                )
                await asyncio.to_thread(
                    gateway.artifacts.delete_older_than, CHECKPOINT_TTL_S, "ckp"
                )
            except Exception as error:  # a store outage must not end the sweep
                logger.warning("artifact sweep failed: %r", error)
            else:
                if images or videos or documents or answers:
                    logger.info(
                        "removed %d expired images, %d videos, %d account documents and "
                        "%d kept answers",
                        images,
                        videos,
                        documents,
                        answers,
                    )
            await asyncio.sleep(settings.artifact_sweep_s)
