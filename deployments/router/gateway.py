"""The router's behaviour, independent of Ray: authentication (with an outage cache), model
resolution, image requests from refusal or reservation to the answer, and the status
view. Tests drive it with fake handles.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from deployments.router.settings import RouterSettings
from deployments.router.videos import VideoJobs
from deployments.scheduler.admission import count_forwarded, shed_on_published_load
from mediagate.access.accounts import Account, AccountStore, hash_key
from mediagate.access.guard import TierGuard, rate_limit_headers
from mediagate.access.idempotency import IdempotencyKeys
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import TierPolicy, check_image_caps, load_tier_policy
from mediagate.protocol.catalog import Catalog, ModelSpec, Task
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import (
    InvalidRequest,
    MediagateError,
    ModelUnavailable,
    NotFound,
    Overloaded,
    Unauthorized,
    unwrap,
)
from mediagate.protocol.images import ImageData, ImageGenerationRequest, ImagesResponse
from mediagate.protocol.listing import ModelObject
from mediagate.protocol.scheduling import DECISIONS, PublishedLoad, QueueStats
from mediagate.protocol.timing import SERVER_TIMING_HEADER, server_timing
from mediagate.protocol.work import ImageJob, ImageResult, draw_seed
from mediagate.stores import (
    JobStore,
    StoreUnavailable,
)
from mediagate.stores.artifacts import (
    ArtifactStore,
)
from models.encoding import encode_raw_image

logger = logging.getLogger(__name__)


# While the state store is down, a key this router verified within this long keeps
# working (a Redis restart does not log every caller out); never one it saw revoked.
AUTH_STALE_IF_ERROR_S = 60.0


# A key's account (tier included) is looked up in the store at most once per this long
# per router replica: a revoked key or a tier change takes effect within it.
AUTH_CACHE_S = 2.0


WORKER_HEADER = "x-mediagate-worker"  # the worker replica that made the images


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
        clock: Clock = system_clock,
    ) -> None:
        self.catalog = catalog
        self.schedulers = dict(schedulers)
        self.accounts = accounts
        self.artifacts = artifacts
        self.jobs = jobs
        self.guard = guard or TierGuard(QuotaLedger(jobs, load_tier_policy(), clock=clock))
        self.idempotency = IdempotencyKeys(jobs, clock=clock)
        self.settings = settings
        self.clock = clock
        self.started_at = int(clock())
        # Accounts last seen per key hash, used only while the store is unreachable.
        self._seen: dict[str, tuple[Account, float]] = {}
        # Per image model: the load its scheduler last published, and when it arrived.
        self._published_load: dict[str, tuple[PublishedLoad, float]] = {}
        self._load_reads: dict[str, asyncio.Task[None]] = {}  # refreshes under way
        self.shed_by_router: Counter[str] = Counter()  # per tier, this replica only
        self.videos = VideoJobs(self)

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

    @property
    def policy(self) -> TierPolicy:
        return self.guard.ledger.policy

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

    async def generate_images(
        self,
        account: Account,
        body: ImageGenerationRequest,
        *,
        request_id: str,
        base_url: str,
        decided: Callable[[], None] = lambda: None,
        received: float | None = None,
    ) -> tuple[ImagesResponse, dict[str, str]]:
        """Check, refuse early or reserve, generate, then commit (or release on any
        failure). ``decided`` is called once the request is refused or goes on;
        ``received`` (``time.perf_counter()`` when the body was read) starts the
        ``Server-Timing`` of the answer."""
        received = time.perf_counter() if received is None else received
        try:
            self.check_prompt(body.prompt)
            spec = self.task_model(body.model, "text-to-image")
            tier = self.policy.tier(account.tier)
            job = ImageJob(
                request_id=request_id,
                seed=draw_seed(body.seed),
                output_format=body.output_format,
                output_compression=body.output_compression,
                account_id=account.id,
                priority_class=tier.priority_class,
                max_wait_s=tier.max_queue_wait_s,
                max_queued=tier.max_queued,
                **body.to_pipeline_kwargs(spec),
            )
            check_image_caps(
                account.tier,
                tier,
                n=job.images,
                width=job.width,
                height=job.height,
                steps=job.num_inference_steps,
            )
            self.refuse_if_overloaded(spec.id, job, account.tier)
        finally:
            decided()
        admission = await self.guard.admit(account, kind="image", units=job.images)
        delivered = spent = False
        try:
            forwarded = time.perf_counter()
            try:
                result: ImageResult = await self.schedulers[spec.id].submit.remote(job)
            except asyncio.CancelledError:  # the caller went away
                spent = await self._started_before_leaving(spec.id, account.id, request_id)
                raise
            except Exception as error:
                if isinstance(unwrap(error), MediagateError):
                    raise unwrap(error) from None
                logger.error("scheduler of %s unreachable: %r", spec.id, error)
                raise ModelUnavailable(
                    f"model {spec.id} is restarting; please retry shortly", retry_after_s=2
                ) from error
            answered = time.perf_counter()
            self._refresh_load_now(spec.id)  # a slot just freed: the copy overstates
            try:
                data, encode_ms = await asyncio.to_thread(
                    self._deliver_images, result, body, base_url
                )
            except asyncio.CancelledError:  # left while its images were encoded: work done
                spent = True
                raise
            delivered = True  # (a failure to encode or store them is ours: not charged)
        finally:  # failures, shedding and callers who left before their work began
            await self.guard.settle(admission, charge=delivered or spent)  # give quota back
        response = ImagesResponse(
            created=int(self.clock()),
            data=data,
            output_format=body.output_format,
            size=f"{job.width}x{job.height}",
            quality=body.quality,
        )
        headers = rate_limit_headers(admission.usage)
        if result.worker:
            headers[WORKER_HEADER] = result.worker
        scheduler_ms = sum(
            result.timings_ms.get(stage, 0.0) for stage in ("queue", "dispatch", "pipeline")
        )
        headers[SERVER_TIMING_HEADER] = server_timing(
            {
                **result.timings_ms,
                "router": (forwarded - received) * 1000,
                "to_scheduler": max(0.0, (answered - forwarded) * 1000 - scheduler_ms),
                "encode": encode_ms,
                "respond": max(0.0, (time.perf_counter() - answered) * 1000 - encode_ms),
            }
        )
        return response, headers

    def refuse_if_overloaded(self, model_id: str, job: ImageJob, tier_name: str) -> None:
        """Refuse here, before any quota write or hop, what the scheduler would refuse:
        its decision, from the load it last published, updated for the requests this
        router forwarded since."""
        published = self._published_load.get(model_id)
        if published is None:
            return
        load, received_at = published
        try:
            shed_on_published_load(
                load,
                priority_class=job.priority_class,
                batch_key=job.batch_key,
                account_id=job.account_id,
                max_wait_s=job.max_wait_s,
                max_queued=job.max_queued,
                age_s=self.clock() - received_at,
                max_age_s=self.settings.load_max_age_s,
            )
        except Overloaded:
            self.shed_by_router[tier_name] += 1
            raise
        count_forwarded(load, priority_class=job.priority_class, account_id=job.account_id)

    async def _started_before_leaving(
        self, model_id: str, account_id: str, request_id: str
    ) -> bool:
        """Whether a request whose caller left had already started running: its quota is
        spent then (a loop of request-and-disconnect must not burn GPU time for free)."""
        try:
            withdrawal = self.schedulers[model_id].withdraw.remote(account_id, request_id)
            return bool(await asyncio.wait_for(withdrawal, 2))
        except Exception as error:  # the scheduler is gone: its work is lost, not charged
            logger.warning("could not withdraw %s: %r", request_id, error)
            return False

    async def follow_load(self) -> None:
        """Keep a fresh copy of every image scheduler's published load (runs for the
        router's lifetime); a scheduler that does not answer is simply not used."""
        while True:
            image_models = [s.id for s in self.served_models() if s.task == "text-to-image"]
            # all at once: one slow scheduler must not delay the others' fresh loads
            await asyncio.gather(*(self._read_load(model_id) for model_id in image_models))
            await asyncio.sleep(self.settings.load_refresh_s)

    def _refresh_load_now(self, model_id: str) -> None:
        """Read ``model_id``'s load now rather than at the next refresh (one read at a
        time per model): the copy counts what this router forwarded but not what was
        answered since, and right after an answer it would refuse work a free slot
        could take."""
        if model_id in self._published_load and model_id not in self._load_reads:
            read = asyncio.create_task(self._read_load(model_id))
            self._load_reads[model_id] = read
            read.add_done_callback(lambda _: self._load_reads.pop(model_id, None))

    async def _read_load(self, model_id: str) -> None:
        try:
            load = await asyncio.wait_for(self.schedulers[model_id].published_load.remote(), 2)
        except Exception as error:
            logger.debug("no load from %s: %r", model_id, error)
        else:
            self._published_load[model_id] = (load, self.clock())

    def _deliver_images(
        self, result: ImageResult, body: ImageGenerationRequest, base_url: str
    ) -> tuple[list[ImageData], float]:
        """Encode the worker's pixels as asked, then store them (URLs) or inline them
        (base64); runs in a thread, off the event loop. Returns the encoding time too."""
        started = time.perf_counter()
        encoded = [
            encode_raw_image(raw, body.output_format, body.output_compression)
            for raw in result.images
        ]
        encode_ms = (time.perf_counter() - started) * 1000
        if body.response_format == "b64_json":
            data = [ImageData(b64_json=base64.b64encode(image).decode()) for image in encoded]
        else:
            data = [self._stored(image, body, base_url) for image in encoded]
        return data, encode_ms

    def _stored(self, image: bytes, body: ImageGenerationRequest, base_url: str) -> ImageData:
        artifact_id = self.artifacts.put(image, body.output_format, "img")
        return ImageData(url=self.artifacts.url(artifact_id, self.settings.url_ttl_s, base_url))

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
        return {
            "object": "status",
            "tier": account.tier,
            "models": models,
            "shed_by_this_router": dict(self.shed_by_router),
        }

    def check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"`prompt` must be at most {self.settings.max_prompt_chars} characters, "
                f"got {len(prompt)}",
                param="prompt",
                code="string_above_max_length",
            )

    def model_object(self, spec: ModelSpec) -> ModelObject:
        return ModelObject(
            id=spec.id, created=self.started_at, owned_by=spec.owned_by, task=spec.task
        )
