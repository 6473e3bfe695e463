"""The operator's audit trail: every change an operator makes with the CLI (limits,
keys, tiers), who and when, in the state store (shared by the cluster, the last
``AUDIT_KEEP``) and appended to ``$MEDIAGATE_HOME/audit.log`` (0600). Entries never hold
a secret: keys appear by their shown prefix only.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from mediagate.cli.command import _layout, _state
from mediagate.stores import open_state_store

AUDIT_ACCOUNT = "_operator"  # not an account: the owner of operator documents
AUDIT_DOCUMENT = "scale_audit"  # its first name (scale changes only), kept for old entries
AUDIT_KEEP = 1000


def _operator() -> str:
    import getpass
    import socket

    return os.environ.get("MEDIAGATE_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def record(lines: list[str]) -> None:
    """One line per change, who and when, in the state store (shared by the cluster)
    and in $MEDIAGATE_HOME/audit.log."""
    entry = {"at": time.time(), "by": _operator(), "changes": lines}

    def append(current: str | None) -> tuple[str, None]:
        entries = json.loads(current) if current else []
        return json.dumps([*entries, entry][-AUDIT_KEEP:]), None

    async def write() -> None:
        store = open_state_store(_state())
        try:
            await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, append)
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
            document = await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, lambda c: (c, c))
        finally:
            await store.close()
        return json.loads(document) if document else []

    entries = asyncio.run(read())[-count:]
    lines = ["", "recent changes:"] if entries else []
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"]))
        lines += [f"{when} UTC {entry['by']}: {change}" for change in entry["changes"]]
    return lines
