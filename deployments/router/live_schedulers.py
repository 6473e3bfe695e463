"""Calls to a model's scheduler that follow the model to its live version: a scheduler
whose version was swapped out (``mediagate models swap``) refuses new work with
``ModelMoved`` until this router has heard of the new one (its ``user_config``, within
moments); the call is then made again there. Nothing was queued or charged by the
refusal, so sending it again is safe. A caller who leaves is withdrawn from the
scheduler the call reached (``started_before_leaving``), not from the live one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from mediagate.protocol.errors import ModelMoved, ModelRemoved, caused_by

Answer = TypeVar("Answer")
logger = logging.getLogger(__name__)

# How long a router waits to hear of the version that took over, before it answers
# the refusal (a 503 to retry shortly).
MOVED_WAIT_S = 10.0
MOVED_RETRY_S = 0.1


async def on_live_scheduler(
    schedulers: Callable[[], Mapping[str, Any]],
    model_id: str,
    call: Callable[[Any], Awaitable[Answer]],
    *,
    wait_s: float = MOVED_WAIT_S,
) -> Answer:
    """``call(scheduler)`` on ``model_id``'s live scheduler (``schedulers()`` is asked
    again each time: the router's reconfigure replaces the mapping)."""
    deadline = time.monotonic() + wait_s
    while True:
        scheduler = schedulers().get(model_id)
        if scheduler is None:  # taken out of service meanwhile
            raise ModelRemoved(
                f"the model {model_id!r} was taken out of service; GET /v1/models lists "
                "the models served",
                param="model",
            )
        try:
            return await call(scheduler)
        except Exception as error:
            if not caused_by(error, ModelMoved) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(MOVED_RETRY_S)


async def started_before_leaving(scheduler: Any, account_id: str, request_id: str) -> bool:
    """Whether a request whose caller left had already started running on ``scheduler``
    (the one it was sent to; None: never sent): its quota is spent then (a loop of
    request-and-disconnect must not burn GPU time for free)."""
    if scheduler is None:
        return False
    try:
        withdrawal = scheduler.withdraw.remote(account_id, request_id)
        return bool(await asyncio.wait_for(withdrawal, 2))
    except Exception as error:  # the scheduler is gone: its work is lost, not charged
        logger.warning("could not withdraw %s: %r", request_id, error)
        return False
