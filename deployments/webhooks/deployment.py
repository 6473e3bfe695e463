"""Webhooks: the deployment that delivers outbox events (one replica is enough; more
share the outbox through its claims). It takes no requests but ``status``; its loop
starts with the replica, so a restarted replica carries on where its predecessor's
claims run out."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Any

from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores import JobStore, StateConfig, given_or_opened, open_state_store
from mediagate.webhooks.sender import WebhookSender
from mediagate.webhooks.settings import WebhookSettings

logger = logging.getLogger(__name__)


class Webhooks:
    """Runs a ``WebhookSender`` over the state store for the replica's lifetime."""

    def __init__(
        self,
        *,
        state: StateConfig | None = None,
        settings: WebhookSettings | None = None,
        store: JobStore | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.settings = settings or WebhookSettings()
        self.sender = WebhookSender(
            given_or_opened(store, state, open_state_store, "state"), self.settings, clock=clock
        )
        self._task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # Serve constructs us on the replica's loop
            asyncio.get_running_loop().call_soon(self._ensure_started)

    def _ensure_started(self) -> None:
        """Start the sender's loop (again, if it ended)."""
        if self._task is not None and not self._task.done():
            return
        if self._task is not None and not self._task.cancelled() and self._task.exception():
            logger.error("webhook sender stopped: %r; starting it again", self._task.exception())
        # outside any caller's context: Serve cancels what a cancelled request started
        self._task = contextvars.Context().run(asyncio.create_task, self.sender.run())
        logger.info("webhook sender %s started", self.sender.claim)

    async def check_health(self) -> None:
        """Serve's periodic health check, on the replica's loop: it also starts the loop.
        (A replica that replaced a dead one does not always run what its constructor
        scheduled until something calls it; nothing calls this deployment but this.)"""
        self._ensure_started()

    async def status(self) -> dict[str, Any]:
        """Counts since this replica started: events taken up, attempts delivered and
        failed, deliveries given up, endpoints disabled, events dropped (delivery off)."""
        self._ensure_started()
        return {"enabled": self.settings.enabled, **self.sender.counts}
