"""What operator keys see and change (``/v1/ops/*``): the queues of ``GET /v1/status``
with each model's replicas against its autoscaling limits, the recent operator changes,
and live limit changes, checked and audited as ``mediagate scale set`` does
(``autoscaling.limits``, ``mediagate.access.audit``). Ray-free: the Serve controller is
reached through ``ServeControl`` (``serve_control.RayServeControl`` in the cluster)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from autoscaling.limits import ScaleChange, ScaleError, changed_deployment, scale_rows
from mediagate.access.accounts import Account
from mediagate.access.audit import (
    AUDIT_ACCOUNT,
    AUDIT_DOCUMENT,
    appended,
    audit_entry,
    read_entries,
)
from mediagate.protocol.clock import Clock
from mediagate.protocol.errors import Conflict, ControlUnavailable, Forbidden, InvalidRequest
from mediagate.protocol.ops import LimitsChange, LimitsChanged, OpsStatus, ScalingRow
from mediagate.stores import JobStore

logger = logging.getLogger(__name__)

RECENT_CHANGES = 20
CONTROLLER_TIMEOUT_S = 10.0


class ServeControl(Protocol):
    """The Serve controller, as the dashboard's REST API offers it."""

    app_name: str

    async def details(self) -> dict[str, Any]:
        """``GET /api/serve/applications/``'s answer."""

    async def deploy(self, config: dict[str, Any]) -> None:
        """``PUT /api/serve/applications/``: deploy the whole config."""


def require_operator(account: Account) -> None:
    if account.role != "operator":
        raise Forbidden(
            "this endpoint is for operator keys (mediagate keys create --role operator)",
            code="operator_key_required",
        )


class Operations:
    def __init__(
        self,
        *,
        control: ServeControl | None,
        jobs: JobStore,
        clock: Clock,
        limit_changes: bool,
        free_class: Callable[[], int],
    ) -> None:
        self.control = control
        self.jobs = jobs
        self.clock = clock
        self.limit_changes = limit_changes and control is not None
        self._free_class = free_class  # the lowest priority class of the tier policy
        self._change_lock = asyncio.Lock()  # one change at a time per router replica

    async def status(self, queues: dict[str, Any]) -> OpsStatus:
        """``queues``: the models of ``Gateway.status``."""
        rows: list[ScalingRow] = []
        error = None
        if self.control is None:
            error = "no Serve controller in reach (not running on Ray Serve)"
        else:
            try:
                details = await asyncio.wait_for(self.control.details(), CONTROLLER_TIMEOUT_S)
            except Exception as failure:  # the queues still show
                logger.warning("no Serve details for the operations view: %r", failure)
                error = "the Serve controller did not answer; retry shortly"
            else:
                rows = [
                    ScalingRow.model_validate(row)
                    for row in scale_rows(details, self.control.app_name, {})
                ]
        return OpsStatus(
            at=self.clock(),
            models=queues,
            scaling=rows,
            scaling_error=error,
            limit_changes_allowed=self.limit_changes,
            recent_changes=await self.recent_changes(),
        )

    async def recent_changes(self) -> list[dict[str, Any]]:
        entries = await self.jobs.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, read_entries)
        return list(reversed(entries[-RECENT_CHANGES:]))

    async def change_limits(self, account: Account, wanted: LimitsChange) -> LimitsChanged:
        """Apply ``wanted`` as a lightweight update of the deployed config, audited under
        the operator's account name; a change that fails the checks changes nothing."""
        if not self.limit_changes or self.control is None:
            raise Conflict(
                "limit changes from the console are off here (ops_limit_changes, or no Serve "
                "controller); use `mediagate scale set`",
                code="limit_changes_disabled",
            )
        change = ScaleChange(
            model=wanted.model,
            min_replicas=wanted.min_replicas,
            max_replicas=wanted.max_replicas,
            target=wanted.target_ongoing_requests,
            free_weight=wanted.free_weight,
            allow_zero_images=wanted.allow_zero,
        )
        async with self._change_lock:
            try:
                details = await asyncio.wait_for(self.control.details(), CONTROLLER_TIMEOUT_S)
            except Exception as failure:
                logger.warning("no Serve details for a limit change: %r", failure)
                raise ControlUnavailable(
                    "the Serve controller did not answer; nothing was changed, retry shortly",
                    retry_after_s=5,
                ) from None
            try:
                config, lines = changed_deployment(
                    details, self.control.app_name, change, free_class=self._free_class()
                )
            except ScaleError as error:
                raise InvalidRequest(str(error), param="model", code="invalid_limits") from None
            if lines:
                try:
                    await asyncio.wait_for(self.control.deploy(config), CONTROLLER_TIMEOUT_S)
                except Exception as failure:  # it may still have been applied: say so
                    logger.error("a limit change may not have been deployed: %r", failure)
                    await self._audit(account, [f"{line} (outcome unknown)" for line in lines])
                    raise ControlUnavailable(
                        "the Serve controller did not confirm the change; it may or may not "
                        "be applied: see `mediagate scale show` or the operations view",
                        retry_after_s=5,
                    ) from None
                await self._audit(account, lines)
        return LimitsChanged(model=wanted.model, changes=lines)

    async def _audit(self, account: Account, lines: list[str]) -> None:
        """The change in the operators' trail; a trail that cannot be written does not
        undo a change the cluster already runs (it goes to the log instead)."""
        logger.info("limits changed by %s: %s", account.name, "; ".join(lines))
        entry = audit_entry(f"{account.name} (console)", lines, self.clock())
        try:
            await self.jobs.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, appended(entry))
        except Exception as error:
            logger.error("limit change not written to the audit trail: %r", error)
