"""How many worker slots a scheduler may fill: RUNNING replicas x slots per replica.

Schedulers dispatch only into free slots, so waiting work waits in their queue
(where priority applies and new replicas can take it), never inside a replica.
The replica count is pushed by the Serve controller, through the same long poll that
Serve's own handles follow to learn where they may route (nothing is polled; a new
replica gets work as soon as handles could reach it). Should that internal interface
move in a later Ray, the scheduler falls back to asking ``serve.status()`` every
``FALLBACK_REFRESH_S``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

ReplicaCounter = Callable[[], Awaitable[int]]
# Runs for the scheduler's lifetime, calling back with every new replica count.
ReplicaFollower = Callable[[Callable[[int], None]], Awaitable[None]]
FALLBACK_REFRESH_S = 2.0


def serve_replica_counter(deployment_name: str) -> ReplicaCounter:
    """Counts RUNNING replicas of ``deployment_name`` in this replica's Serve application
    (one ``serve.status()``: every application's state, so only as a fallback)."""

    async def count() -> int:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[app_name].deployments[deployment_name]
        states = deployment.replica_states.items()
        return sum(count for state, count in states if state == "RUNNING")

    return count


def serve_replica_follower(deployment_name: str) -> ReplicaFollower:
    """Follows the running replicas of ``deployment_name`` (in this replica's Serve
    application) as the controller pushes them to handles: its ``DEPLOYMENT_TARGETS``
    long poll, which answers only when the set changes."""

    async def follow(on_count: Callable[[int], None]) -> None:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        try:
            loop = asyncio.get_running_loop()
            client = await asyncio.to_thread(
                _targets_client, deployment_name, app_name, on_count, loop
            )
        except Exception as error:  # this Ray moved the interface, or the controller is away
            logger.warning("no replica push from the controller (%r): polling serve.status", error)
        else:
            try:
                # it turns itself off for good on some errors, and has no event for it
                while client.is_running:  # noqa: ASYNC110
                    await asyncio.sleep(5.0)
            finally:
                client.stop()
            logger.warning("the replica push stopped: polling serve.status")
        counter = serve_replica_counter(deployment_name)
        await poll_replicas(counter, FALLBACK_REFRESH_S, on_count)

    return follow


def _targets_client(
    deployment_name: str,
    app_name: str,
    on_count: Callable[[int], None],
    loop: asyncio.AbstractEventLoop,
) -> Any:
    """A long-poll client of the controller's ``DEPLOYMENT_TARGETS`` for one deployment,
    calling back on ``loop`` (its set-up blocks on the controller: run it in a thread)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.long_poll import LongPollClient, LongPollNamespace
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller  # type: ignore[union-attr]
    key = (LongPollNamespace.DEPLOYMENT_TARGETS, DeploymentID(deployment_name, app_name))
    # Ray's own routers key it the same way (its annotation says str, the code not)
    listeners: dict[Any, Callable[[Any], None]] = {
        key: lambda targets: on_count(len(targets.running_replicas))
    }
    return LongPollClient(
        controller,
        listeners,
        call_in_event_loop=loop,
        client_id=f"mediagate-slots:{app_name}:{deployment_name}",
    )


async def poll_replicas(
    count_replicas: ReplicaCounter, refresh_s: float, on_count: Callable[[int], None]
) -> None:
    """A follower made of a counter asked every ``refresh_s``."""
    while True:
        try:
            on_count(await count_replicas())
        except Exception as error:  # the controller may be briefly unreachable
            logger.warning("could not count worker replicas: %s", error)
        await asyncio.sleep(refresh_s)


class WorkerSlots:
    """Busy and total slots of one worker deployment; ``changed`` fires when either moves."""

    def __init__(
        self,
        *,
        count_replicas: ReplicaCounter | None = None,
        follow_replicas: ReplicaFollower | None = None,
        slots_per_replica: int = 1,
        refresh_s: float = 1.0,
    ) -> None:
        self.replicas = 1
        self.slots_per_replica = slots_per_replica
        self.busy = 0
        self.changed = asyncio.Event()
        self._count_replicas = count_replicas
        self._follow_replicas = follow_replicas
        self._refresh_s = refresh_s

    @property
    def capacity(self) -> int:
        return self.replicas * self.slots_per_replica

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.busy)

    @property
    def for_estimates(self) -> int:
        """Slots wait estimates count on: a worker deployment scaled to zero gets a
        replica as soon as work waits, so it counts as one rather than as no capacity
        (which would refuse every job and never wake the autoscaler)."""
        return max(1, self.capacity)

    def acquire(self) -> None:
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        self.changed.set()

    def set_slots_per_replica(self, slots: int) -> None:
        self.slots_per_replica = slots
        self.changed.set()

    async def watch(self) -> None:
        """Follow the replica count for as long as the scheduler lives."""
        if self._follow_replicas is not None:
            await self._follow_replicas(self._set_replicas)
        elif self._count_replicas is not None:
            await poll_replicas(self._count_replicas, self._refresh_s, self._set_replicas)

    def _set_replicas(self, replicas: int) -> None:
        if replicas != self.replicas:
            self.replicas = replicas
            self.changed.set()
