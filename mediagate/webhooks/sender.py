"""The sender: reads the outbox, takes up due events, delivers each to the endpoints of
its account that want it, and writes back what is left to do.

At least once: an event leaves the outbox only after every endpoint it was meant for
answered 2xx or was given up on. A sender that dies mid-delivery holds its events for
``claim_hold_s``; then any sender (its successor) takes them up again, and the
receivers get the same ``webhook-id`` as before. Endpoints are fixed at an event's first
take-up: one added later gets later events only; one removed or disabled is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter

from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores import JobStore
from mediagate.stores.records import EndpointDelivery, OutboxEvent
from mediagate.webhooks.delivery import ClientFactory, attempt, next_delay_s, plain_client
from mediagate.webhooks.endpoints import StoredEndpoint, WebhookEndpoints
from mediagate.webhooks.settings import WebhookSettings

# An event's time comes from the process that made it (a worker, a scheduler), an
# endpoint's from a router, maybe on another node: an endpoint made this much after an
# event, by the clocks, still gets it, in case the clocks disagree.
CLOCK_SKEW_S = 2.0

logger = logging.getLogger(__name__)


class WebhookSender:
    """Delivers outbox events of ``store`` (one per process that runs ``run``)."""

    def __init__(
        self,
        store: JobStore,
        settings: WebhookSettings,
        *,
        clock: Clock = system_clock,
        new_client: ClientFactory = plain_client,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.endpoints = WebhookEndpoints(store, settings, clock=clock)
        self.claim = f"sender_{secrets.token_hex(6)}"
        self._new_client = new_client
        # delivered, failed (attempts), given_up (deliveries), disabled (endpoints), events
        self.counts: Counter[str] = Counter()

    async def run(self) -> None:
        """Poll the outbox until cancelled; a failing store is logged and retried."""
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("webhook outbox not read: %r", error)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def poll_once(self) -> int:
        """Take up the due events and deliver them; how many were taken up."""
        now = self.clock()
        due = await self.store.due_events(now, self.settings.events_per_poll)
        taken = [
            event
            for event in await asyncio.gather(
                *(
                    self.store.claim_event(
                        e.account_id,
                        e.id,
                        now=now,
                        claim=self.claim,
                        hold_s=self.settings.claim_hold_s,
                    )
                    for e in due
                )
            )
            if event is not None
        ]
        await asyncio.gather(*(self.deliver(event) for event in taken))
        return len(taken)

    async def deliver(self, event: OutboxEvent) -> None:
        """Attempt every delivery of ``event`` that is due, then write it back. With
        delivery switched off, events are dropped as they come (never a backlog sent
        days late when it is switched on again)."""
        if not self.settings.enabled:
            self.counts["dropped"] += 1
            await self.store.finish_event(event, claim=self.claim, done=True)
            return
        endpoints = {e.id: e for e in await self.endpoints.list(event.account_id)}
        now = self.clock()
        if event.deliveries is None:  # the endpoints the account had when it happened
            self.counts["events"] += 1
            deliveries = {
                e.id: EndpointDelivery(next_attempt_at=now)
                for e in endpoints.values()
                if e.status == "enabled"
                and event.type in e.events
                and e.created_at <= event.created_at + CLOCK_SKEW_S
            }
        else:
            deliveries = {k: v.model_copy() for k, v in event.deliveries.items()}
        attempts = []
        for endpoint_id, delivery in deliveries.items():
            if not delivery.pending or delivery.next_attempt_at > now:
                continue
            endpoint = endpoints.get(endpoint_id)
            if endpoint is None or endpoint.status != "enabled":
                delivery.given_up = "endpoint removed" if endpoint is None else "endpoint disabled"
                continue
            attempts.append(self._attempt(event, endpoint, delivery))
        await asyncio.gather(*attempts)
        pending = [d.next_attempt_at for d in deliveries.values() if d.pending]
        updated = event.model_copy(
            update={"deliveries": deliveries, "due_at": min(pending, default=now)}
        )
        if not await self.store.finish_event(updated, claim=self.claim, done=not pending):
            logger.warning("webhook event %s was taken up by another sender", event.id)

    async def _attempt(
        self, event: OutboxEvent, endpoint: StoredEndpoint, delivery: EndpointDelivery
    ) -> None:
        result = await attempt(
            endpoint.url,
            event_id=event.id,
            payload=event.payload,
            secret=endpoint.secret,
            settings=self.settings,
            allowed=self.endpoints.allowed,
            new_client=self._new_client,
            clock=self.clock,
        )
        delivery.attempts += 1
        if result.delivered:
            delivery.delivered_at = self.clock()
            self.counts["delivered"] += 1
            await self.endpoints.record(event.account_id, endpoint.id, delivered=True)
            return
        self.counts["failed"] += 1
        delivery.last_error = result.error
        delay = (
            None
            if result.gone
            else next_delay_s(delivery.attempts, self.settings, result.retry_after_s)
        )
        if delay is not None:
            delivery.next_attempt_at = self.clock() + delay
            await self.endpoints.record(event.account_id, endpoint.id, delivered=False)
            return
        reason = (
            "the endpoint answered 410 Gone"
            if result.gone
            else f"{delivery.attempts} attempts failed over "
            f"{self.clock() - event.created_at:.0f}s (last: {result.error})"
        )
        delivery.given_up = reason
        self.counts["given_up"] += 1
        self.counts["disabled"] += 1
        logger.warning(
            "webhook endpoint %s of account %s disabled: %s", endpoint.id, event.account_id, reason
        )
        await self.endpoints.record(
            event.account_id, endpoint.id, delivered=False, disable_because=reason
        )
