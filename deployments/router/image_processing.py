"""The router's CPU-heavy image work: the image check (moderation), encoding and C2PA
signing, kept off the replica's event loop and, by default, out of its process.

A Python process has one GIL, so work in a thread beside the event loop still takes
turns with the loop. Under a flood of refusals the loop holds it most of the time, and a
paid request's image check (NudeNet, ~40 ms of CPU an image) and signing wait for it
(issue 17's run k: +10.7 and +2.4 ms at the tail). A Router therefore runs them in a
small pool of processes of its own (``RouterSettings.image_processes``), as vLLM keeps
its engine core apart from its API server; 0 runs them in the router's threads (unit
tests, the smallest set-ups). Only plain data crosses: raw pixels in; files, labels and
timings out. A flagged image is refused here, in the router, from the labels returned.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mediagate.moderation.moderator import Moderator, refusal
from mediagate.moderation.prompts import Level
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.errors import GenerationFailed
from mediagate.protocol.media import ImageFormat
from mediagate.protocol.work import RawImage
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import ContentSigner, Provenance
from models.encoding import encode_raw_image, from_raw_image

logger = logging.getLogger(__name__)

Done = TypeVar("Done")


@dataclass(frozen=True)
class Encoding:
    """How images are written: the format, its JPEG/WebP quality, base64 or raw bytes."""

    output_format: ImageFormat
    output_compression: int | None = None
    base64: bool = False  # an inline answer's (done where the file is made)


@dataclass(frozen=True)
class Prepared:
    """An answer's images checked, encoded and signed (or refused: ``flagged`` names
    what was found, and there are no files)."""

    files: list[bytes] = field(default_factory=list)  # base64 text when asked for
    flagged: tuple[str, ...] = ()
    moderate_ms: float = 0.0
    encode_ms: float = 0.0
    sign_ms: float = 0.0


class CheckerAndSigner:
    """What one process holds for the work: the image checker and the signer."""

    def __init__(self, moderator: Moderator, signer: ContentSigner | None) -> None:
        self.moderator = moderator
        self.signer = signer

    def flagged(self, images: list[RawImage], level: Level) -> tuple[str, ...]:
        """What the checker found in ``images`` (empty: nothing)."""
        return self.moderator.flagged_labels([from_raw_image(raw) for raw in images], level)

    def encode(
        self, image: RawImage, encoding: Encoding, provenance: Provenance | None
    ) -> tuple[bytes, float, float]:
        """One image's file (signed when ``provenance`` is given and a signer is set),
        and the ms its encoding and its signing took."""
        started = time.perf_counter()
        data = encode_raw_image(image, encoding.output_format, encoding.output_compression)
        encoded_at = time.perf_counter()
        if self.signer is not None and provenance is not None:
            data = self.signer.sign(data, encoding.output_format, provenance)
        signed_at = time.perf_counter()
        if encoding.base64:
            data = base64.b64encode(data)
        return data, (encoded_at - started) * 1000, (signed_at - encoded_at) * 1000

    def prepare(
        self,
        images: list[RawImage],
        level: Level,
        encoding: Encoding,
        provenance: Provenance | None,
    ) -> Prepared:
        """All checked first (one flagged refuses them all), then each encoded, signed."""
        started = time.perf_counter()
        flagged = self.flagged(images, level)
        moderate_ms = (time.perf_counter() - started) * 1000
        if flagged:
            return Prepared(flagged=flagged, moderate_ms=moderate_ms)
        files, encode_ms, sign_ms = [], 0.0, 0.0
        for image in images:
            data, encoding_ms, signing_ms = self.encode(image, encoding, provenance)
            files.append(data)
            encode_ms += encoding_ms
            sign_ms += signing_ms
        return Prepared(files, (), moderate_ms, encode_ms, sign_ms)


_PROCESS_TOOLS: CheckerAndSigner | None = None  # a pool process's own
POOL_START_TIMEOUT_S = 300.0  # (loading a checker's model from a slow disk)


def _start_pool_process(
    moderation: ModerationSettings, provenance: ProvenanceSettings | None, parent: int
) -> None:
    """A pool process's start: its checker and signer, and a watch that ends it when
    its router is gone (a replica killed outright leaves no one to stop the pool)."""
    global _PROCESS_TOOLS
    signer = ContentSigner.from_files(provenance) if provenance and provenance.enabled else None
    _PROCESS_TOOLS = CheckerAndSigner(Moderator(moderation), signer)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, name="watch-router", daemon=True).start()


def _with_process_tools(work: Callable[..., Done], *args: Any) -> Done:
    """``work`` (a ``CheckerAndSigner`` method) with this pool process's own."""
    assert _PROCESS_TOOLS is not None  # (set when the process started)
    return work(_PROCESS_TOOLS, *args)


