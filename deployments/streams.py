"""Asyncio plumbing for streamed answers (items handed over while a result forms) and for
the bookkeeping a request owes after its caller left."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


async def items_until(
    done: asyncio.Future[Any], items: asyncio.Queue[ItemT]
) -> AsyncIterator[ItemT]:
    """Each item put on ``items`` until ``done`` completes, then those still queued
    (nothing is lost to the race between the last item and the end). ``done``'s result
    or exception is left to the caller."""
    while not done.done():
        getter = asyncio.ensure_future(items.get())
        try:
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            yield getter.result()
    while not items.empty():
        yield items.get_nowait()


_DETACHED: set[asyncio.Task[Any]] = set()  # referenced until done (asyncio keeps weak refs)


def detached(work: Coroutine[Any, Any, ResultT]) -> asyncio.Task[ResultT]:
    """``work`` as a task outside the current Serve request's context. When a request
    is cancelled (its client hung up), Serve cancels the handle calls it made, its
    "children", even those made after the cancellation: the bookkeeping the request
    owes then (asking its scheduler whether the work had started, settling its quota)
    must not be one of them."""
    task = contextvars.Context().run(asyncio.ensure_future, work)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    return task


async def finish_regardless(work: Coroutine[Any, Any, Any]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (bookkeeping a
    stream owes however it ends: ``work`` goes on in a detached task). A cancellation of
    the caller is not raised here: the caller is already on its way out."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(detached(work))
