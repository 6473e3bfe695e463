"""The disk under ``MEDIAGATE_HOME`` fills up (issue 15's fault suite): the router app
with its embedded state (SQLite) and local artifacts on a small tmpfs, filled to the
last byte while requests arrive, then given space again.

Must hold: clear 503s while full (never a 500), nothing charged for refused work, no
corrupted SQLite, and service as before once space returns. Needs root (it mounts the
tmpfs); skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mediagate.access.accounts import SqliteAccountStore
from mediagate.stores.sqlite_store import SqliteStateStore
from tests.unit.harness import URL, Service


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Take every free byte of the file system under ``path``."""
    filler = path / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (65536, 4096, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * chunk)
    finally:
        os.close(descriptor)
    return filler


async def test_a_full_disk_gives_503s_loses_nothing_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "home") as home:
        db = home / "state.db"
        service = Service(home, jobs=SqliteStateStore(db), accounts=SqliteAccountStore(db))
        callers = {"free": service.other_auth("thrifty", "free"), "pro": service.other_auth("busy")}
        transport = httpx.ASGITransport(app=service.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def generate(caller: str, response_format: str) -> httpx.Response:
                body = {"prompt": "x", "size": "64x64", "response_format": response_format}
                return await client.post(URL, json=body, headers=callers[caller])

            async def images_today(name: str) -> int:
                account = service.accounts.get_account(name)
                assert account is not None
                return (await service.gateway.guard.ledger.usage(account)).images_today

            assert (await generate("pro", "url")).status_code == 200
            assert (await generate("free", "b64_json")).status_code == 200
            before = {name: await images_today(name) for name in ("busy", "thrifty")}

            filler = fill(home)
            refused = [
                await generate("free", "b64_json"),  # no quota check possible: refused
                await generate("pro", "url"),  # its files cannot be written
                await client.post(
                    "/v1/videos",
                    json={"prompt": "x", "seconds": "4", "size": "32x48"},
                    headers=callers["pro"],
                ),
            ]
            # A paid account's inline images need no disk: served from the outage budget.
            budget = await generate("pro", "b64_json")
            for answer in refused:
                assert answer.status_code == 503, answer.text
                error = answer.json()["error"]
                assert error["code"] == "store_unavailable", error
                assert str(home) not in answer.text  # no paths in answers
                assert int(answer.headers["retry-after"]) >= 1
            assert budget.status_code == 200, budget.text
            filler.unlink()

            after = [await generate("pro", "url"), await generate("free", "b64_json")]
            assert [a.status_code for a in after] == [200, 200], after[-1].text
            # Refused work was not charged; what was served after recovery was. (The
            # budget's image was served without a ledger: it is counted in /v1/status.)
            assert await images_today("busy") == before["busy"] + 1
            assert await images_today("thrifty") == before["thrifty"] + 1
            # Two passes from the outage budget: the url request's went back when its
            # files could not be written.
            counters = service.gateway.guard.counters
            assert counters["store_outage_fail_open"] == 2, counters
            assert counters["store_outage_fail_open_returned"] == 1, counters
            assert not [path for path in (home / "artifacts").iterdir() if ".tmp" in path.name]
        with sqlite3.connect(db) as check:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
