"""The Serve controller as the router reaches it for operator requests: the same two
calls the dashboard's REST API makes (application details; apply a whole config), made
to the controller actor directly, so the router needs neither the dashboard's address
nor the cluster's token. Ray 2.60's controller API (RAY_SERVE_NOTES.md)."""

from __future__ import annotations

from typing import Any

import ray


class RayServeControl:
    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._controller: Any = None

    @classmethod
    def of_this_replica(cls) -> RayServeControl | None:
        """The control for the application this replica belongs to; ``None`` outside one."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            return cls(serve.get_replica_context().app_name)
        except RayServeException:
            return None

    def _actor(self) -> Any:
        if self._controller is None:
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return self._controller

    async def details(self) -> dict[str, Any]:
        try:
            return dict(await self._actor().get_serve_instance_details.remote())
        except ray.exceptions.RayActorError:  # a restarted controller: look it up again
            self._controller = None
            raise

    async def deploy(self, config: dict[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        await self._actor().apply_config.remote(ServeDeploySchema.model_validate(config))
