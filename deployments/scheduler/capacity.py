"""How many worker slots a scheduler may fill: RUNNING replicas x slots per replica.

Schedulers dispatch only into free slots, so waiting work waits in their queue
(where priority applies and new replicas can take it), never inside a replica.
The replica count comes from the Serve controller, refreshed four times a second (a
new replica gets work within 0.25 s of running; the autoscaling benchmark counts it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

ReplicaCounter = Callable[[], Awaitable[int]]


def serve_replica_counter(deployment_name: str) -> ReplicaCounter:
    """Counts RUNNING replicas of ``deployment_name`` in this replica's Serve application."""

    async def count() -> int:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[app_name].deployments[deployment_name]
        states = deployment.replica_states.items()
        return sum(count for state, count in states if state == "RUNNING")

    return count


class WorkerSlots:
    """Busy and total slots of one worker deployment; ``changed`` fires when either moves."""

    def __init__(
        self,
        *,
        count_replicas: ReplicaCounter | None,
        slots_per_replica: int = 1,
        refresh_s: float = 1.0,
    ) -> None:
        self.replicas = 1
        self.slots_per_replica = slots_per_replica
        self.busy = 0
        self.changed = asyncio.Event()
        self._count_replicas = count_replicas
        self._refresh_s = refresh_s

    @property
    def capacity(self) -> int:
        return self.replicas * self.slots_per_replica

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.busy)

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
        if self._count_replicas is None:
            return
        while True:
            try:
                replicas = await self._count_replicas()
            except Exception as error:  # the controller may be briefly unreachable
                logger.warning("could not count worker replicas: %s", error)
            else:
                if replicas != self.replicas:
                    self.replicas = replicas
                    self.changed.set()
            await asyncio.sleep(self._refresh_s)
