"""The operator's audit trail from the CLI: every change an operator makes (limits,
keys, tiers), who and when, in the state store's audit document
(``mediagate.access.audit``, shared with the console's changes) and appended to
``$MEDIAGATE_HOME/audit.log`` (0600). Entries never hold a secret: keys appear by their
shown prefix only.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from mediagate.access.audit import (
    AUDIT_ACCOUNT,
    AUDIT_DOCUMENT,
    appended,
    audit_entry,
    read_entries,
)
from mediagate.cli.command import _layout, _state
from mediagate.stores import open_state_store


def _operator() -> str:
    import getpass
    import socket

    return os.environ.get("MEDIAGATE_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def record(lines: list[str]) -> None:
    """One line per change, who and when, in the state store (shared by the cluster)
    and in $MEDIAGATE_HOME/audit.log."""
    entry = audit_entry(_operator(), lines, time.time())

    async def write() -> None:
        store = open_state_store(_state())
        try:
            await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, appended(entry))
        finally:
            await store.close()

    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(layout.root / "audit.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a") as log:
        log.write(json.dumps(entry) + "\n")
    asyncio.run(write())


def recent_lines(count: int) -> list[str]:
    if count <= 0:
        return []

    async def read() -> list[dict[str, Any]]:
        store = open_state_store(_state())
        try:
            return await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, read_entries)
        finally:
            await store.close()

    entries = asyncio.run(read())[-count:]
    lines = ["", "recent changes:"] if entries else []
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"]))
        lines += [f"{when} UTC {entry['by']}: {change}" for change in entry["changes"]]
    return lines