class ImageProcessing:
    """Runs ``CheckerAndSigner`` work for the router: in a process pool, or in its
    threads. A pool whose process died is started again, once, by the first request to
    find it broken; requests that meet it broken fail (``GenerationFailed``: a 500,
    nothing charged) rather than wait for the new one."""

    def __init__(
        self,
        tools: CheckerAndSigner | None,
        *,
        checks_images: bool,
        signs: bool,
        start_pool: Callable[[], ProcessPoolExecutor] | None = None,
    ) -> None:
        if (tools is None) == (start_pool is None):
            raise ValueError("image work runs in threads (tools) or in processes (a pool)")
        self._tools = tools
        self._start_pool = start_pool
        self._pool = start_pool() if start_pool else None
        self._restart: asyncio.Task[None] | None = None
        self.checks_images = checks_images
        self.signs = signs

    @classmethod
    def in_threads(cls, moderator: Moderator, signer: ContentSigner | None) -> ImageProcessing:
        """The work in the caller's threads, with these checker and signer."""
        tools = CheckerAndSigner(moderator, signer)
        return cls(tools, checks_images=moderator.checks_images, signs=signer is not None)

    @classmethod
    def in_processes(
        cls,
        processes: int,
        moderation: ModerationSettings,
        provenance: ProvenanceSettings | None,
    ) -> ImageProcessing:
        """``processes`` started now, each with its own checker and signer; one that
        cannot start (a bad key, a checker that does not load) fails this call."""

        def start_pool() -> ProcessPoolExecutor:
            pool = ProcessPoolExecutor(
                processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_pool_process,
                initargs=(moderation, provenance, os.getpid()),
            )
            # (a process that cannot start breaks the pool, whichever answers these)
            pings = [
                pool.submit(_with_process_tools, CheckerAndSigner.flagged, [], "auto")
                for _ in range(processes)
            ]
            try:
                for ping in pings:
                    ping.result(timeout=POOL_START_TIMEOUT_S)
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(
                    "the router's image processes did not start: their image checker or "
                    "signer failed to load (the replica's log has the reason)"
                ) from None
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            return pool

        signs = provenance is not None and provenance.enabled
        return cls(None, checks_images=moderation.checks_images, signs=signs, start_pool=start_pool)

    async def _run(self, work: Callable[..., Done], *args: Any) -> Done:
        """``work`` (a ``CheckerAndSigner`` method) where this runs it."""
        if self._tools is not None:
            return await asyncio.to_thread(work, self._tools, *args)
        pool = self._pool
        if pool is None or (self._restart is not None and not self._restart.done()):
            raise GenerationFailed("the image processes are restarting; please retry")
        try:
            return await asyncio.wrap_future(pool.submit(_with_process_tools, work, *args))
        except BrokenProcessPool:  # a process died (killed, out of memory)
            if self._pool is pool:
                self._pool = None
                # its own task: a caller who leaves meanwhile does not abandon the pool
                self._restart = asyncio.ensure_future(self._restart_pool(pool))
            raise GenerationFailed("the image could not be processed; please retry") from None

    async def _restart_pool(self, broken: ProcessPoolExecutor) -> None:
        logger.error("an image process died; starting the pool again")
        broken.shutdown(wait=False, cancel_futures=True)
        assert self._start_pool is not None
        try:
            self._pool = await asyncio.to_thread(self._start_pool)
        except Exception:  # the next request to find no pool tries again
            logger.exception("the image processes did not start again")
            self._pool = broken

    async def check(self, images: list[RawImage], level: Level, *, param: str | None) -> None:
        """Refuse (``ModerationBlocked``) if the checker flags one of ``images``."""
        if not self.checks_images or not images:
            return
        flagged = await self._run(CheckerAndSigner.flagged, images, level)
        if flagged:
            raise refusal(flagged, level, param=param)

    async def prepare(
        self, images: list[RawImage], level: Level, encoding: Encoding, provenance: Provenance
    ) -> tuple[Prepared, float]:
        """The images checked (one flagged refuses all: ``ModerationBlocked``), then
        encoded and signed; and the ms the hand-over took (the wait for a process, the
        pixels there and the files back)."""
        started = time.perf_counter()
        signed_as = provenance if self.signs else None  # (an edit's parent: not sent idle)
        prepared = await self._run(CheckerAndSigner.prepare, images, level, encoding, signed_as)
        took_ms = (time.perf_counter() - started) * 1000
        if prepared.flagged:
            raise refusal(prepared.flagged, level, param=None)
        worked_ms = prepared.moderate_ms + prepared.encode_ms + prepared.sign_ms
        return prepared, max(0.0, took_ms - worked_ms)

    async def encode(
        self, image: RawImage, encoding: Encoding, provenance: Provenance | None
    ) -> bytes:
        """One file, signed when ``provenance`` is given (and signing is on)."""
        signed_as = provenance if self.signs else None
        data, _, _ = await self._run(CheckerAndSigner.encode, image, encoding, signed_as)
        return bytes(data)

    def close(self) -> None:
        """Stop the processes (the replica is stopping); work in flight is dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
