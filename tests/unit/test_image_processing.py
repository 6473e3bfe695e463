"""The router's image processes: they check, encode and sign exactly as its threads
would; a flagged image is refused in the router from the labels they return; a process
that dies fails only the request it held and the next one is served by a new pool; and
they end when their router is killed outright."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from deployments.router.image_processing import Encoding, ImageProcessing
from mediagate.moderation.moderator import Moderator
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.errors import GenerationFailed, ModerationBlocked
from mediagate.protocol.work import RawImage
from mediagate.provenance.certificates import ensure_local_certificate
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import Provenance, read_manifest
from models.encoding import to_raw_image

CHECKER = "tests.moderation_checkers:FlagsBrightRed"
MODERATION = ModerationSettings(image_checker=CHECKER)


def solid(color: tuple[int, int, int]) -> RawImage:
    return to_raw_image(Image.new("RGB", (32, 32), color))


@pytest.fixture(scope="module")
def provenance(tmp_path_factory: pytest.TempPathFactory) -> ProvenanceSettings:
    files = ensure_local_certificate(tmp_path_factory.mktemp("secrets"))
    return ProvenanceSettings(certificate_chain=str(files.chain), private_key=str(files.key))


@pytest.fixture(scope="module")
def in_processes(provenance: ProvenanceSettings) -> Iterator[ImageProcessing]:
    processing = ImageProcessing.in_processes(1, MODERATION, provenance)
    yield processing
    processing.close()


def test_processes_write_the_same_files_as_threads_and_sign_them(
    in_processes: ImageProcessing,
) -> None:
    dark = [solid((20, 30, 40)), solid((90, 10, 10))]
    unsigned = Encoding("png")
    in_threads = ImageProcessing.in_threads(Moderator(MODERATION), None)
    assert asyncio.run(in_processes.encode(dark[0], unsigned, None)) == asyncio.run(
        in_threads.encode(dark[0], unsigned, None)
    )
    made = Provenance(model="tiny-sd", prompt="a square")
    prepared, hand_over_ms = asyncio.run(
        in_processes.prepare(dark, "auto", Encoding("jpeg", 80), made)
    )
    assert len(prepared.files) == 2 and prepared.moderate_ms > 0 and prepared.sign_ms > 0
    assert hand_over_ms > 0
    store = read_manifest(prepared.files[1], "jpeg")
    assert store["validation_state"] == "Valid"
    inline, _ = asyncio.run(in_processes.prepare(dark, "auto", Encoding("png", base64=True), made))
    assert all(text.startswith(b"iVBORw0KGgo") for text in inline.files)  # base64 PNG


def test_a_flagged_image_is_refused_by_the_router(in_processes: ImageProcessing) -> None:
    red = [solid((20, 30, 40)), solid((250, 10, 10))]
    made = Provenance(model="tiny-sd")
    with pytest.raises(ModerationBlocked, match="generated image was not allowed"):
        asyncio.run(in_processes.prepare(red, "auto", Encoding("png"), made))
    with pytest.raises(ModerationBlocked, match="uploaded image is") as refused:
        asyncio.run(in_processes.check(red[1:], "auto", param="image"))
    assert refused.value.param == "image"
    asyncio.run(in_processes.check([solid((250, 10, 10))], "low", param=None))  # not at low


def pool_pids(processing: ImageProcessing) -> list[int]:
    pool = processing._pool
    assert pool is not None
    return list(pool._processes)


def test_a_process_that_dies_fails_one_request_and_a_new_pool_serves_the_next(
    provenance: ProvenanceSettings,
) -> None:
    processing = ImageProcessing.in_processes(1, MODERATION, provenance)
    try:
        [pid] = pool_pids(processing)
        os.kill(pid, signal.SIGKILL)
        wait_until_ended([pid])

        async def requests_until_served() -> int:
            with pytest.raises(GenerationFailed):  # the one that finds the pool broken
                await processing.encode(solid((1, 2, 3)), Encoding("png"), None)
            failed = 1
            while True:  # (failing fast while the new pool starts)
                try:
                    made = await processing.encode(solid((1, 2, 3)), Encoding("png"), None)
                except GenerationFailed:
                    failed += 1
                    await asyncio.sleep(0.05)
                    continue
                assert made.startswith(b"\x89PNG")
                return failed

        assert asyncio.run(requests_until_served()) >= 1
        assert pool_pids(processing) != [pid]
    finally:
        processing.close()


def test_the_processes_end_when_their_router_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from deployments.router.image_processing import ImageProcessing
        from mediagate.moderation.settings import ModerationSettings
        processing = ImageProcessing.in_processes(
            2, ModerationSettings(image_checker={CHECKER!r}), None
        )
        print(*processing._pool._processes, flush=True)
        time.sleep(60)
        """
    )
    router = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert router.stdout is not None
    children = [int(pid) for pid in router.stdout.readline().split()]
    assert len(children) == 2
    router.kill()
    router.wait()
    wait_until_ended(children)


def wait_until_ended(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"  # a zombie has ended


def test_a_checker_that_does_not_load_fails_the_start_and_says_so() -> None:
    broken = ModerationSettings(image_checker="tests.moderation_checkers:NoSuchChecker")
    with pytest.raises(RuntimeError, match="image checker or signer failed to load"):
        ImageProcessing.in_processes(1, broken, None)
